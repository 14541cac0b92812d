"""`lwdsl run DIR --prompt TEXT [--max-new-tokens N]`: generate text with an artifact (sharded ones
under `torchrun --nproc-per-node N -m lwdsl run DIR ...`)."""
from __future__ import annotations

import argparse

HELP = "generate text with an artifact written by `lwdsl apply` (under torchrun for sharded ones)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", metavar="DIR", help="the artifact folder")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate (32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--device", default=None,
                        help="run everything on this torch device (`cpu`, `cuda:0`) instead of where the "
                             "manifest places it")


def run(args: argparse.Namespace) -> int:
    from lwdsl.errors import fail

    if args.max_new_tokens < 1:
        raise fail("E646", f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    from lwdsl.artifact import load, load_tokenizer, read_manifest
    from lwdsl.apply.shard import init_from_env

    manifest = read_manifest(args.artifact)
    rank, world = init_from_env() if manifest.tensor_parallel > 1 else (0, 1)
    model = load(args.artifact, device=args.device)
    tokenizer = load_tokenizer(args.artifact)
    text = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.chat,
                         manifest.kv_format)
    if rank == 0:
        print(text)
    return 0


def generate_text(model, tokenizer, prompt, max_new_tokens, temperature, chat, kv_format) -> str:
    """The lean decode loop (its cache is sized per block, so head-pruned artifacts run on it too)."""
    from lwdsl.runtime.generate import generate

    return generate(model, tokenizer, prompt, max_new_tokens, temperature, kv_format, chat=chat)

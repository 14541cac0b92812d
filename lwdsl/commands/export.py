"""`lwdsl export DIR --format gguf|hf -o PATH`: an artifact in a format other runtimes load."""
from __future__ import annotations

import argparse

HELP = "write an artifact as a GGUF file (llama.cpp) or a Hugging Face folder (transformers)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", metavar="DIR", help="the artifact folder (`lwdsl apply PLAN -o DIR`)")
    parser.add_argument("--format", required=True, metavar="FORMAT",
                        help="gguf (llama.cpp, ollama, LM Studio), hf (transformers, vLLM, TGI: float weights) or hf-quantized (compressed-tensors pack-quantized: the stored int8/int4 codes)")
    parser.add_argument("-o", "--output", required=True, metavar="PATH", help="the file (gguf) or folder (hf) to write")
    parser.add_argument("--requantize", action="store_true",
                        help="gguf: round layers no GGUF type holds exactly to the nearest one (listed, with the "
                             "predicted quality effect) instead of refusing")
    parser.add_argument("--source", metavar="FILE.gguf",
                        help="gguf: the source GGUF the artifact was made from (found automatically when the plan's path resolves)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="hf: the weights' dtype (default: the source checkpoint's)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lwdsl.export import export

    console = Console(stderr=True)
    with console.status("exporting") as status:
        result = export(args.artifact, args.format, args.output, requantize=args.requantize, source=args.source,
                        force=args.force, dtype=args.dtype,
                        progress=lambda name: status.update(f"exporting {name}"))
    console.print(f"[bold]{result.format}[/bold] {result.path} ({result.bytes / 2**20:.1f} MiB)")
    for line in result.summary:
        console.print(f"  {line}")
    return 0

"""Small GGUF files of the families lwdsl supports, written here with the `gguf` package, for "a model
of these families that you have not tried": layouts and tensor types the shipped models do not have.

- `qwen2_tied`: Qwen2 with a *tied* head (no `output.weight`: Qwen2.5-0.5B and 1.5B are tied, the
  Coder file lwdsl ships a plan for is not), q/k/v biases, grouped-query attention 4/2.
- `gemma3_1b_like`: Gemma 3 laid out as Gemma-3-1B is (four query heads on one KV head of 256,
  q/k norms, four norms a block, a sliding window, every sixth layer global), shrunk.

Tensors come in the types real files mix: Q4_K, Q5_K, Q6_K, Q8_0, Q5_0, Q4_0, BF16, F16 (F32 norms
and biases). `gguf` quantizes Q4_0, Q5_0, Q8_0 and BF16 from values; it has no k-quant encoder, so
Q4_K/Q5_K/Q6_K blocks are made of random codes and scales with their fp16 super-block factors set to
small values: any byte pattern is a valid k-quant block, and what the weights *are* is whatever
`gguf.quants.dequantize` reads back (the tests compare against that, not against the values drawn).
The tokenizers are tiny but real (a byte-level BPE for Qwen2, a sentencepiece vocabulary with byte
fallback for Gemma), so transformers builds both from the file as it does for downloaded ones.

    path = write_gguf(tmp_path / "q.gguf", QWEN2_TIED)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

@dataclass(frozen=True)
class Spec:
    arch: str                      # GGUF `general.architecture`
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    biases: bool = False
    gemma: bool = False
    sliding_window: int | None = None
    types: dict[str, str] = field(default_factory=dict)  # GGUF tensor part -> GGML type name
    layer_types: dict[int, dict[str, str]] = field(default_factory=dict)  # per-block overrides


QWEN2_TIED = Spec(arch="qwen2", hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, head_dim=64,
                  tied=True, biases=True,
                  types={"token_embd": "Q8_0", "attn_q": "Q5_0", "attn_k": "Q5_0", "attn_v": "Q8_0",
                         "attn_output": "Q4_K", "ffn_gate": "Q4_K", "ffn_up": "Q5_K", "ffn_down": "Q6_K"},
                  layer_types={1: {"attn_q": "BF16", "attn_k": "F16", "ffn_gate": "Q4_0", "ffn_up": "Q6_K"}})
GEMMA3_1B_LIKE = Spec(arch="gemma3", hidden=256, intermediate=512, layers=7, heads=4, kv_heads=1, head_dim=256,
                      tied=True, gemma=True, sliding_window=16,
                      types={"token_embd": "BF16", "attn_q": "Q4_K", "attn_k": "Q5_0", "attn_v": "Q8_0",
                             "attn_output": "Q4_K", "ffn_gate": "Q5_K", "ffn_up": "Q4_0", "ffn_down": "Q6_K"},
                      layer_types={5: {"attn_q": "F16", "ffn_gate": "Q8_0", "ffn_down": "Q4_K"}})

# k-quant super-blocks of 256 values: (bytes a block, byte offsets of its fp16 factors (d, dmin))
_K_BLOCKS = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208, None))}
_K_FACTORS = {"Q4_K": (2e-4, 1e-3), "Q5_K": (1e-4, 1e-3), "Q6_K": (2e-5, None)}


def _types():
    import gguf

    return gguf.GGMLQuantizationType


def _k_quant_bytes(rows: int, cols: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    size, (d_at, dmin_at) = _K_BLOCKS[kind]
    blocks = rng.integers(0, 256, size=(rows * cols // 256, size), dtype=np.uint8)
    d, dmin = _K_FACTORS[kind]
    blocks[:, d_at:d_at + 2] = np.frombuffer(np.float16(d).tobytes(), dtype=np.uint8)
    if dmin_at is not None:
        blocks[:, dmin_at:dmin_at + 2] = np.frombuffer(np.float16(dmin).tobytes(), dtype=np.uint8)
    return blocks.reshape(rows, cols // 256 * size)


def _tensor(writer, name: str, shape: tuple[int, ...], kind: str, rng: np.random.Generator,
            scale: float = 0.05, values: np.ndarray | None = None) -> None:
    import gguf

    kinds = _types()
    if values is None:
        values = (rng.standard_normal(shape) * scale).astype(np.float32)
    if kind in _K_BLOCKS:
        writer.add_tensor(name, _k_quant_bytes(shape[0], shape[1], kind, rng), raw_dtype=kinds[kind])
    elif kind == "F32":
        writer.add_tensor(name, values)
    elif kind == "F16":
        writer.add_tensor(name, values.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(values, kinds[kind]), raw_dtype=kinds[kind])


def _qwen2_tokenizer(writer) -> int:
    """A byte-level BPE: the 256 byte symbols, a few merges, Qwen's three control tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    pairs = [("Ġ", "t"), ("h", "e"), ("Ġ", "a"), ("i", "n"), ("Ġt", "he"), ("e", "r"), ("o", "n"), ("Ġ", "s"),
             ("r", "e"), ("a", "t"), ("e", "n"), ("Ġ", "w"), ("Ġ", "o"), ("i", "t"), ("Ġ", "c"), ("o", "u")]
    merged = [a + b for a, b in pairs]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = symbols + merged + specials
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(symbols) + len(merged)) + [3] * len(specials))
    writer.add_token_merges([f"{a} {b}" for a, b in pairs])
    end = tokens.index("<|endoftext|>")
    writer.add_bos_token_id(end)
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(end)
    writer.add_add_bos_token(False)
    return len(tokens)


def _gemma_tokenizer(writer) -> int:
    """A sentencepiece vocabulary as Gemma files store it: specials, 256 byte tokens, then pieces."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    pieces = ["▁", *letters, ".", ",", "'", "▁t", "he", "▁a", "in", "▁the", "er", "on", "▁s", "re", "at", "en"]
    tokens = specials + byte_tokens + pieces
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_types([3] * len(specials) + [6] * len(byte_tokens) + [1] * len(pieces))
    writer.add_pad_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_bos_token_id(2)
    writer.add_unk_token_id(3)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    return len(tokens)


def write_gguf(path: Path, spec: Spec, seed: int = 0) -> Path:
    """Write a GGUF file of `spec`'s family and shapes at `path`; returns `path`."""
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), spec.arch)
    a = spec.arch
    writer.add_uint32(f"{a}.context_length", 2048)
    writer.add_uint32(f"{a}.embedding_length", spec.hidden)
    writer.add_uint32(f"{a}.block_count", spec.layers)
    writer.add_uint32(f"{a}.feed_forward_length", spec.intermediate)
    writer.add_uint32(f"{a}.attention.head_count", spec.heads)
    writer.add_uint32(f"{a}.attention.head_count_kv", spec.kv_heads)
    writer.add_float32(f"{a}.rope.freq_base", 1e6)
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    if spec.gemma:
        writer.add_uint32(f"{a}.attention.key_length", spec.head_dim)
        writer.add_uint32(f"{a}.attention.value_length", spec.head_dim)
        writer.add_uint32(f"{a}.attention.sliding_window", spec.sliding_window)
    vocab = _gemma_tokenizer(writer) if spec.gemma else _qwen2_tokenizer(writer)
    writer.add_file_type(15)

    h, f, q, kv = spec.hidden, spec.intermediate, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    ones = lambda n: (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    _tensor(writer, "token_embd.weight", (vocab, h), spec.types["token_embd"], rng, scale=0.5)
    if not spec.tied:
        _tensor(writer, "output.weight", (vocab, h), spec.types.get("output", "Q8_0"), rng)
    _tensor(writer, "output_norm.weight", (h,), "F32", rng, values=ones(h))
    for block in range(spec.layers):
        kinds = {**spec.types, **spec.layer_types.get(block, {})}
        shapes = {"attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, q),
                  "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f)}
        for part, shape in shapes.items():
            _tensor(writer, f"blk.{block}.{part}.weight", shape, kinds[part], rng)
        if spec.biases:
            for part, n in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
                _tensor(writer, f"blk.{block}.{part}.bias", (n,), "F32", rng, scale=0.1)
        norms = {"attn_norm": h, "ffn_norm": h}
        if spec.gemma:
            norms.update(post_attention_norm=h, post_ffw_norm=h, attn_q_norm=spec.head_dim,
                         attn_k_norm=spec.head_dim)
        for part, n in norms.items():
            _tensor(writer, f"blk.{block}.{part}.weight", (n,), "F32", rng, values=ones(n))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dequantized(path: Path, name: str) -> np.ndarray:
    """A tensor of the file as `gguf` reads it back, in torch's (out, in) order, float32."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensor = next(t for t in reader.tensors if t.name == name)
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(values, dtype=np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape.tolist())))


def apply_quantized(plan, out, capsys) -> dict:
    """`lwdsl apply PLAN -o OUT` on a small model whose blocks get quantized: its manifest, after the
    embedding stayed an embedding and a block's MLP was packed."""
    from lwdsl.cli import main

    assert main(["apply", str(plan), "-o", str(out)]) == 0, capsys.readouterr().err[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layers"]["model.embed_tokens"]["kind"] == "embedding"
    assert manifest["layers"]["model.layers.0.mlp.down_proj"]["kind"] == "quantized"
    return manifest

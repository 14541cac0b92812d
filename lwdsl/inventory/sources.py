"""Model sources -> Inventory: one reader per scheme (`hf:`, `gguf:`, `arch:`, `config:`).

Nothing here loads a tensor: `hf:` reads config.json and the safetensors headers (the first 8 bytes
give the JSON header length), `gguf:` reads GGUF metadata and tensor infos (`lwdsl.inventory.gguf_header`)
(the header alone; shapes are stored innermost-first, i.e. reversed against torch).
"""
from __future__ import annotations

import json
import re
import struct
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from lwdsl.errors import LwdslError, Span, fail
from lwdsl.inventory.configs import arch_from_config
from lwdsl.inventory.gguf_header import read_header
from lwdsl.inventory.layouts import LAYOUTS
from lwdsl.inventory.records import ArchNumbers, Inventory, Weight


@cache
def _catalog() -> dict[str, Any]:
    text = resources.files("lwdsl").joinpath("data").joinpath("architectures.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def architecture_ids() -> list[str]:
    """The ids usable as `model "arch:ID"`, in catalog order."""
    return list(_catalog())


def architecture_entry(arch_id: str) -> dict[str, Any]:
    """The catalog entry (`source`, `params`, `config`) of one architecture id."""
    return _catalog()[arch_id]


def build(source: str, arch: ArchNumbers, span: Span | None = None) -> Inventory:
    """The inventory the HF implementation of `arch` has (weights from the layout, no shapes read)."""
    layout = LAYOUTS.get(arch.model_type)
    if layout is None:
        raise fail("E304", f"model type '{arch.model_type}' is not supported",
                   span, hint=f"supported: {', '.join(sorted(LAYOUTS))}")
    weights, modules = layout(arch)
    return Inventory(source=source, arch=arch, weights=tuple(weights), modules=tuple(modules))


def _arch_or_error(config: dict[str, Any], where: str, span: Span | None) -> ArchNumbers:
    try:
        return arch_from_config(config)
    except LookupError as unknown:
        if isinstance(unknown, KeyError):
            raise fail("E305", f"{where}: config is missing '{unknown.args[0]}'", span) from None
        raise fail("E304", f"{where}: model type '{config.get('model_type')}' is not supported", span,
                   hint=f"supported: {', '.join(sorted(LAYOUTS))}") from None
    except (TypeError, ValueError) as bad:
        raise fail("E305", f"{where}: config has an unusable value ({bad})", span) from None


def _read_json(path: Path, span: Span | None) -> dict[str, Any]:
    if not path.is_file():
        raise fail("E301", f"no such file: {path}", span)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as bad:
        raise fail("E302", f"cannot read {path}: {bad}", span) from None
    if not isinstance(data, dict):
        raise fail("E302", f"{path} is not a JSON object", span)
    return data


# --- arch: and config: ------------------------------------------------------------------------------

# A config's `torch_dtype` (the dtype its published checkpoint stores) as an lwdsl format name.
CHECKPOINT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _with_checkpoint_dtype(inventory: Inventory, config: dict[str, Any]) -> Inventory:
    """Every weight marked with the checkpoint's dtype, when the config names one."""
    dtype = CHECKPOINT_DTYPES.get(str(config.get("torch_dtype") or config.get("dtype") or ""))
    if dtype is None:
        return inventory
    weights = tuple(w.model_copy(update={"checkpoint_dtype": dtype}) for w in inventory.weights)
    return inventory.model_copy(update={"weights": weights})


def from_arch(source: str, arch_id: str, span: Span | None) -> Inventory:
    if arch_id not in _catalog():
        raise fail("E303", f"unknown architecture '{arch_id}'", span,
                   hint=f"known: {', '.join(architecture_ids())}")
    config = _catalog()[arch_id]["config"]
    return _with_checkpoint_dtype(build(source, arch_from_config(config), span), config)


def from_config(source: str, path: Path, span: Span | None) -> Inventory:
    config = _read_json(path, span)
    return _with_checkpoint_dtype(build(source, _arch_or_error(config, str(path), span), span), config)


# --- hf: --------------------------------------------------------------------------------------------

_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                      "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _safetensors_header(path: Path, span: Span | None) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100_000_000:
                raise ValueError("header length out of range")
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as bad:
        raise fail("E302", f"cannot read safetensors header of {path}: {bad}", span) from None
    header.pop("__metadata__", None)
    return header


def from_hf(source: str, folder: Path, span: Span | None) -> Inventory:
    if not folder.is_dir():
        raise fail("E301", f"no such model folder: {folder}", span)
    arch = _arch_or_error(_read_json(folder / "config.json", span), str(folder / "config.json"), span)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise fail("E301", f"no *.safetensors file in {folder}", span,
                   hint="an hf: model needs its weights; use config: for planning from a config alone")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    source_bytes = 0
    for file in files:
        for name, info in _safetensors_header(file, span).items():
            shape = tuple(int(d) for d in info["shape"])
            tensors[name] = (info["dtype"], shape)
            start, end = info["data_offsets"]
            source_bytes += int(end) - int(start)
    return _match(build(source, arch, span), tensors, source_bytes, span)


def _match(expected: Inventory, found: dict[str, tuple[str, tuple[int, ...]]], source_bytes: int,
           span: Span | None, conv1d_stored_in_out: bool = True) -> Inventory:
    """Check the source's tensors against the layout and record their dtypes (shapes must agree).

    HF checkpoints keep GPT-2's Conv1D weights (in, out); GGUF converters store them (out, in)."""
    prefix = "transformer." if expected.arch.model_type == "gpt2" else ""
    weights: list[Weight] = []
    for weight in expected.weights:
        hit = found.get(weight.name) or (found.get(weight.name.removeprefix(prefix)) if prefix else None)
        if hit is None:
            if weight.tied_to:
                weights.append(weight)
                continue
            raise fail("E305", f"the weights have no tensor '{weight.name}' that the config implies", span)
        dtype, shape = hit
        if weight.transposed and conv1d_stored_in_out:
            shape = tuple(reversed(shape))
        if shape != weight.shape:
            raise fail("E305", f"tensor '{weight.name}' has shape {list(shape)}, the config implies "
                       f"{list(weight.shape)}", span)
        weights.append(weight.model_copy(update={"source_dtype": dtype}))
    return expected.model_copy(update={"weights": tuple(weights), "source_bytes": source_bytes})


# --- gguf: ------------------------------------------------------------------------------------------

# llama.cpp tensor names (gguf-py `constants.py` TENSOR_NAMES) -> the HF module of each layout.
_GGUF_LLAMA = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GPT2 = {
    "token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
    "output": "lm_head", "attn_norm": "ln_1", "ffn_norm": "ln_2", "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
}
# Gemma 3 (llama.cpp's gemma3): the Llama names plus q/k norms and four norms a block.
_GGUF_GEMMA3 = {**_GGUF_LLAMA, "ffn_norm": "pre_feedforward_layernorm",
                "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
                "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GGUF_TABLES = {"gpt2": (_GGUF_GPT2, "transformer.h"), "gemma3_text": (_GGUF_GEMMA3, "model.layers")}
# GGUF `general.architecture` -> the model type of its HF implementation
_GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2", "gemma3": "gemma3_text"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_TOP = re.compile(r"^(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str, model_type: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (None when unmapped)."""
    table, blocks = _GGUF_TABLES.get(model_type, (_GGUF_LLAMA, "model.layers"))
    if match := _BLOCK.match(gguf_name):
        index, part, kind = match.groups()
        return f"{blocks}.{index}.{table[part]}.{kind}" if part in table else None
    if match := _TOP.match(gguf_name):
        part, kind = match.groups()
        return f"{table[part]}.{kind}" if part in table else None
    return None


def from_gguf(source: str, path: Path, span: Span | None) -> Inventory:
    if not path.is_file():
        raise fail("E301", f"no such file: {path}", span)
    stat = path.stat()
    try:
        return _from_gguf_cached(source, str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    except LwdslError as error:  # the cached read knows no plan position: put this plan's on
        raise LwdslError([d.model_copy(update={"span": d.span or span}) for d in error.diagnostics],
                         error.exit_code) from None


@lru_cache(maxsize=8)
def _from_gguf_cached(source: str, file: str, _mtime_ns: int, _size: int) -> Inventory:
    """The same unchanged file is read once per process, whichever plan (and span) names it."""
    span = None
    path = Path(file)
    try:
        header = read_header(path)
    except (ValueError, OSError, struct.error) as bad:
        raise fail("E302", f"cannot read GGUF file {path}: {bad}", span) from None
    arch_name = str(header.fields.get("general.architecture") or "")
    model_type = _GGUF_ARCHITECTURES.get(arch_name)
    if model_type is None:
        raise fail("E304", f"GGUF architecture '{arch_name}' is not supported", span,
                   hint=f"supported: {', '.join(_GGUF_ARCHITECTURES)}")
    tensors = {t.name: (t.type_name, t.shape) for t in header.tensors}
    source_bytes = sum(t.n_bytes for t in header.tensors)
    arch = _gguf_arch(header.fields, arch_name, model_type, tensors, span)
    found = {}
    for name, value in tensors.items():
        mapped = hf_name(name, model_type)
        if mapped is not None:
            found[mapped] = value
    return _match(build(source, arch, span), found, source_bytes, span, conv1d_stored_in_out=False)


def _gguf_arch(fields: dict[str, Any], a: str, model_type: str, tensors: dict, span: Span | None) -> ArchNumbers:
    def number(key: str, default: int | None = None) -> int:
        value = fields.get(f"{a}.{key}")
        if value is None:
            if default is None:
                raise fail("E305", f"GGUF metadata has no '{a}.{key}'", span)
            return default
        return int(value)

    hidden, heads = number("embedding_length"), number("attention.head_count")
    vocab = fields.get(f"{a}.vocab_size")
    if vocab is None:
        vocab = tensors["token_embd.weight"][1][0] if "token_embd.weight" in tensors else None
    if vocab is None:
        raise fail("E305", "GGUF file has neither a vocab size nor a token_embd tensor", span)
    config: dict[str, Any] = {"model_type": model_type}
    if model_type == "gpt2":
        config.update(n_embd=hidden, n_layer=number("block_count"), n_head=heads, vocab_size=int(vocab),
                      n_inner=number("feed_forward_length", 4 * hidden),
                      n_positions=number("context_length", 1024),
                      tie_word_embeddings="output.weight" not in tensors)
    elif model_type == "gemma3_text":  # llama.cpp stores the window; the layer pattern is transformers' default
        window = fields.get(f"{a}.attention.sliding_window")
        config.update(hidden_size=hidden, num_hidden_layers=number("block_count"), num_attention_heads=heads,
                      num_key_value_heads=number("attention.head_count_kv", heads),
                      head_dim=number("attention.key_length", 256),
                      intermediate_size=number("feed_forward_length"), vocab_size=int(vocab),
                      max_position_embeddings=number("context_length", 131072),
                      sliding_window=int(window) if window else None,
                      tie_word_embeddings="output.weight" not in tensors)
    else:
        config.update(hidden_size=hidden, num_hidden_layers=number("block_count"), num_attention_heads=heads,
                      num_key_value_heads=number("attention.head_count_kv", heads),
                      head_dim=number("attention.key_length", hidden // heads),
                      intermediate_size=number("feed_forward_length"), vocab_size=int(vocab),
                      max_position_embeddings=number("context_length", 2048),
                      tie_word_embeddings="output.weight" not in tensors,
                      attention_bias="blk.0.attn_q.bias" in tensors and model_type != "qwen2")
    return arch_from_config(config)


def load(source: str, scheme: str, location: str, base_dir: Path, span: Span | None) -> Inventory:
    """Dispatch on the scheme; relative paths resolve against the plan's folder."""
    if scheme == "arch":
        return from_arch(source, location, span)
    path = Path(location).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    readers = {"hf": from_hf, "gguf": from_gguf, "config": from_config}
    if scheme not in readers:
        raise fail("E304", f"unknown model scheme '{scheme}:'", span, hint="use hf:, gguf:, arch: or config:")
    try:
        return readers[scheme](source, path, span)
    except LwdslError:
        raise
    except OSError as bad:
        raise fail("E302", f"cannot read {path}: {bad}", span) from None

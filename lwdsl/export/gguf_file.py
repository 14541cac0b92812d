"""`lwdsl export DIR --format gguf -o FILE.gguf`: the artifact as a GGUF file llama.cpp runs as is.

Written with the `gguf` package's `GGUFWriter`. The source GGUF's metadata (architecture numbers,
rope, tokenizer, chat template) is carried over key by key; what the plan changed is written anew:
`{arch}.feed_forward_length` and `general.file_type`. Where channel pruning left different MLP widths
per block, every block is padded with zero channels to the widest (zero gate/up rows, zero down
columns: they add exactly nothing): llama.cpp reads `feed_forward_length` as a per-layer array, but its
llama graph builds every layer at the first layer's width (checked with llama-cpp-python 0.3.36: a
file with widths [1536, 1152, ...] fails to load, "blk.1.ffn_gate.weight has wrong shape"). Uniform
pruning keeps its real, smaller width. Tensors get HF -> GGUF names from
`gguf.TensorNameMap`, and the llama query/key rows the permutation `convert_hf_to_gguf.py` applies
(transformers undid it on load). Each tensor is written in the GGUF type that holds exactly what
lwdsl stored (`gguf_types`); a layer no GGUF type holds exactly is E681 unless `requantize`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lwdsl.errors import fail
from lwdsl.export.gguf_types import EXACT_TABLE, FORMAT_OF, encode, exact_float_type, exact_type, float_bytes, nearest_type
from lwdsl.export.view import ArtifactView

SUPPORTED_ARCHS = ("llama",)  # transformers' GGUF loader and convert_hf_to_gguf agree on these here
_PERMUTED = {"llama": ("q_proj", "k_proj")}  # rows permuted for llama.cpp's rotary layout
_REWRITTEN = ("GGUF.", "general.architecture", "general.file_type")


@dataclass(frozen=True)
class Requantized:
    """A layer re-quantized under `--requantize`: from what, to which GGUF type, and the predicted effect."""

    name: str
    stored: str
    gguf_type: str
    ppl_before: float
    ppl_after: float


@dataclass(frozen=True)
class GGUFResult:
    path: Path
    bytes: int
    types: dict  # GGUF type -> tensor count
    requantized: tuple[Requantized, ...]
    feed_forward: tuple[int, ...]  # the stored width per block (the file holds the widest, zero-padded)
    source: Path


def _permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's llama q/k permutation of whole rows (each row's bytes move together)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _linear_names(view: ArtifactView) -> list[str]:
    names = ["model.embed_tokens"]
    for index in range(view.blocks):
        names += [f"model.layers.{index}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"model.layers.{index}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    if not view.manifest.tied_embeddings and ("lm_head.weight" in view.tensors or view.record("lm_head")):
        names.append("lm_head")
    return names


def _not_exact(view: ArtifactView) -> list[tuple[str, str]]:
    """(layer, stored format) of every layer no GGUF type holds exactly."""
    out = []
    for name, record in view.manifest.layers.items():
        if record.kind in ("linear", "embedding"):
            continue
        if record.kind == "sparse24":
            if record.values_kind in ("linear", "cast"):
                continue  # the dense matrix (zeros in place) is exact in F32 / F16 / BF16
            out.append((name, f"2:4 + {record.format.label()}"))
            continue
        if exact_type(record.format, levels_linear=record.format.dtype in ("int8", "int4", "int2")) is None:
            out.append((name, record.format.label()))
    return out


def _prior_ppl(view: ArtifactView, name: str, fmt, shape) -> float:
    from lwdsl.cost.quality import layer_quality
    from lwdsl.solution import PruneChoice

    total = sum(r.original_shape[0] * r.original_shape[1] for n, r in view.manifest.layers.items()
                if r.kind != "embedding" and not n.startswith(("lm_head", "model.embed_tokens")))
    return layer_quality(shape[0] * shape[1], total or 1, shape[1], fmt, PruneChoice())[0]


def check_heads(view: ArtifactView) -> None:
    """E685 when attention heads were pruned: exports write MLP channel pruning only (so far)."""
    heads = {view.layer_heads(i) for i in range(view.blocks)}
    if len(heads) > 1 or heads != {(view.config["num_attention_heads"], view.config.get("num_key_value_heads")
                                     or view.config["num_attention_heads"])}:
        raise fail("E685", "the artifact prunes attention heads; export writes MLP channel pruning only",
                   hint="allow `prune channels` instead of `prune heads` for a model meant for other runtimes")


def check_exportable(view: ArtifactView, requantize: bool) -> list[tuple[str, str]]:
    """The layers that need re-quantizing; E681 naming them (and the exact types) unless `requantize`;
    E685 for what llama.cpp cannot express (head pruning, another architecture)."""
    check_heads(view)
    missing = _not_exact(view)
    if missing and not requantize:
        shown = ", ".join(f"{n} ({f})" for n, f in missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise fail("E681", f"{len(missing)} layer(s) are stored in formats no GGUF type holds exactly: {shown}",
                   hint=f"exact GGUF types: {EXACT_TABLE}; allow those formats in the plan, or pass "
                        f"--requantize to round these layers again to the nearest GGUF type")
    return missing


def _stored_arrays(view: ArtifactView, name: str):
    """(codes, scale, offset) as numpy arrays of a quantized layer."""
    tensors = view.module_tensors(name)
    offset = tensors.get("offset")
    return (tensors["codes"].numpy(), tensors["scale"].numpy(),
            None if offset is None else offset.numpy())


def _tensor_bytes(view: ArtifactView, name: str, source_type: str | None, requantize: set[str]):
    """(GGUF type, array) of one linear layer's weight, exactly as stored unless in `requantize`."""
    from gguf import GGMLQuantizationType, quants

    record = view.record(name)
    if name in requantize:
        target = nearest_type(record.format)
        weight = view.float_weight(name).numpy()
        if weight.shape[1] % 32:
            return exact_float_type(weight.astype(np.float16).astype(np.float32), ())
        return target, quants.quantize(weight, GGMLQuantizationType[target])
    if record is not None and record.kind == "quantized":
        target = exact_type(record.format)
        return target, encode(target, *_stored_arrays(view, name))
    if record is not None and record.kind == "cast":
        weight = view.module_tensors(name)["weight"].float().numpy()
        target = exact_type(record.format)
        return target, float_bytes(target, weight)
    weight = view.float_weight(name).numpy()
    candidates = (source_type,) if source_type and source_type not in ("F32", "F16", "BF16") else ()
    return exact_float_type(weight, candidates)


def _pad_mlp(leaf: str, data: np.ndarray, width: int, widest: int, gguf_type: str) -> np.ndarray:
    """Zero channels from `width` up to `widest`: rows of gate/up, columns of down. A zero block is
    all-zero bytes in every type written here (d = 0, and m = 0 for Q4_1)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    if width == widest:
        return data
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[gguf_type]]
    if leaf in ("gate_proj", "up_proj"):
        return np.concatenate([data, np.zeros((widest - width, data.shape[1]), dtype=data.dtype)])
    extra = (widest - width) // block * block_bytes // data.dtype.itemsize
    return np.concatenate([data, np.zeros((data.shape[0], extra), dtype=data.dtype)], axis=1)


def _copy_metadata(reader, writer, skip: tuple[str, ...]) -> None:
    from gguf import GGUFValueType

    for key, field in reader.fields.items():
        if key.startswith(_REWRITTEN) or key in skip:
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == GGUFValueType.STRING:
                value = [bytes(field.parts[i]) for i in field.data]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_key_value(key, value, kind, sub_type=sub)
        elif kind == GGUFValueType.STRING:
            writer.add_key_value(key, bytes(field.parts[field.data[0]]), kind)
        else:
            writer.add_key_value(key, field.parts[field.data[0]].tolist()[0], kind)


def _file_type(types: dict) -> int:
    from gguf import LlamaFileType

    mostly = {"F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16, "BF16": LlamaFileType.MOSTLY_BF16,
              "Q4_0": LlamaFileType.MOSTLY_Q4_0, "Q4_1": LlamaFileType.MOSTLY_Q4_1, "Q8_0": LlamaFileType.MOSTLY_Q8_0}
    linear = {t: n for t, n in types.items() if t != "F32"} or types
    return int(mostly[max(linear, key=linear.get)])


def write_gguf(view: ArtifactView, path: Path, source: Path, requantize: bool = False, progress=None) -> GGUFResult:
    """Write `view` as a GGUF file at `path` (the caller makes it atomic)."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    if arch not in SUPPORTED_ARCHS:
        raise fail("E685", f"GGUF export writes {', '.join(SUPPORTED_ARCHS)} models; the source is {arch!r}")
    again = {n for n, _ in check_exportable(view, requantize)}
    source_types = {t.name: t.tensor_type.name for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], view.blocks)
    widths = tuple(view.layer_width(i) for i in range(view.blocks))
    heads, kv_heads = view.layer_heads(0)

    widest = max(widths)
    if any((widest - w) % 32 for w in widths):
        raise fail("E685", f"MLP widths {sorted(set(widths))} differ by other than whole blocks of 32; "
                   "llama.cpp needs one width for every layer", hint="prune channels by multiples of 32")
    writer = gguf.GGUFWriter(None, arch)
    _copy_metadata(reader, writer, skip=(f"{arch}.feed_forward_length",))
    writer.add_uint32(f"{arch}.feed_forward_length", widest)

    types: dict[str, int] = {}
    done: list[Requantized] = []

    def add(hf_key: str, gguf_type: str, data: np.ndarray) -> None:
        gguf_name = names.get_name(hf_key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise fail("E685", f"{hf_key}: no GGUF tensor name for it in the {arch} layout")
        raw = None if gguf_type in ("F32", "F16") else gguf.GGMLQuantizationType[gguf_type]
        writer.add_tensor(gguf_name, np.ascontiguousarray(data), raw_dtype=raw)
        types[gguf_type] = types.get(gguf_type, 0) + 1

    for name in _linear_names(view):
        if progress:
            progress(name)
        gguf_name = names.get_name(name + ".weight", try_suffixes=(".weight",))
        gguf_type, data = _tensor_bytes(view, name, source_types.get(gguf_name or ""), again)
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _PERMUTED.get(arch, ()):
            data = _permute(data, heads if leaf == "q_proj" else kv_heads)
        if leaf in ("gate_proj", "up_proj", "down_proj"):
            data = _pad_mlp(leaf, data, widths[int(name.split(".")[2])], widest, gguf_type)
        if name in again:
            record = view.record(name)
            shape = record.shape
            done.append(Requantized(name, record.format.label(), gguf_type,
                                    _prior_ppl(view, name, record.format, shape),
                                    _prior_ppl(view, name, FORMAT_OF.get(gguf_type, record.format), shape)))
        add(name + ".weight", gguf_type, data)
        bias = view.tensors.get(name + ".bias")
        if bias is not None:
            values = bias.float().numpy()
            if leaf in _PERMUTED.get(arch, ()):
                values = _permute(values, heads if leaf == "q_proj" else kv_heads)
            add(name + ".bias", "F32", values)
    for key, tensor in view.tensors.items():  # norms and any other float tensor not written above
        if key.endswith("norm.weight"):
            add(key, "F32", tensor.float().numpy())

    if "general.file_type" in reader.fields:
        writer.add_file_type(_file_type(types))
    writer.path = Path(path)
    writer.write_header_to_file(path=Path(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFResult(Path(path), Path(path).stat().st_size, types, tuple(done), widths, source)

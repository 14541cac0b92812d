"""`lwdsl export DIR --format hf-quantized -o FOLDER`: a Hugging Face folder whose quantized layers keep
lwdsl's stored codes, in compressed-tensors' `pack-quantized` format (what llm-compressor writes and
transformers and vLLM load, with the `compressed-tensors` package installed).

compressed-tensors dequantizes `w = (q - zero) * scale` with an integer zero point. lwdsl's symmetric
int8 (per channel or in groups) and symmetric int4 (in groups) are exactly that with zero 0: their
signed codes are packed by compressed-tensors' own `pack_to_int32`, and their fp16 scales are written
in the checkpoint's dtype (float32 by default: exact; fp16 scales stay fp16). lwdsl's asymmetric int4
has a float offset (the group minimum), which no integer zero point holds exactly, so those layers, and
every other one, are written as their exact float weights (listed in the summary).
"""
from __future__ import annotations

from pathlib import Path

from lwdsl.errors import fail
from lwdsl.export.hf import HFResult, write_hf
from lwdsl.export.view import ArtifactView


def _scheme_key(record) -> tuple | None:
    """(bits, strategy, group) of a layer compressed-tensors holds exactly, else None."""
    fmt = record.format
    if record.kind != "quantized" or not fmt.symmetric or fmt.dtype not in ("int8", "int4"):
        return None
    if fmt.dtype == "int4" and fmt.group is None:
        return None  # lwdsl's per-channel int4 uses -8..7 too, but keep to what is tested: grouped
    return (8 if fmt.dtype == "int8" else 4, "group" if fmt.group else "channel", fmt.group)


class _Packer:
    def __init__(self, view: ArtifactView):
        self.view = view
        self.groups: dict[tuple, list[str]] = {}

    def __call__(self, name: str, widest: int, dtype):
        import torch
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        from lwdsl.apply.kernels import Packed, signed_codes

        record = self.view.record(name)
        key = _scheme_key(record) if record is not None else None
        if key is None:
            return None
        bits, strategy, group = key
        tensors = self.view.module_tensors(name)
        packed = Packed(tensors["codes"], tensors["scale"], None, bits, group, "linear", record.shape[1])
        codes = signed_codes(packed).to(torch.int8)  # the stored codes, signed: int4 -8..7, int8 -127..127
        scale = tensors["scale"].reshape(record.shape[0], -1)
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("gate_proj", "up_proj") and codes.shape[0] < widest:  # zero channels: code 0
            codes = torch.cat([codes, codes.new_zeros(widest - codes.shape[0], codes.shape[1])])
            scale = torch.cat([scale, scale.new_zeros(widest - scale.shape[0], scale.shape[1])])
        if leaf == "down_proj" and codes.shape[1] < widest:
            extra = widest - codes.shape[1]
            codes = torch.cat([codes, codes.new_zeros(codes.shape[0], extra)], dim=1)
            if group:
                scale = torch.cat([scale, scale.new_zeros(scale.shape[0], extra // group)], dim=1)
        out = {name + ".weight_packed": pack_to_int32(codes.contiguous(), bits),
               name + ".weight_scale": scale.to(dtype if dtype != torch.bfloat16 else torch.float32).contiguous(),
               name + ".weight_shape": torch.tensor(tuple(codes.shape))}
        bias = tensors.get("bias")
        if bias is not None:
            out[name + ".bias"] = bias.to(dtype)
        self.groups.setdefault(key, []).append(name)
        return out

    def config(self, stored: list[str]) -> dict:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

        groups = {}
        for index, ((bits, strategy, group), names) in enumerate(sorted(self.groups.items(), key=str)):
            args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy=strategy, group_size=group)
            groups[f"group_{index}"] = QuantizationScheme(targets=sorted(names), weights=args)
        dense = sorted(n for n in self.view.manifest.layers if n not in stored and n != "model.embed_tokens")
        config = QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed",
                                    ignore=dense + ["lm_head"] * ("lm_head" not in dense))
        return config.model_dump()


def write_hf_quantized(view: ArtifactView, folder: Path, dtype: str | None = None) -> HFResult:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise fail("E684", "--format hf-quantized writes compressed-tensors' pack-quantized format and needs "
                   "the `compressed-tensors` package", hint="pip install compressed-tensors, or use --format hf") from None
    packer = _Packer(view)
    result = write_hf(view, folder, dtype, quantized=packer)
    if not packer.groups:
        raise fail("E681", "no layer of this artifact is stored in a format compressed-tensors holds exactly "
                   "(symmetric int8, symmetric grouped int4)", hint="use --format hf (float weights)")
    dense = [n for n, r in view.manifest.layers.items() if r.kind == "quantized" and _scheme_key(r) is None]
    if dense:
        result.summary.append(f"{len(dense)} quantized layers written as exact floats (e.g. {dense[0]}, "
                              f"{view.record(dense[0]).format.label()}: a float zero point has no integer form)")
    return result

"""`lwdsl export DIR --format hf -o FOLDER`: a Hugging Face folder transformers loads without lwdsl.

Every layer is written as the float matrix lwdsl's stored form stands for (dequantized exactly in
float32, then cast to the checkpoint's dtype, or `dtype`), in `model.safetensors` with the standard
names; `config.json` is the artifact's, with `intermediate_size` set to the MLP width. transformers'
Llama has one `intermediate_size` for all layers: where channel pruning left different widths per
layer, each layer is padded with zero channels to the widest (zero gate/up rows and down columns
contribute exactly nothing). Tokenizer and generation files are copied from the artifact.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lwdsl.artifact import MANIFEST_FILE, OFFLOAD_FILE, WEIGHTS_FILE
from lwdsl.errors import fail
from lwdsl.export.view import ArtifactView

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class HFResult:
    path: Path
    dtype: str
    widths: tuple[int, ...]
    summary: list[str] = field(default_factory=list)


def _pad(name: str, weight, widest: int):
    import torch

    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("gate_proj", "up_proj") and weight.shape[0] < widest:
        return torch.cat([weight, weight.new_zeros(widest - weight.shape[0], weight.shape[1])])
    if leaf == "down_proj" and weight.shape[1] < widest:
        return torch.cat([weight, weight.new_zeros(weight.shape[0], widest - weight.shape[1])], dim=1)
    return weight


def write_hf(view: ArtifactView, folder: Path, dtype: str | None = None, quantized=None) -> HFResult:
    """Write the folder; `quantized(name, widest, dtype)` may give a layer's tensors in a quantized
    form instead (a dict of `name.*` tensors) with the config entry it needs, or None for floats."""
    import torch
    from safetensors.torch import save_file

    from lwdsl.export.gguf_file import check_heads

    check_heads(view)
    config = dict(view.config)
    dtype = dtype or config.get("torch_dtype") or config.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise fail("E680", f"dtype {dtype!r} for the HF folder", hint=f"one of {', '.join(DTYPES)}")
    torch_dtype = getattr(torch, dtype)
    widths = tuple(view.layer_width(i) for i in range(view.blocks))
    widest = max(widths)
    recorded = {n for n, r in view.manifest.layers.items() if r.kind != "embedding"}
    state = {}
    for key, tensor in view.tensors.items():
        owner = key.rsplit(".", 1)[0]
        if owner in recorded or any(key.startswith(n + ".values.") or key == n + ".meta" for n in recorded):
            continue
        state[key] = tensor.to(torch_dtype).contiguous()
    stored = []
    for name in sorted(recorded):
        if name == "lm_head" and view.manifest.tied_embeddings:
            continue
        packed = quantized(name, widest, torch_dtype) if quantized else None
        if packed is not None:
            state.update(packed)
            stored.append(name)
        else:
            state[name + ".weight"] = _pad(name, view.float_weight(name), widest).to(torch_dtype).contiguous()
        bias = view.tensors.get(name + ".bias")
        if bias is not None:
            state[name + ".bias"] = bias.to(torch_dtype).contiguous()
    if view.manifest.tied_embeddings:
        state.pop("lm_head.weight", None)
        config["tie_word_embeddings"] = True
    config["intermediate_size"] = widest
    config.pop("quantization_config", None)
    config["torch_dtype"] = dtype
    if "dtype" in config:
        config["dtype"] = dtype
    if quantized is not None and hasattr(quantized, "config"):
        config["quantization_config"] = quantized.config(stored)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    skipped = {MANIFEST_FILE, WEIGHTS_FILE, OFFLOAD_FILE, "config.json"}
    for path in view.directory.iterdir():
        if path.is_file() and path.name not in skipped:
            shutil.copy2(path, folder / path.name)
    summary = [f"weights: {len(state)} tensors in {dtype}" + (f", {len(stored)} layers as their stored codes"
                                                             if stored else ", dequantized from the stored codes")]
    if len(set(widths)) > 1:
        summary.append(f"MLP widths {min(widths)}..{widest} per layer: padded with zero channels to "
                       f"intermediate_size {widest} (exact; transformers' config has one width)")
    elif widest != view.config.get("intermediate_size"):
        summary.append(f"intermediate_size: {view.config.get('intermediate_size')} -> {widest} (pruned)")
    return HFResult(folder, dtype, widths, summary)

"""Training checkpoints, written atomically and read back for a resume.

`DIR/checkpoint-NNNNNN/` holds `model.safetensors` (the whole model, tied weights once),
`optimizer.safetensors` (every optimizer state tensor as `STATE/PARAM-NAME/KEY`) and `state.json`
(step, losses so far, optimizer hyper-parameters, each rank's RNG state, the next data position and
the run's fingerprint). The folder is written under a temporary name and renamed; `DIR/latest.json`
is then replaced atomically to point at it, and older checkpoints are removed. A run killed at any
moment leaves the previous checkpoint whole and `latest.json` naming it.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

from lwdsl.errors import fail

LATEST = "latest.json"


def _flatten_optimizer(optim_sd: dict) -> tuple[dict, list]:
    tensors = {}
    for name, states in optim_sd.get("state", {}).items():
        for key, value in states.items():
            tensors[f"STATE/{name}/{key}"] = value.detach().reshape(value.shape).contiguous().cpu()
    return tensors, optim_sd.get("param_groups", [])


def _unflatten_optimizer(tensors: dict, groups: list) -> dict:
    state: dict = {}
    for full, value in tensors.items():
        _, name, key = full.split("/", 2)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": groups}


def _dedup(model_sd: dict) -> dict:
    """One copy of tensors that share storage (tied embeddings): safetensors refuses aliases."""
    seen, kept = set(), {}
    for name, value in model_sd.items():
        tensor = value.detach().cpu()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        kept[name] = tensor.contiguous()
    return kept


def save(out_dir: Path, step: int, model_sd: dict, optim_sd: dict, state: dict, keep: int = 1) -> Path:
    """Write checkpoint `step` under `out_dir` atomically; returns its folder."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"checkpoint-{step:06d}"
    partial = out_dir / f".checkpoint-{step:06d}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    save_file(_dedup(model_sd), str(partial / "model.safetensors"))
    tensors, groups = _flatten_optimizer(optim_sd)
    save_file(tensors, str(partial / "optimizer.safetensors"))
    (partial / "state.json").write_text(json.dumps({**state, "step": step, "param_groups": groups}, indent=1))
    for path in partial.iterdir():  # on disk before the rename makes it visible
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(partial, final)
    pointer = out_dir / f".{LATEST}.{os.getpid()}"
    pointer.write_text(json.dumps({"checkpoint": final.name, "step": step}))
    os.replace(pointer, out_dir / LATEST)
    older = sorted(p for p in out_dir.glob("checkpoint-*") if p.name < final.name)
    for path in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)
    for stale in out_dir.glob(".checkpoint-*.partial-*"):  # left by a killed run
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    return final


def latest(out_dir: Path) -> Path | None:
    """The checkpoint `latest.json` names, or None for a fresh run."""
    pointer = out_dir / LATEST
    if not pointer.is_file():
        return None
    try:
        folder = out_dir / json.loads(pointer.read_text())["checkpoint"]
    except (ValueError, KeyError) as error:
        raise fail("E802", f"{pointer} is not a checkpoint pointer ({error})",
                   hint="remove the output folder, or name another one with -o") from None
    if not (folder / "state.json").is_file():
        raise fail("E802", f"{pointer} names {folder.name}, which is missing or incomplete",
                   hint="remove the output folder, or name another one with -o")
    return folder


def load(folder: Path) -> tuple[dict, dict, dict]:
    """(model state, optimizer state with names, state.json) of a checkpoint folder."""
    from safetensors.torch import load_file

    state = json.loads((folder / "state.json").read_text())
    model_sd = load_file(str(folder / "model.safetensors"))
    optim_sd = _unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), state["param_groups"])
    return model_sd, optim_sd, state


def encode_rng(tensor) -> str:
    return base64.b64encode(bytes(tensor.numpy().tobytes())).decode("ascii")


def decode_rng(text: str):
    import torch

    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()

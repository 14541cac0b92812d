"""What an exporter reads: an artifact folder's manifest, config and stored tensors, and each layer's
weight either in its stored form (codes, scales, offsets) or as the float32 matrix it stands for.

Reads the files directly (no model is built), resident and disk-offloaded tensors alike.

    view = read_view("out/edge")
    view.record("model.layers.0.mlp.down_proj").format        # QuantFormat(int4, group=32, ...)
    view.float_weight("model.layers.0.mlp.down_proj")         # torch.float32 [576, 1152]
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lwdsl.apply.records import LayerRecord
from lwdsl.artifact import MANIFEST_FILE, OFFLOAD_FILE, WEIGHTS_FILE, Manifest, read_manifest
from lwdsl.errors import fail


@dataclass
class ArtifactView:
    directory: Path
    manifest: Manifest
    config: dict
    tensors: dict = field(repr=False)  # every stored tensor by its state-dict key

    @property
    def blocks(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def head_dim(self) -> int:
        return int(self.config.get("head_dim") or self.config["hidden_size"] // self.config["num_attention_heads"])

    def record(self, name: str) -> LayerRecord | None:
        return self.manifest.layers.get(name)

    def module_tensors(self, name: str) -> dict:
        prefix = name + "."
        return {key[len(prefix):]: value for key, value in self.tensors.items() if key.startswith(prefix)}

    def float_weight(self, name: str):
        """The float32 weight `[out, in]` a linear layer stands for (dequantized, 2:4 made dense)."""
        import torch

        from lwdsl.artifact import build_module

        if name == "lm_head" and self.manifest.tied_embeddings:
            name = "model.embed_tokens"
        record = self.record(name)
        if record is None or record.kind in ("linear", "embedding"):
            return self.tensors[name + ".weight"].float()
        module = build_module(record, self.module_tensors(name))
        with torch.no_grad():
            if hasattr(module, "dense_weight"):
                return module.dense_weight().float()
            return module.dequantized_weight().float()

    def layer_width(self, index: int) -> int:
        """The MLP intermediate width of block `index` as stored (after channel pruning)."""
        record = self.record(f"model.layers.{index}.mlp.gate_proj")
        if record is not None:
            return record.shape[0]
        return int(self.tensors[f"model.layers.{index}.mlp.gate_proj.weight"].shape[0])

    def layer_heads(self, index: int) -> tuple[int, int]:
        """(query heads, kv heads) of block `index` as stored (after head pruning)."""
        rows = []
        for proj in ("q_proj", "k_proj"):
            record = self.record(f"model.layers.{index}.self_attn.{proj}")
            rows.append(record.shape[0] if record is not None
                        else int(self.tensors[f"model.layers.{index}.self_attn.{proj}.weight"].shape[0]))
        return rows[0] // self.head_dim, rows[1] // self.head_dim


def read_view(directory) -> ArtifactView:
    """The artifact at `directory`; E641 when it is not one, E680 when it is sharded data we cannot read."""
    from safetensors import safe_open

    directory = Path(directory)
    if not directory.is_dir():
        raise fail("E641", f"{directory} is not an lwdsl artifact folder (no such folder)",
                   hint="write one with `lwdsl apply PLAN -o DIR`")
    manifest = read_manifest(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise fail("E641", f"{directory}: no readable config.json ({error})") from None
    tensors = {}
    for name in (WEIGHTS_FILE, OFFLOAD_FILE):
        path = directory / name
        if not path.is_file():
            if name == WEIGHTS_FILE:
                raise fail("E641", f"{directory}: {WEIGHTS_FILE} is missing", hint=f"{MANIFEST_FILE} alone is not an artifact")
            continue
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    tensors[key] = handle.get_tensor(key)
        except Exception as error:  # safetensors raises its own error types
            raise fail("E641", f"{path}: unreadable weights: {error}") from None
    return ArtifactView(directory, manifest, config, tensors)

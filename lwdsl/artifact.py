"""The artifact: a folder that `lwdsl.load` turns back into a runnable model.

    DIR/manifest.json        plan hash, solution, predictions, what each layer became, versions
    DIR/model.safetensors    resident weights: packed codes + scales (+ offsets), float weights, norms
    DIR/offload.safetensors  weights of disk-offloaded layers, streamed at run time (when any)
    DIR/config.json, tokenizer files

Written atomically: everything goes to a temporary folder next to DIR (`.DIR.partial-PID-...`),
renamed into place at the end; a killed write leaves no DIR, and the next write clears the stale
temporary folder. An existing DIR is replaced only when it is an lwdsl artifact.

    save_artifact(model, tokenizer, "out/smollm2-int4", solution=solution, plan_hash=...)
    model = load("out/smollm2-int4")
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from lwdsl import __version__
from lwdsl.apply.records import LayerRecord
from lwdsl.errors import fail
from lwdsl.solution import Predicted, QuantFormat, Solution

SCHEMA_VERSION = "lwdsl.artifact/1"
WEIGHTS_FILE, OFFLOAD_FILE, MANIFEST_FILE = "model.safetensors", "offload.safetensors", "manifest.json"


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: str = SCHEMA_VERSION
    plan_name: str = ""
    plan_hash: str = ""
    source_model: str = ""
    source_hash: str = ""  # sha256 of the source weights file(s)
    solution: Solution | None = None
    predicted: Predicted = Field(default_factory=Predicted)
    layers: dict[str, LayerRecord] = Field(default_factory=dict)
    kv_format: QuantFormat = Field(default_factory=QuantFormat)
    tensor_parallel: int = 1
    pipeline_stages: list[str] = Field(default_factory=list)
    tied_embeddings: bool = False
    resident_bytes: int = 0  # tensor bytes in model.safetensors
    offloaded_bytes: int = 0  # tensor bytes in offload.safetensors
    versions: dict[str, str] = Field(default_factory=dict)


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    import safetensors
    import torch
    import transformers

    return {"lwdsl": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__}


def split_state(model) -> tuple[dict, dict, bool]:
    """(resident tensors, offloaded tensors, tied): the state dict split by each module's storage,
    the tied head dropped (it is the embedding), every tensor contiguous and unshared."""
    state = model.state_dict()
    head, embedding = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    tied = head is not None and embedding is not None and head.data_ptr() == embedding.data_ptr()
    if tied:
        del state["lm_head.weight"]
    offloaded = [n for n, m in model.named_modules() if getattr(m, "lwdsl_offload", None) == "disk"]
    resident, streamed, seen = {}, {}, set()
    for key, tensor in state.items():
        tensor = tensor.detach().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            tensor = tensor.clone()
        seen.add(pointer)
        owner = next((n for n in offloaded if key.startswith(n + ".")), None)
        (streamed if owner else resident)[key] = tensor
    return resident, streamed, tied


def _clear_stale(parent: Path, name: str) -> None:
    """Remove temporary folders of earlier writes whose process is gone."""
    for stale in parent.glob(f".{name}.partial-*"):
        try:
            pid = int(stale.name.split("partial-", 1)[1].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def save_artifact(model, tokenizer, directory, *, solution: Solution | None = None, plan_hash: str = "",
                  source_model: str = "", source_hash: str = "",
                  progress: Callable[[str], None] | None = None) -> Path:
    """Write `model` (as `apply_solution` left it) to `directory`, atomically; returns the folder."""
    from safetensors.torch import save_file

    target = Path(directory).resolve()
    if target.exists() and not (target / MANIFEST_FILE).is_file():
        raise fail("E640", f"{target} exists and is not an lwdsl artifact; not overwriting it",
                   hint="choose another -o folder or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(target.parent, target.name)
    partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-{os.getpid()}-"))
    try:
        resident, streamed, tied = split_state(model)
        _note(progress, "weights")
        save_file(resident, str(partial / WEIGHTS_FILE), metadata={"format": "pt"})
        if streamed:
            _note(progress, "offloaded weights")
            save_file(streamed, str(partial / OFFLOAD_FILE), metadata={"format": "pt"})
        model.config.save_pretrained(partial)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        layers = getattr(model, "lwdsl_layers", {})
        manifest = Manifest(
            plan_name=solution.plan_name if solution else "", plan_hash=plan_hash,
            source_model=source_model, source_hash=source_hash, solution=solution,
            predicted=solution.predicted if solution else Predicted(), layers=layers,
            kv_format=solution.kv_format if solution else QuantFormat(),
            tensor_parallel=solution.tensor_parallel if solution else 1,
            pipeline_stages=list(solution.pipeline_stages) if solution else [], tied_embeddings=tied,
            resident_bytes=sum(t.numel() * t.element_size() for t in resident.values()),
            offloaded_bytes=sum(t.numel() * t.element_size() for t in streamed.values()),
            versions=_versions())
        (partial / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
        partial.chmod(0o755)
        _note(progress, "rename")
        _install(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def _install(partial: Path, target: Path) -> None:
    if not target.exists():
        os.replace(partial, target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    os.replace(target, old)
    os.replace(partial, target)
    shutil.rmtree(old, ignore_errors=True)


def _note(progress, what: str) -> None:
    if progress is not None:
        progress(what)


def read_manifest(directory) -> Manifest:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise fail("E641", f"{directory} is not an lwdsl artifact (no {MANIFEST_FILE})",
                   hint="write one with `lwdsl apply PLAN -o DIR`")
    try:
        return Manifest.model_validate_json(path.read_text())
    except ValueError as error:
        raise fail("E641", f"{path}: unreadable manifest: {error}") from None


def build_module(record: LayerRecord, tensors: dict):
    """The module a record describes, made from its stored tensors (keys relative to the module)."""
    import torch
    from torch import nn

    from lwdsl.apply.kernels import Packed
    from lwdsl.apply.prune import Sparse24Linear
    from lwdsl.apply.quantize import CastLinear, QuantizedLinear
    from lwdsl.cost.formats import VALUE_BITS

    out_features, in_features = record.shape
    bias = tensors.get("bias")
    if record.kind == "linear":
        module = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        module.load_state_dict(tensors, assign=True)
        return module.requires_grad_(False)
    if record.kind == "cast":
        return CastLinear(tensors["weight"], record.format, bias)
    if record.kind == "quantized":
        fmt = record.format
        levels = fmt.dtype if fmt.dtype in ("nf4", "fp8") else "linear"
        packed = Packed(tensors["codes"], tensors["scale"], tensors.get("offset"), VALUE_BITS[fmt.dtype],
                        fmt.group, levels, in_features)
        return QuantizedLinear(packed, out_features, fmt, bias)
    if record.kind == "sparse24":
        inner = record.model_copy(update={"kind": record.values_kind, "shape": (out_features, in_features // 2),
                                          "values_kind": None})
        values = build_module(inner, {k[7:]: v for k, v in tensors.items() if k.startswith("values.")})
        module = Sparse24Linear(values, tensors["meta"], in_features, bias)
        return module
    raise fail("E642", f"{record.name}: cannot rebuild a {record.kind} layer")


def _take(tensors: dict, name: str) -> dict:
    prefix = name + "."
    return {key[len(prefix):]: tensors.pop(key) for key in [k for k in tensors if k.startswith(prefix)]}


def load(directory, device: str = "cpu"):
    """The runnable model of an artifact folder (`model.lwdsl_manifest` holds its manifest).

    Built on the meta device from the config, each recorded layer replaced by its stored class and
    shape, then filled from `model.safetensors` (one read per tensor); disk-offloaded layers stream
    from `offload.safetensors`. With a `device` other than the CPU, the model moves there and layers
    stored in host memory stay in (pinned) host memory, streamed per block like the disk ones; on the
    CPU they are simply resident. Under `torchrun` with a sharded solution, each rank keeps its shard.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    manifest = read_manifest(directory)
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    records = manifest.layers
    target = torch.device(device)
    tensors = _read_all(directory / WEIGHTS_FILE)
    host = {n: _take(tensors, n) for n, r in records.items() if r.storage == "host" and target.type != "cpu"}
    for name, record in records.items():
        if record.kind == "embedding" or record.storage == "disk" or name in host:
            continue
        if manifest.tied_embeddings and name == "lm_head" and record.kind == "linear":
            continue  # a kept tied head is the embedding itself: tied again below, nothing stored
        _set(model, name, build_module(record, _take(tensors, name)))
    result = model.load_state_dict(tensors, strict=False, assign=True)
    streamed = [n for n, r in records.items() if r.storage == "disk" or n in host]
    built = {n for n, r in records.items() if r.kind != "embedding"}
    missing = [k for k in result.missing_keys
               if k.rsplit(".", 1)[0] not in built and not k.startswith(tuple(n + ".values." for n in built)) and not (manifest.tied_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise fail("E642", f"{directory}: weights do not match the manifest (missing {missing[:3]}, "
                   f"unexpected {result.unexpected_keys[:3]})")
    if manifest.tied_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "rotary_emb"):
        inner.rotary_emb = type(inner.rotary_emb)(config=config)
    if target.type != "cpu":
        model.to(target)
    if streamed:
        _stream(model, directory, records, streamed, target, host)
    _attention_groups(model)
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftover:
        raise fail("E643", f"{directory}: no weights for {leftover[:3]}")
    if manifest.tensor_parallel > 1:
        from lwdsl.apply import shard

        if shard.world() > 1:
            shard.shard_model(model, shard.rank(), shard.world())
    model.eval()
    model.__dict__["lwdsl_manifest"] = manifest
    return model


def _read_all(path: Path) -> dict:
    """Every tensor of a safetensors file, read into fresh memory (not a memory map).

    Mapped pages would count in the resident set next to any copy, and integer kernels (torch's
    int8pack) crash on codes that sit at a file offset not aligned to 64 bytes; fresh tensors avoid both.
    """
    from lwdsl.apply.offload import TensorFile

    file = TensorFile(path)
    try:
        return {key: file.read(key) for key in file.keys()}
    finally:
        file.close()


def load_tokenizer(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(directory))


def _set(model, name: str, module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _attention_groups(model) -> None:
    """Pruned attention: the query heads per kv head, from the live projection sizes."""
    for module in model.modules():
        if hasattr(module, "num_key_value_groups") and hasattr(module, "q_proj"):
            module.num_key_value_groups = module.q_proj.out_features // module.k_proj.out_features


def _stream(model, directory: Path, records, streamed: list[str], device, host: dict) -> None:
    """Streamed layers: disk ones read from the offload file, host ones from pinned host memory."""
    import torch

    from lwdsl.apply import offload

    disk = offload.TensorFile(directory / OFFLOAD_FILE) if (directory / OFFLOAD_FILE).is_file() else None
    pin = torch.cuda.is_available()
    pinned = {n: {k: v.pin_memory() if pin else v for k, v in t.items()} for n, t in host.items()}

    def tensors_of(name):
        return pinned[name] if name in pinned else offload.module_tensors(disk, name)

    def build(name, tensors):
        return build_module(records[name], tensors)

    shapes = {n: records[n].shape for n in streamed}
    offload.attach_streaming(model, streamed, shapes, tensors_of, build, device)

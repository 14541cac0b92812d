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
from collections.abc import Callable, Mapping
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
    pipeline_stages: list[str] = Field(default_factory=list)  # plan device of each block, in block order
    pipeline_io: str = ""  # plan device of the embedding, final norm and head ("": the first stage's)
    stage_devices: dict[str, str] = Field(default_factory=dict)  # plan device -> torch device ("cuda:1")
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
                  source_model: str = "", source_hash: str = "", device_kinds: Mapping[str, str] | None = None,
                  progress: Callable[[str], None] | None = None) -> Path:
    """Write `model` (as `apply_solution` left it) to `directory`, atomically; returns the folder.

    `device_kinds` (plan device name -> "cpu" | "gpu" | "disk", in declaration order) turns the
    solution's pipeline stages into torch devices for the manifest (`stage_devices`), which `load`
    places the blocks by; a pipeline over more than one device needs it.
    """
    from safetensors.torch import save_file

    from lwdsl.apply.offload import write_tensor_file

    target = Path(directory).resolve()
    if target.exists() and not (target / MANIFEST_FILE).is_file():
        raise fail("E640", f"{target} exists and is not an lwdsl artifact; not overwriting it",
                   hint="choose another -o folder or remove it")
    stage_devices, pipeline_io = pipeline_devices(solution, device_kinds or {})
    target.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(target.parent, target.name)
    partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-{os.getpid()}-"))
    try:
        resident, streamed, tied = split_state(model)
        _note(progress, "weights")
        save_file(resident, str(partial / WEIGHTS_FILE), metadata={"format": "pt"})
        if streamed:
            _note(progress, "offloaded weights")
            write_tensor_file(streamed, partial / OFFLOAD_FILE, metadata={"format": "pt"})
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
            pipeline_stages=list(solution.pipeline_stages) if solution else [], pipeline_io=pipeline_io,
            stage_devices=stage_devices, tied_embeddings=tied,
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


def pipeline_devices(solution: Solution | None, kinds: Mapping[str, str]) -> tuple[dict[str, str], str]:
    """(plan device -> torch device for every pipeline stage and the embedding's device, that device).

    The embedding and head are one unit to the solver, placed on a compute device of their own
    (`LayerChoice.compute_device` of `model.embed_tokens` / `lm_head`); without them in the solution
    they go with the first block. A stage whose kind is unknown is E648 when the stages span several
    devices (the artifact could not be placed), else the single device is left unrecorded.
    """
    from lwdsl.placement import torch_devices

    if solution is None or not solution.pipeline_stages:
        return {}, ""
    stages = solution.pipeline_stages
    io = next((c.compute_device for c in solution.layers
               if c.name in ("model.embed_tokens", "lm_head") and c.compute_device), stages[0])
    names = list(dict.fromkeys((*stages, io)))
    known = torch_devices(kinds)
    unknown = [n for n in names if n not in known]
    if unknown and len(names) > 1:
        raise fail("E648", f"the solution's pipeline runs on {', '.join(names)}, but the kind of "
                   f"{', '.join(unknown)} is not known, so no torch device can be recorded for it",
                   hint="pass device_kinds (the plan's device name -> cpu | gpu | disk) to save_artifact")
    return ({} if unknown else {n: known[n] for n in names}), io


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


def load(directory, device: str | None = None):
    """The runnable model of an artifact folder (`model.lwdsl_manifest` holds its manifest).

    Built on the meta device from the config, each recorded layer replaced by its stored class and
    shape, then filled from `model.safetensors` (one read per tensor); disk-offloaded layers stream
    from `offload.safetensors`. Layers stored in host memory whose block computes off the CPU stay in
    (pinned) host memory, streamed per block like the disk ones; on the CPU they are simply resident.
    Under `torchrun` with a sharded solution, each rank keeps its shard.

    Where it runs: a manifest whose pipeline stages name more than one torch device places each block
    where the solver put it (`shard.place_pipeline`); E647 before anything is read when one of those
    devices is not on this machine. Otherwise everything is on the CPU. An explicit `device` puts
    everything there instead, and `model.lwdsl_placement.note` says the manifest's placement was
    overridden.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    manifest = read_manifest(directory)
    from lwdsl.apply.native import carry_prefill_dtypes

    carry_prefill_dtypes(manifest.solution.prefill_dtypes if manifest.solution is not None else {})
    config = AutoConfig.from_pretrained(directory)
    placement = _placement(manifest, device, config.num_hidden_layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    records = manifest.layers
    target = torch.device(device or "cpu")

    def device_of(name: str) -> torch.device:
        """Where a layer computes: its block's device in a pipeline, else the target."""
        if placement is None or device is not None:
            return target
        parts = name.split(".")
        block = int(parts[2]) if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() else None
        return torch.device(placement.io if block is None else placement.blocks[block])

    tensors = _read_all(directory / WEIGHTS_FILE)
    host = {n: _take(tensors, n) for n, r in records.items() if r.storage == "host" and device_of(n).type != "cpu"}
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
    _rebuild_buffers(model)
    if target.type != "cpu":
        model.to(target)
    if streamed:
        _stream(model, directory, records, streamed, device_of, host)
    _attention_groups(model)
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftover:
        raise fail("E643", f"{directory}: no weights for {leftover[:3]}")
    if manifest.tensor_parallel > 1:
        from lwdsl.apply import shard

        if shard.world() > 1:
            shard.shard_model(model, shard.rank(), shard.world())
    if placement is not None and device is None:
        from lwdsl.apply.shard import place_pipeline

        place_pipeline(model, list(placement.blocks), placement.io)
    elif placement is not None:
        model.__dict__["lwdsl_placement"] = placement
    _serve_on_gpu(model, placement)
    model.eval()
    model.__dict__["lwdsl_manifest"] = manifest
    return model


def _rebuild_buffers(model) -> None:
    """Buffers that are not saved (`persistent=False`) and that the meta construction left empty, made
    again from what their module keeps: Gemma 3's embedding scale (`scalar_embed_scale`)."""
    import torch

    for module in model.modules():
        scale = getattr(module, "embed_scale", None)
        if isinstance(scale, torch.Tensor) and scale.is_meta and hasattr(module, "scalar_embed_scale"):
            module.embed_scale = torch.tensor(float(module.scalar_embed_scale))


def _placement(manifest: Manifest, device: str | None, layers: int):
    """The manifest's pipeline in torch devices when it spans more than one (E647 when one is not on
    this machine), the caller's `device` for everything when given, else None (all on the CPU)."""
    from lwdsl.placement import Placement, describe_runs

    stages, known = manifest.pipeline_stages, manifest.stage_devices
    blocks = [known.get(s) for s in stages]
    io = known.get(manifest.pipeline_io or (stages[0] if stages else ""))
    if stages and known and (None in blocks or io is None):
        missing = sorted({s for s in (*stages, manifest.pipeline_io) if s and s not in known})
        raise fail("E648", f"the manifest's pipeline names {', '.join(missing)} but records no torch device "
                   f"for it", hint="apply the plan again (`lwdsl apply PLAN -o DIR`)")
    planned = Placement(tuple(blocks), io) if stages and known else None
    if device is not None:
        try:
            exists = _device_exists(device)
        except RuntimeError:  # not a device string torch knows
            exists = False
        if not exists:
            raise fail("E649", f"device {device!r} is not a device of this machine ({_machine_devices()})",
                       hint="e.g. `cpu`, or `cuda:0` where CUDA is")
        overridden = planned is not None and planned.pipelined
        note = (f"overridden by device={device} (the manifest places {describe_runs(planned.blocks)}; "
                f"embedding and head on {planned.io})") if overridden else f"device={device}"
        return Placement((device,) * layers, device, note)
    if planned is None or (not planned.pipelined and _device_type(planned.io) == "cpu"):
        return None
    absent = sorted(d for d in planned.devices if not _device_exists(d))
    if absent and not planned.pipelined:  # one GPU: the serving executor's device
        plan_names = sorted(s for s, t in known.items() if t == planned.io)
        raise fail("E647", f"the artifact computes on {planned.io} (plan device {', '.join(plan_names)}), which "
                   f"this machine does not have ({_machine_devices()})",
                   hint="load it on a machine with that device, or solve and apply the plan again for this "
                        "target (`lwdsl run DIR --device cpu` runs it here as it is)")
    if absent:
        plan_names = {d: sorted({s for s, t in known.items() if t == d}) for d in absent}
        which = " and ".join(f"{d} (plan device {', '.join(plan_names[d])})" for d in absent)
        raise fail("E647", f"the artifact's pipeline needs {which}, which this machine does not have "
                   f"({_machine_devices()}); it places {describe_runs(planned.blocks)}, the embedding and "
                   f"head on {planned.io}",
                   hint="load it on a machine with those devices, or solve and apply the plan again for "
                        "this target (from Python, `load(DIR, device=...)` puts everything on one device)")
    return planned


def _device_type(name: str) -> str:
    import torch

    return torch.device(name).type


def _serve_on_gpu(model, placement) -> None:
    """A model placed whole on one CUDA device computes with the serving executor's kernels: its
    stored weights are converted to them now, once (`lwdsl.runtime.serve.executor.convert`)."""
    import torch

    if placement is None or placement.pipelined or _device_type(placement.io) != "cuda" \
            or "lwdsl_streamer" in model.__dict__:  # streamed blocks: the lean loop, as before
        return
    from lwdsl.runtime.serve.executor import ACTIVATION, convert

    convert(model, torch.device(placement.io), ACTIVATION["cuda"])


def _device_exists(name: str) -> bool:
    import torch

    device = torch.device(name)
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):
        return False
    return True


def _machine_devices() -> str:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"{count} CUDA device{'s' if count != 1 else ''}" if count else "no CUDA device"


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


def _stream(model, directory: Path, records, streamed: list[str], device_of, host: dict) -> None:
    """Streamed layers: disk ones read from the offload file, host ones from pinned host memory; one
    streamer per computing device (a pipeline streams each block to its own)."""
    import torch

    from lwdsl.apply import offload

    file = directory / OFFLOAD_FILE
    disk = offload.TensorFile(file, direct=True, pool=offload.BufferPool()) if file.is_file() else None
    pin = torch.cuda.is_available()
    pinned = {n: {k: v.pin_memory() if pin else v for k, v in t.items()} for n, t in host.items()}

    def tensors_of(names):
        on_disk = [n for n in names if n not in pinned]
        read = offload.unit_tensors(disk, on_disk) if on_disk else {}
        return {n: pinned[n] if n in pinned else read[n] for n in names}

    def build(name, tensors):
        return build_module(records[name], tensors)

    shapes = {n: records[n].shape for n in streamed}
    by_device: dict = {}
    for name in streamed:
        by_device.setdefault(device_of(name), []).append(name)
    for device, names in by_device.items():
        offload.attach_streaming(model, names, shapes, tensors_of, build, device)

"""The measuring child process: `python -m lwdsl.verify.worker < request.json`.

Reads one request (see `memory.measure_isolated`), records the memory floor, loads the model,
runs the workload with timing, and prints one JSON line: memory above the floor per device kind and
the latency figures. Nothing else of the checker lives in this process.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _kv_format(artifact: Path):
    """The KV-cache format the solution chose, from the artifact's manifest (None: fp32)."""
    from lwdsl.solution import QuantFormat

    try:
        solution = json.loads((artifact / "manifest.json").read_text()).get("solution") or {}
    except (OSError, ValueError):
        return None
    kv = solution.get("kv_format")
    return QuantFormat.model_validate(kv) if kv else None


def _load(spec: dict):
    """`(model, kv_format)` for an artifact folder or the original model."""
    if spec["kind"] == "artifact":
        import lwdsl.artifact

        loaded = lwdsl.artifact.load(spec["path"])
        return (loaded[0] if isinstance(loaded, tuple) else loaded), _kv_format(Path(spec["path"]))
    from lwdsl import ast
    from lwdsl.models.load import load_model

    block = ast.ModelBlock.model_validate(spec["block"])
    model, _tokenizer = load_model(block, Path(spec["base_dir"]))
    return model, None


def _read_sampler(model, meter):
    """A streaming-read sample as the probe measures `bandwidth_Bps` (`probe.cpu_read_Bps`, over a
    buffer as large as the probe's, allocated and freed, kept out of the memory peak), for a model that
    computes on the CPU; None for one on a GPU or where the peak cannot exclude the buffer. The same
    size, or the ratio of the two rates compares a cached read with a partly cached one: a 128 MiB
    sample read 48-53 GB/s from a Xeon host's 480 MiB L3 where the probe's 256 MiB read 37-39, and
    the token latency "at the run's bandwidth" came out 25-35% fast."""
    import torch

    if not meter.resets or any(p.device.type != "cpu" for p in model.parameters()):
        return None
    from lwdsl.hardware.probe import cpu_read_Bps

    return lambda: meter.exclude(lambda: cpu_read_Bps(budget_s=0.05))


def main() -> int:
    request = json.loads(sys.stdin.read())
    import torch

    from lwdsl.errors import LwdslError
    from lwdsl.verify.latency import measure_latency
    from lwdsl.verify.memory import PeakMemory

    meter = PeakMemory()
    try:
        model, kv_format = _load(request["model"])
    except LwdslError as error:
        for diagnostic in error.diagnostics:
            print(diagnostic.render(error.source), file=sys.stderr)
        return int(error.exit_code)
    loaded_bytes = meter.resident_above_floor()
    prompt = torch.tensor(request["prompt"], dtype=torch.long)
    timing = measure_latency(model, prompt, request["generate"], request["repeats"], request["warmup"],
                             kv_format, _read_sampler(model, meter))
    streamer = model.__dict__.get("lwdsl_streamer")  # disk offload: the rate its reads ran at
    stream = streamer.read_bytes / streamer.read_s if streamer is not None and streamer.read_s > 0 else None
    print(json.dumps({"memory": meter.peaks(), "floor_bytes": meter.floor_bytes, "loaded_bytes": loaded_bytes,
                      "latency": timing.to_dict(), "stream_read_Bps": stream}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

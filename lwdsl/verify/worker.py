"""The measuring child process: `python -m lwdsl.verify.worker < request.json`.

Reads one request (see `memory.measure_isolated`), records the memory floor, loads the model,
runs the workload with timing, and prints one JSON line: memory above the floor per device kind and
the latency figures. Nothing else of the checker lives in this process.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(spec: dict):
    if spec["kind"] == "artifact":
        import lwdsl.artifact

        loaded = lwdsl.artifact.load(spec["path"])
        return loaded[0] if isinstance(loaded, tuple) else loaded
    from lwdsl import ast
    from lwdsl.models.load import load_model

    block = ast.ModelBlock.model_validate(spec["block"])
    model, _tokenizer = load_model(block, Path(spec["base_dir"]))
    return model


def main() -> int:
    request = json.loads(sys.stdin.read())
    import torch

    from lwdsl.errors import LwdslError
    from lwdsl.verify.latency import measure_latency
    from lwdsl.verify.memory import PeakMemory

    meter = PeakMemory()
    try:
        model = _load(request["model"])
    except LwdslError as error:
        for diagnostic in error.diagnostics:
            print(diagnostic.render(error.source), file=sys.stderr)
        return int(error.exit_code)
    prompt = torch.tensor(request["prompt"], dtype=torch.long)
    timing = measure_latency(model, prompt, request["generate"], request["repeats"], request["warmup"])
    print(json.dumps({"memory": meter.peaks(), "floor_bytes": meter.floor_bytes,
                      "latency": timing.to_dict()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

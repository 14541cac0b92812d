"""Peak memory of a model alone, measured in a fresh process of its own.

The checker holds the original model, the evaluation text and its own libraries; none of that may
count against the artifact. So the measuring happens in a child process (`lwdsl.verify.worker`)
that imports torch and lwdsl, records its resident set (the *floor*: interpreter and libraries,
identical for every model), then loads the model and runs the workload. The figure reported is:

- CPU: peak resident set (the kernel's high-water mark `VmHWM`, reset at the floor, which no
  sampling can miss) minus the floor — the bytes the model itself made resident: weights, KV cache,
  activations, allocator slack.
- GPU: `torch.cuda.max_memory_allocated` per CUDA device, reset after the imports.

    >>> measure_isolated({"kind": "artifact", "path": "out/"}, prompt, generate=16)   # doctest: +SKIP
    {"memory": {"cpu": 123456789}, "latency": {...}, "floor_bytes": ...}
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from lwdsl.errors import ExitCode, fail

_ROOT = Path(__file__).resolve().parents[2]


def resident_bytes() -> int:
    """This process's resident set now."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_resident_bytes() -> int:
    """This process image's highest resident set so far.

    Linux: `VmHWM` of /proc/self/status, the kernel's high-water mark of this address space. Not
    `ru_maxrss`: Linux carries that across fork and exec, so a child of a large parent (the checker,
    holding the original model) would report the parent's peak. Elsewhere: `ru_maxrss`.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_peak() -> bool:
    """Restart the high-water mark from the current resident set (Linux `clear_refs` 5)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Floor at construction; `peaks()` after the work: bytes above the floor per device kind."""

    def __init__(self):
        import torch

        self.resets = reset_peak()
        self.floor_bytes = resident_bytes()
        self.carried_bytes = 0  # the highest resident set before the last `exclude` restarted the mark
        self.cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for index in range(self.cuda_devices):
            torch.cuda.reset_peak_memory_stats(index)

    def resident_above_floor(self) -> int:
        """Resident bytes above the floor now (after loading: the model at rest)."""
        return max(0, resident_bytes() - self.floor_bytes)

    def exclude(self, work):
        """`work()`'s result, its transient memory left out of the CPU peak: the high-water mark so far
        is kept, and the mark restarts once its buffers are freed (Linux only: None elsewhere)."""
        if not self.resets:
            return None
        self.carried_bytes = max(self.carried_bytes, peak_resident_bytes())
        result = work()
        reset_peak()
        return result

    def peaks(self) -> dict[str, int]:
        import torch

        peaks = {"cpu": max(0, max(self.carried_bytes, peak_resident_bytes()) - self.floor_bytes)}
        for index in range(self.cuda_devices):
            peaks[f"cuda:{index}"] = int(torch.cuda.max_memory_allocated(index))
        return peaks


def measure_isolated(model_spec: dict, prompt: list[list[int]], generate: int, repeats: int = 5,
                     warmup: int = 1, timeout_s: float = 1800.0) -> dict:
    """Load `model_spec` in a fresh process, run the workload, return its memory and timings.

    `model_spec` is `{"kind": "artifact", "path": DIR}` or
    `{"kind": "model", "block": <ModelBlock as JSON>, "base_dir": DIR}` (the original model).
    """
    request = {"model": model_spec, "prompt": prompt, "generate": generate,
               "repeats": repeats, "warmup": warmup}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
    try:
        done = subprocess.run([sys.executable, "-m", "lwdsl.verify.worker"], input=json.dumps(request),
                              capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise fail("E720", f"measuring the model took longer than {timeout_s:.0f} s",
                   exit_code=ExitCode.UNMET) from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-12:])
        if done.returncode == 2 and "error E" in tail:
            raise fail("E721", f"the model could not be loaded for measuring:\n{tail}")
        raise RuntimeError(f"measuring worker failed (exit {done.returncode}):\n{tail}")
    return json.loads(lines[-1])

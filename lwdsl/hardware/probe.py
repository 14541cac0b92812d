"""Measure this machine (`device ... "local"`, `lwdsl probe`): bandwidth, matmul rates, memory.

A few seconds in all: each figure is the best of repeated runs within a short time box.
- bandwidth: a streaming matrix-vector product over a buffer much larger than the caches (the
  access pattern of a decode step: every weight byte read once), and a streaming copy, reported as
  bytes read + written (STREAM's "copy" convention) for reference;
- row_efficiency: the streaming rate of batch-1 `linear` over layer-sized matrices by row length, as a
  fraction of the streaming read (short rows stream slower);
- rates: a square matmul per dtype (2·n³ FLOPs), `torch._int_mm` for int8 where torch has it;
- op_overhead_s: seconds per op of an eager decode step of a tiny transformers Llama (dispatch,
  Python, launch: what every op of a real decode step pays however small its tensors);
- prefill: what a prompt's forward runs, by prompt length (16-1024 rows), timed op by op in context
  through two synthetic Llama blocks of hidden 512 (one int4, one int8, as the lean loop runs them):
  the float32 matmul's FLOP/s over the skinny linears (16 rows run at about half the rate of 1024
  here, 80-95 vs 170-190 GFLOP/s), causal attention's FLOP/s, the bytes/s of the eager elementwise
  ops in between (norms, rotary, SiLU, residual adds), and the float32 bytes/s the native int8 / int4
  dequantization writes (int layers run a prefill as dequantize + float matmul; in bfloat16 where that
  is faster here, its matmul's FLOP/s and its activations' conversions' seconds a byte apart); each a
  median, the statistic `lwdsl check` reports time to first token by; about a second;
- fused: the native fused decode step's own figures (`lwdsl.runtime.fused`, CPU only, where it is
  built): the rate it streams fp32 / int8 / int4 weights at through whole synthetic blocks larger
  than the caches (`stream_Bps`), and its fixed costs per block (barriers, norms, a tiny attention)
  and per step (the call, the embedding row, the argmax);
- runtime_bytes: what the executor's runtime makes resident beside the weights (transformers and
  lwdsl's modules, model construction, a decode's allocator pools), measured in a fresh process
  above the same floor `lwdsl check` measures from (the interpreter with torch imported).
Cached as JSON under `$LWDSL_CACHE` (default `~/.cache/lwdsl`) in `probe.json`, one record per kind.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lwdsl.errors import LwdslError, Span, fail
from lwdsl.hardware.probe_eager import eager_figures
from lwdsl.hardware.probe_native import _fused_figures, _prefill_figures
from lwdsl.hardware.probe_timing import OpCounter, best_time

PROBE_FILE = "probe.json"
VERSION = 13  # figures a cached record must have been measured with (2: the fused decode step; 3: its median;
#               4: the prefill figures; 5: dequantization into a reused buffer; 6: fused rates over rounds;
#               7: the CPU's identity, int prefill in float32 and bfloat16; 8: fused rates by row length;
#               9: the prefill's attention in float32 and bfloat16; 10: the fused step's rate by
#               working set, its rates in and beyond the caches; 11: the eager step of the layouts the
#               fused step does not compute, `probe_eager`; 12: Gemma 3's fused block; 13: the int prefill
#               matmul's rate without its activations' conversions, priced apart by bytes)


def cache_dir() -> Path:
    return Path(os.environ.get("LWDSL_CACHE") or Path.home() / ".cache" / "lwdsl")


def default_cache_file() -> Path:
    return cache_dir() / PROBE_FILE




def _matmul_rate(torch, kernel, dtype, device, sync, n: int, budget_s: float) -> float:
    """FLOP/s of a square matmul, the best over sizes 512 and n. A slow path (fp16 on many CPUs) is
    only grown to n when one product of that size takes under half a second."""
    best = 0.0
    for size in (512, n):
        a = torch.ones(size, size, device=device, dtype=dtype)
        best = max(best, 2 * size**3 / best_time(lambda: kernel(a, a), sync, budget_s / 2))
        if 2 * n**3 / best > max(budget_s, 0.5):  # one product at n would not fit: keep the small figure
            break
    return best


ROW_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)  # fp32 values a row: 1 KiB .. 32 KiB


def _row_bandwidth(torch, device, sync, budget_s: float, chain_bytes: int = 64 << 20) -> dict[int, float]:
    """Bytes/s of batch-1 `linear` over a chain of weight matrices (each read once, as in a decode step),
    by row length: short rows stream slower (per-row start-up, prefetch ramp), which is why a model of
    hidden size 576 does not reach the long-stream rate."""
    import torch.nn.functional as F

    rates = {}
    for values in ROW_LENGTHS:
        rows = max(1, (4 << 20) // (values * 4))  # 4 MiB a matrix
        chain = [torch.ones(rows, values, device=device) for _ in range(chain_bytes // (rows * values * 4))]
        x = torch.ones(1, values, device=device)

        def read_all():
            for weight in chain:
                F.linear(x, weight)

        seconds = best_time(read_all, sync, budget_s / len(ROW_LENGTHS), warmup=1, min_runs=3)
        rates[values * 4] = len(chain) * rows * values * 4 / seconds
        del chain
    best = 0.0
    for row_bytes in sorted(rates):  # longer rows never stream slower: a running maximum drops the noise
        best = rates[row_bytes] = max(best, rates[row_bytes])
    return rates


def _eager_op_overhead(torch, device, sync, budget_s: float) -> float:
    """Seconds per op of an eager decode step through a tiny transformers Llama (4 blocks, hidden 16):
    the tensors are too small to cost anything, so the step time over its op count (counted with a
    dispatch mode) is what every op of a real decode step pays for dispatch, Python and launch."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).to(device).eval()
    with torch.inference_mode():
        prompt = torch.ones(1, 8, dtype=torch.long, device=device)
        cache = model(input_ids=prompt, past_key_values=DynamicCache(), use_cache=True).past_key_values
        token = torch.ones(1, 1, dtype=torch.long, device=device)

        def forward():
            model(input_ids=token, past_key_values=cache, use_cache=True)

        def step():
            forward()
            cache.crop(-1)  # back to 8 cached tokens: every timed step does the same work

        ops = OpCounter.count(torch, forward)
        cache.crop(-1)
        return best_time(step, sync, budget_s, warmup=10, min_runs=20) / ops


_RUNTIME_SCRIPT = """
import json, sys, psutil, torch
process = psutil.Process()
floor = process.memory_info().rss
from transformers import LlamaConfig, LlamaForCausalLM
import lwdsl.artifact, lwdsl.models.load
from lwdsl.runtime.generate import decode
config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=64, max_position_embeddings=512)
model = LlamaForCausalLM(config).eval().requires_grad_(False)
decode(model, torch.ones(1, 32, dtype=torch.long), 8)
if sys.argv[1:] == ["bf16"]:  # the prefill's bfloat16 paths (oneDNN's AMX / AVX512-BF16 kernels and caches)
    with torch.inference_mode():
        for rows, k, n in ((256, 576, 1536), (256, 1536, 576), (64, 896, 4864)):
            torch.nn.functional.linear(torch.randn(rows, k).bfloat16(), torch.randn(n, k).bfloat16())
        q, kv = torch.randn(1, 8, 256, 64).bfloat16(), torch.randn(1, 2, 256, 64).bfloat16()
        torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
try:  # freed heap glibc keeps (`lwdsl.runtime.heap`) is the transients', priced apart: not the runtime's
    import ctypes
    ctypes.CDLL(None).malloc_trim(0)
except (OSError, AttributeError):
    pass
print(json.dumps(max(0, process.memory_info().rss - floor)))
"""


def _runtime_bytes(kind: str, bf16: bool = False) -> int:
    """Resident bytes the runtime adds above the torch floor (a tiny model: its weights are ~0), with
    the prefill's bfloat16 kernels loaded where the probe chose them (`bf16`: ~7.5 MiB on a Xeon)."""
    import subprocess

    if kind != "cpu":
        return 0  # GPU memory is measured by the allocator, which the host runtime does not touch
    done = subprocess.run([sys.executable, "-c", _RUNTIME_SCRIPT] + (["bf16"] if bf16 else []),
                          capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])})
    if done.returncode != 0:
        raise fail("E403", f"the runtime-memory probe failed: {done.stderr.strip()[-400:]}")
    return int(json.loads(done.stdout.strip().splitlines()[-1]))


def _stream_matrix(torch, device, stream_bytes: int):
    rows = 8192
    return torch.ones(rows, stream_bytes // 4 // rows, device=device)


def _read_rate(torch, matrix, sync, budget_s: float) -> float:
    """Streaming read: bytes/s of a float32 matrix-vector product over `matrix` (best of runs)."""
    vector = torch.ones(matrix.shape[1], device=matrix.device)
    return matrix.numel() * 4 / best_time(lambda: torch.mv(matrix, vector), sync, budget_s)


CPU_STREAM_BYTES = 256 << 20  # the matrix `bandwidth_Bps` is read over on a CPU


def cpu_read_Bps(budget_s: float = 0.3, stream_bytes: int = CPU_STREAM_BYTES) -> float:
    """This CPU's streaming read now, measured as `measure` measures `bandwidth_Bps` (best of runs of a
    256 MB matrix-vector product): `lwdsl check` takes it around its timed runs, since a shared
    machine's memory bandwidth moves by tens of percent from one minute to the next."""
    import torch

    return _read_rate(torch, _stream_matrix(torch, torch.device("cpu"), stream_bytes), lambda: None, budget_s)


def runtime_threads() -> int:
    """The torch threads a fresh lwdsl process computes with (OMP_NUM_THREADS, else the physical cores,
    as torch chooses): what the probe measures at, whatever the calling process set for itself."""
    import psutil

    forced = os.environ.get("OMP_NUM_THREADS", "")
    return int(forced) if forced.isdigit() and int(forced) > 0 else (psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def measure(kind: str = "cpu", budget_s: float = 0.4) -> dict[str, Any]:
    """Run the probe on this machine's CPU (or first CUDA GPU, or the disk under the cache folder:
    `lwdsl.hardware.disk`) and return the figures, measured at the threads a fresh process uses (a
    test suite that runs one thread must not leave one-thread figures for every later plan)."""
    if kind == "disk":
        return _measure(kind, budget_s)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(runtime_threads())
    try:
        return _measure(kind, budget_s)
    finally:
        torch.set_num_threads(before)


def _measure(kind: str, budget_s: float) -> dict[str, Any]:
    if kind == "disk":
        from lwdsl.hardware.disk import measure_disk

        return {**measure_disk(cache_dir()), "version": VERSION, "load_average": os.getloadavg()[0],
                "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    import psutil
    import torch

    if kind == "gpu":
        if not torch.cuda.is_available():
            raise fail("E404", "device kind gpu with \"local\", but torch sees no CUDA GPU here")
        device, sync = torch.device("cuda"), torch.cuda.synchronize
        memory = torch.cuda.get_device_properties(0).total_memory
        name = torch.cuda.get_device_name(0)
        stream_bytes, n = 1 << 30, 4096
    else:
        device, sync = torch.device("cpu"), (lambda: None)
        memory = psutil.virtual_memory().total
        name = platform.processor() or platform.machine()
        stream_bytes, n = CPU_STREAM_BYTES, 1024

    matrix = _stream_matrix(torch, device, stream_bytes)
    read_Bps = _read_rate(torch, matrix, sync, budget_s)
    flat = matrix.view(-1)
    copy_target = torch.empty_like(flat)
    copy_Bps = 2 * flat.numel() * 4 / best_time(lambda: copy_target.copy_(flat), sync, budget_s)
    del matrix, flat, copy_target
    row_efficiency = {row_bytes: min(1.0, rate / read_Bps)
                      for row_bytes, rate in _row_bandwidth(torch, device, sync, budget_s).items()}

    rates: dict[str, float] = {}
    kernels = {"fp32": (torch.float32, torch.matmul), "bf16": (torch.bfloat16, torch.matmul),
               "fp16": (torch.float16, torch.matmul), "int8": (torch.int8, getattr(torch, "_int_mm", None))}
    for label, (dtype, kernel) in kernels.items():
        try:
            rates[label] = _matmul_rate(torch, kernel, dtype, device, sync, n, budget_s / 2)
        except (RuntimeError, TypeError, NotImplementedError):  # no such kernel on this device
            continue
    op_overhead_s = _eager_op_overhead(torch, device, sync, budget_s / 2)
    prefill = _prefill_figures(torch, budget_s, op_overhead_s) if kind == "cpu" else None
    fused = _fused_figures(torch, budget_s) if kind == "cpu" else None
    eager = eager_figures(torch) if kind == "cpu" else None
    return {
        "version": VERSION,
        "load_average": os.getloadavg()[0],  # other work on this machine while it was measured
        "kind": kind,
        "name": name,
        "memory_bytes": int(memory),
        "bandwidth_Bps": read_Bps,
        "copy_Bps": copy_Bps,
        "row_efficiency": row_efficiency,
        "rates": rates,
        "op_overhead_s": op_overhead_s,
        "prefill": prefill,
        "fused": fused,
        "eager": eager,
        "native": _native_build() if kind == "cpu" else None,
        "native_isa": _native_isa() if kind == "cpu" else None,
        "cpu": cpu_identity(),
        "runtime_bytes": _runtime_bytes(kind, bf16=any(
            "bf16" in (prefill or {}).get(key, {}).values() for key in ("int_dtype", "attention_dtype"))),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": f"measured by lwdsl probe on {platform.node()} ({name}, {torch.get_num_threads()} threads)",
    }


def _native_isa() -> str | None:
    from lwdsl.apply import native

    return native.loaded_level()


def _native_build() -> str:
    """Which native kernels this package would run (their build's hash): a probe of others is stale."""
    from lwdsl.apply import native

    return native.library_path().parent.name


def cached_prefill_dtype(cache_file: Path | None = None, key: str = "int_dtype") -> dict[int, str]:
    """The prefill dtype the cached probe of THIS CPU chose, by activation rows, for native int layers'
    matmul (`key` "int_dtype") or the attention core ("attention_dtype") (empty: no current record, or
    one measured on another CPU or with other kernels)."""
    record = read_cache(cache_file).get("cpu")
    if not record or record.get("version") != VERSION or record.get("cpu") != cpu_identity() \
            or record.get("native") != _native_build():
        return {}
    return {int(rows): name for rows, name in ((record.get("prefill") or {}).get(key) or {}).items()}


def cpu_identity() -> dict[str, Any]:
    from lwdsl.hardware.cpu import identity

    return identity()


def read_cache(cache_file: Path | None = None) -> dict[str, Any]:
    path = cache_file or default_cache_file()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(figures: dict[str, Any], cache_file: Path | None = None) -> Path:
    """Store one kind's figures next to the others, atomically."""
    path = cache_file or default_cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = read_cache(path)
    data[figures["kind"]] = figures
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=".probe-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
    os.replace(partial, path)
    if figures["kind"] == "cpu" and "lwdsl.apply.native" in sys.modules:  # its choices are read once a process
        sys.modules["lwdsl.apply.native"]._probed_prefill_dtypes.cache_clear()
    return path


def local_figures(kind: str, cache_file: Path | None = None, run_probe: bool = True,
                  span: Span | None = None) -> dict[str, Any]:
    """The cached figures of this machine for a device kind; probe (and cache) when there are none."""
    cached = read_cache(cache_file).get(kind)
    current = cached and cached.get("version") == VERSION and cached.get("cpu") == cpu_identity() \
        and (kind != "cpu" or cached.get("native") == _native_build())
    if cached and (current or not run_probe):
        return cached  # an older record, or one of other kernels, misses what runs now: measured again
    if not run_probe:
        raise fail("E405", f"no probe of this machine's {kind} in {cache_file or default_cache_file()}", span,
                   hint="run `lwdsl probe` first")
    try:
        figures = measure(kind)
    except OSError as error:  # the disk probe writes and reads a file in the cache folder
        raise fail("E406", f"cannot measure the local disk in {cache_dir()}: {error}", span,
                   hint="set LWDSL_CACHE to a writable folder on that disk, or write its bandwidth") from None
    except LwdslError as error:  # place it on the device line that asked for the probe
        raise fail(error.diagnostics[0].code, error.diagnostics[0].message, span) from None
    write_cache(figures, cache_file)
    return figures

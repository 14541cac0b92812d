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
  dequantization writes (int layers run a prefill as dequantize + float matmul); each a median, the
  statistic `lwdsl check` reports time to first token by; about a second;
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
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from lwdsl.errors import LwdslError, Span, fail

PROBE_FILE = "probe.json"
VERSION = 7  # figures a cached record must have been measured with (2: the fused decode step; 3: its median;
#               4: the prefill figures; 5: dequantization into a reused buffer; 6: fused rates over rounds;
#               7: the CPU's identity, int prefill in float32 and bfloat16)


def cache_dir() -> Path:
    return Path(os.environ.get("LWDSL_CACHE") or Path.home() / ".cache" / "lwdsl")


def default_cache_file() -> Path:
    return cache_dir() / PROBE_FILE


def _best_time(run: Callable[[], Any], sync: Callable[[], None], budget_s: float, warmup: int = 1,
               min_runs: int = 1) -> float:
    """The fastest of repeated runs within `budget_s` (after `warmup` untimed runs, at least `min_runs`)."""
    for _ in range(warmup):
        run()
    sync()
    best, start, runs = float("inf"), time.perf_counter(), 0
    while True:
        t0 = time.perf_counter()
        run()
        sync()
        best, runs = min(best, time.perf_counter() - t0), runs + 1
        if time.perf_counter() - start > budget_s and runs >= min_runs:
            return best


def _median_time(run: Callable[[], Any], budget_s: float, warmup: int = 2, min_runs: int = 10) -> float:
    """The median of repeated runs within `budget_s` (after `warmup` untimed runs, at least
    `min_runs`): the statistic `lwdsl check` reports a decode step by. On this shared VM the fastest
    of 40 fused steps streamed 5-28% faster than their median, which the gate then measured."""
    for _ in range(warmup):
        run()
    times, start = [], time.perf_counter()
    while True:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(times) >= min_runs:
            return statistics.median(times)


def _matmul_rate(torch, kernel, dtype, device, sync, n: int, budget_s: float) -> float:
    """FLOP/s of a square matmul, the best over sizes 512 and n. A slow path (fp16 on many CPUs) is
    only grown to n when one product of that size takes under half a second."""
    best = 0.0
    for size in (512, n):
        a = torch.ones(size, size, device=device, dtype=dtype)
        best = max(best, 2 * size**3 / _best_time(lambda: kernel(a, a), sync, budget_s / 2))
        if 2 * n**3 / best > max(budget_s, 0.5):  # one product at n would not fit: keep the small figure
            break
    return best


class _OpCounter:
    """Counts the aten ops a call dispatches (a TorchDispatchMode, built lazily: torch is imported late)."""

    @staticmethod
    def count(torch, call) -> int:
        from torch.utils._python_dispatch import TorchDispatchMode

        class Counter(TorchDispatchMode):
            ops = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                Counter.ops += 1
                return func(*args, **(kwargs or {}))

        with Counter():
            call()
        return Counter.ops


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

        seconds = _best_time(read_all, sync, budget_s / len(ROW_LENGTHS), warmup=1, min_runs=3)
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

        ops = _OpCounter.count(torch, forward)
        cache.crop(-1)
        return _best_time(step, sync, budget_s, warmup=10, min_runs=20) / ops


FUSED_ROW_LENGTHS = (512, 1024, 2048, 4096)  # hidden widths of the synthetic blocks
FUSED_CHAIN_BYTES = 128 << 20  # weights a timed step reads: four times a large last-level cache
FUSED_ROUNDS = 5  # interleaved rounds the fused stream rates are the median of


def _fused_model(torch, native, family: str, blocks: int, width: int, threads: int, max_len: int = 64):
    """A synthetic Llama-layout step for `native.llama_step`: hidden `width`, an MLP 8/3 as wide (the
    Llama proportion), constant codes (no model, no quantizer: a stream rate does not depend on the
    values). Returns the description, the tensors it points at, and the weight bytes a step reads."""
    import ctypes

    keep = []

    def tensor(*shape, dtype=torch.float32, value=0.01):
        t = torch.full(shape, value, dtype=dtype)
        keep.append(t)
        return t.data_ptr()

    def linear(rows: int, cols: int):
        if family == "int8":
            return native.LwLinear(1, rows, cols, 0, tensor(rows, cols, dtype=torch.int8, value=3),
                                   tensor(rows, dtype=torch.float16), None, None)
        if family == "int8g":  # int8 with a scale per 32 inputs (GGUF's Q8_0)
            return native.LwLinear(3, rows, cols, 32, tensor(rows, cols, dtype=torch.int8, value=3),
                                   tensor(rows, cols // 32, dtype=torch.float16), None, None)
        if family == "int4":
            return native.LwLinear(2, rows, cols, 32, tensor(rows, cols // 2, dtype=torch.uint8, value=0x37),
                                   tensor(rows, cols // 32, dtype=torch.float16),
                                   tensor(rows, cols // 32, dtype=torch.float16), None)
        return native.LwLinear(0, rows, cols, 0, tensor(rows, cols), None, None, None)

    head_dim, kv, inner = 64, max(1, width // 256), (width * 8 // 3 + 31) // 32 * 32
    table = (native.LwBlock * blocks)()
    weights = 0
    for b in range(blocks):
        before = len(keep)
        parts = dict(q=linear(width, width), k=linear(kv * head_dim, width), v=linear(kv * head_dim, width),
                     o=linear(width, width), gate=linear(inner, width), up=linear(inner, width),
                     down=linear(width, inner))
        weights += sum(t.numel() * t.element_size() for t in keep[before:])
        table[b] = native.LwBlock(**parts, input_norm=tensor(width), post_norm=tensor(width),
                                  keys=tensor(kv, max_len, head_dim), values=tensor(kv, max_len, head_dim),
                                  heads=width // head_dim, kv_heads=kv)
    described = native.LwModel(
        blocks=blocks, hidden=width, head_dim=head_dim, max_len=max_len, threads=threads, eps=1e-5,
        attention_scale=head_dim ** -0.5, cos=tensor(max_len, head_dim), sin=tensor(max_len, head_dim),
        final_norm=tensor(width), head=linear(64, width), block=ctypes.cast(table, ctypes.POINTER(native.LwBlock)),
        max_rows=inner, max_features=inner)
    keep.append(table)
    return described, keep, weights


def _fused_figures(torch, budget_s: float) -> dict[str, Any] | None:
    """The fused decode step's stream rate per weight family and row length, and its fixed costs per
    block and per step (None where the native library is not built)."""
    from lwdsl.apply import native

    if not native.available():
        return None
    threads = torch.get_num_threads()

    small = []
    for blocks in (2, 10):
        described, keep, _ = _fused_model(torch, native, "fp32", blocks, 64, threads)  # keep: what it points at
        small.append(_fused_step_s(torch, native, described, budget_s / 8))
    block_s = max(0.0, (small[1] - small[0]) / 8)
    fixed_s = max(0.0, small[0] - 2 * block_s)
    # every (family, width) once a round, the median over rounds: a burst on this shared machine that
    # slows a second of steps (one 0.1 s measurement of int4 read 17 GB/s between 25.3 and 26.1) then
    # moves one sample, not the figure
    samples: dict[tuple[str, int], list[float]] = {}
    for _ in range(FUSED_ROUNDS):
        for family in ("fp32", "int8", "int4", "int8g"):
            for width in FUSED_ROW_LENGTHS:
                samples.setdefault((family, width), []).append(
                    _stream_rate(torch, native, family, width, threads, budget_s / 6, fixed_s, block_s))
    stream = {family: {width: statistics.median(samples[family, width]) for width in FUSED_ROW_LENGTHS}
              for family in ("fp32", "int8", "int4", "int8g")}
    return {"stream_Bps": stream, "block_s": block_s, "step_s": fixed_s, "threads": threads}


def _fused_step_s(torch, native, described, budget_s: float) -> float:
    hidden = torch.zeros(described.hidden)

    def run():  # what `Fused.step` does around the call
        native.llama_step(described, hidden.clone(), 16, torch.empty(described.head.N))
    return _median_time(run, budget_s)


def _stream_rate(torch, native, family: str, width: int, threads: int, budget_s: float, fixed_s: float,
                 block_s: float) -> float:
    """Bytes/s the fused step streams `family` weights of `width` inputs at (synthetic blocks holding
    `FUSED_CHAIN_BYTES`), its fixed costs per step and block taken off."""
    one = _fused_model(torch, native, family, 1, width, threads)[2]
    blocks = max(1, FUSED_CHAIN_BYTES // one)
    described, keep, weights = _fused_model(torch, native, family, blocks, width, threads)  # keep: pointed at
    seconds = _fused_step_s(torch, native, described, budget_s)
    # the fixed costs never take more than half a step of ~100 MB of weights: a step they would
    # outweigh was measured while this machine was busy, and the bytes still set it
    seconds -= min(fixed_s + blocks * block_s, seconds / 2)
    del described, keep
    return weights / seconds


PREFILL_ROWS = (16, 64, 256, 1024)  # prompt tokens the prefill figures are measured at (from DEQUANT_ROWS)
PREFILL_HIDDEN = 512  # the synthetic blocks: heads of 64, a quarter as many kv heads, an MLP 8/3 as wide
PREFILL_FAMILIES = ("int4", "int8")  # one synthetic block each, as the native kernels run a prefill of them


class _Clock:
    """Seconds spent per category of op across a synthetic prefill (with `torch` given: the ops each
    category dispatches instead)."""

    def __init__(self, torch=None):
        self.totals: dict[str, float] = {}
        self.torch = torch

    def __call__(self, category: str, run: Callable[[], Any]) -> Any:
        if self.torch is not None:
            box: list[Any] = []
            self.totals[category] = self.totals.get(category, 0) + _OpCounter.count(
                self.torch, lambda: box.append(run()))
            return box[0]
        start = time.perf_counter()
        out = run()
        self.totals[category] = self.totals.get(category, 0.0) + time.perf_counter() - start
        return out


def _synthetic_prefill(torch, native, rows: int, dtype=None):
    """A prefill of `rows` tokens through synthetic Llama blocks of hidden `PREFILL_HIDDEN`, op for op
    as `lwdsl.runtime.generate.LeanLlama.forward` runs it (its own norm and rotary helpers) over
    native int linears as `lwdsl.apply.native.q4_linear` / `q8_linear` run them from `DEQUANT_ROWS`
    rows on (a transient float32 matrix, then the float matmul), one block per family in
    `PREFILL_FAMILIES`.
    Ops run in context, as in the executor: each on the fresh output of the one before, the
    transient matrices evicting activations from the caches. Returns `run(clock)` and the amounts
    its categories' rates divide (FLOPs, bytes)."""
    import torch.nn.functional as F

    from lwdsl.cost.time import attention_flops, lean_elementwise_values
    from lwdsl.runtime.generate import LeanLlama

    h, d, inner = PREFILL_HIDDEN, 64, (PREFILL_HIDDEN * 8 // 3 + 31) // 32 * 32
    heads = h // d
    kv_heads = max(1, heads // 4)
    kv = kv_heads * d

    def packed(family: str, out: int, inp: int):
        if family == "int4":  # group 32 with offsets, the GGUF grid
            codes = torch.randint(0, 256, (out, inp // 2), dtype=torch.uint8)
            scale, offset = torch.rand(out, inp // 32).half() / 64, -torch.rand(out, inp // 32).half() / 8
            return lambda: native.q4_dequantize(codes, scale, offset, 32, inp, dtype or torch.float32)
        codes, scale = torch.randint(-127, 128, (out, inp), dtype=torch.int8), torch.rand(out).half() / 512
        return lambda: native.q8_dequantize(codes, scale, dtype or torch.float32)

    shapes = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (inner, h), "up": (inner, h),
              "down": (h, inner)}
    blocks = [(family, {name: packed(family, *shape) for name, shape in shapes.items()},
               torch.ones(h), torch.ones(h), torch.zeros(1, kv_heads, rows, d), torch.zeros(1, kv_heads, rows, d))
              for family in PREFILL_FAMILIES]
    cos, sin = torch.rand(rows, d), torch.rand(rows, d)
    start_hidden = torch.randn(1, rows, h)

    def run(clock: _Clock) -> None:
        hidden = start_hidden
        for family, weights, input_norm, post_norm, keys, values in blocks:
            def linear(name: str, x):
                weight = clock(f"dequant {family}", weights[name])
                return clock("matmul", lambda: native.prefill_linear(x.reshape(-1, x.shape[-1]), weight,
                                                                    dtype)).view(1, rows, -1)

            def norm(weight, x):
                return clock("elementwise", lambda: LeanLlama._rms_norm(SimpleNamespace(
                    weight=weight, variance_epsilon=1e-5), x))
            normed = norm(input_norm, hidden)
            q = linear("q", normed).view(1, rows, -1, d).transpose(1, 2)
            k = linear("k", normed).view(1, rows, -1, d).transpose(1, 2)
            v = linear("v", normed).view(1, rows, -1, d).transpose(1, 2)
            q = clock("elementwise", lambda: LeanLlama._rotate(q, cos, sin))
            k = clock("elementwise", lambda: LeanLlama._rotate(k, cos, sin))

            def store():
                keys[:, :, :rows], values[:, :, :rows] = k, v
            clock("elementwise", store)
            out = clock("attention", lambda: F.scaled_dot_product_attention(
                q, keys, values, is_causal=rows > 1, enable_gqa=kv_heads != heads))
            merged = clock("elementwise", lambda: out.transpose(1, 2).reshape(1, rows, -1))
            attended = linear("o", merged)
            hidden = clock("elementwise", lambda: hidden + attended)
            normed = norm(post_norm, hidden)
            gate, up = linear("gate", normed), linear("up", normed)
            product = clock("elementwise", lambda: F.silu(gate) * up)
            down = linear("down", product)
            hidden = clock("elementwise", lambda: hidden + down)

    n = len(blocks)
    amounts = {"matmul": n * sum(2.0 * rows * out * inp for out, inp in shapes.values()),
               "attention": n * attention_flops(1, heads, d, rows, rows),
               "elementwise": n * rows * lean_elementwise_values(h, h, kv, inner) * 4.0}
    amounts.update({f"dequant {family}": 4.0 * sum(out * inp for out, inp in shapes.values())
                    for family in PREFILL_FAMILIES})
    return run, amounts


def _prefill_figures(torch, budget_s: float, op_overhead_s: float) -> dict[str, Any] | None:
    """The prefill figures by prompt length (rows), from synthetic prefills timed op by op: the
    median over runs of each category's seconds (the statistic `lwdsl check` reports time to first
    token by). The elementwise ops' fixed cost, priced per op (`op_overhead_s`), is taken out of
    their seconds (never more than half). The int layers' matmul is timed in float32 and in
    bfloat16 (`native.PREFILL_DTYPES`), interleaved; the faster by rows is what the executor runs
    (`int_dtype`, read by `native.prefill_dtype`) and `int_matmul_flops` its rate. None where the
    native kernels are not built (the executor's int prefill is then another path)."""
    from lwdsl.apply import native

    if not native.available():
        return None
    figures: dict[str, Any] = {"matmul_flops": {}, "attention_flops": {}, "elementwise_Bps": {},
                               "int_matmul_flops": {}, "int_dtype": {}, "int_matmul_flops_by_dtype": {},
                               "hidden": PREFILL_HIDDEN}
    dequant: dict[str, list[float]] = {family: [] for family in PREFILL_FAMILIES}
    with torch.inference_mode():
        for rows in PREFILL_ROWS:
            prefills = {name: _synthetic_prefill(torch, native, rows, dtype)
                        for name, dtype in native.PREFILL_DTYPES.items()}
            amounts = prefills["fp32"][1]
            counted = _Clock(torch)
            prefills["fp32"][0](counted)
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in prefills}
            started = time.perf_counter()
            while len(runs["fp32"]) < 3 or (time.perf_counter() - started < budget_s / len(PREFILL_ROWS)
                                            and len(runs["fp32"]) < 15):
                for name, (run, _) in prefills.items():  # interleaved: a burst of load hits both
                    clock = _Clock()
                    run(clock)
                    runs[name].append(clock.totals)
            by_dtype = {name: {key: statistics.median(r[key] for r in found) for key in amounts}
                        for name, found in runs.items()}
            seconds = by_dtype["fp32"]
            elementwise = seconds["elementwise"] - min(counted.totals["elementwise"] * op_overhead_s,
                                                       seconds["elementwise"] / 2)
            figures["matmul_flops"][rows] = amounts["matmul"] / seconds["matmul"]
            figures["attention_flops"][rows] = amounts["attention"] / seconds["attention"]
            figures["elementwise_Bps"][rows] = amounts["elementwise"] / elementwise
            rates = {name: amounts["matmul"] / found["matmul"] for name, found in by_dtype.items()}
            # the choice by each dtype's fastest run (what the units can do: a burst of other work on a
            # shared machine lands on one dtype's median, not on both bests); the price by the median
            fastest = {name: min(r["matmul"] for r in found) for name, found in runs.items()}
            figures["int_matmul_flops_by_dtype"][rows] = rates
            figures["int_dtype"][rows] = min(fastest, key=fastest.get)
            figures["int_matmul_flops"][rows] = rates[figures["int_dtype"][rows]]
            for family in PREFILL_FAMILIES:
                chosen = by_dtype[figures["int_dtype"][rows]]  # the dequantization the executor runs there
                dequant[family].append(amounts[f"dequant {family}"] / chosen[f"dequant {family}"])
    figures["dequant_Bps"] = {family: statistics.median(rates) for family, rates in dequant.items()}
    return figures


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
print(json.dumps(max(0, process.memory_info().rss - floor)))
"""


def _runtime_bytes(kind: str) -> int:
    """Resident bytes the runtime adds above the torch floor (a tiny model: its weights are ~0)."""
    import subprocess
    import sys

    if kind != "cpu":
        return 0  # GPU memory is measured by the allocator, which the host runtime does not touch
    done = subprocess.run([sys.executable, "-c", _RUNTIME_SCRIPT], capture_output=True, text=True,
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
    return matrix.numel() * 4 / _best_time(lambda: torch.mv(matrix, vector), sync, budget_s)


def cpu_read_Bps(budget_s: float = 0.3, stream_bytes: int = 256 << 20) -> float:
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
        stream_bytes, n = 256 << 20, 1024

    matrix = _stream_matrix(torch, device, stream_bytes)
    read_Bps = _read_rate(torch, matrix, sync, budget_s)
    flat = matrix.view(-1)
    copy_target = torch.empty_like(flat)
    copy_Bps = 2 * flat.numel() * 4 / _best_time(lambda: copy_target.copy_(flat), sync, budget_s)
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
        "native": _native_build() if kind == "cpu" else None,
        "native_isa": _native_isa() if kind == "cpu" else None,
        "cpu": cpu_identity(),
        "runtime_bytes": _runtime_bytes(kind),
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


def cached_prefill_dtype(cache_file: Path | None = None) -> dict[int, str]:
    """The prefill dtype the cached probe of THIS CPU chose for native int layers, by activation rows
    (empty: no current record, or one measured on another CPU or with other kernels)."""
    record = read_cache(cache_file).get("cpu")
    if not record or record.get("version") != VERSION or record.get("cpu") != cpu_identity() \
            or record.get("native") != _native_build():
        return {}
    return {int(rows): name for rows, name in ((record.get("prefill") or {}).get("int_dtype") or {}).items()}


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

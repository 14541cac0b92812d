"""Collectives among data-parallel ranks on this machine (`lwdsl probe --ranks N`): what gloo really does.

Ranks of `lwdsl train` on one host are processes that exchange gradients and parameters through gloo
over loopback; those exchanges run far below the memory bandwidth (all-gather about 0.7 GB/s here where
the streaming read is 20+ GB/s). This probe spawns N ranks exactly as the trainer does (spawned
processes, torchrun's environment, gloo, `cpus // N` torch threads a rank, the trainer's malloc
setting) and times, on tensors of a few sizes:

- `all_gather`: `all_gather_into_tensor` into a freshly allocated output (FSDP2's parameter gather);
- `reduce_scatter`: `reduce_scatter_tensor` of a whole tensor into a fresh shard (FSDP2's gradients);
- `all_reduce`: in place on a persistent tensor (DDP's gradient buckets);
- `clone`: a plain copy into fresh memory on every rank at once (FSDP2's copy-out of gathered parameters into
  their own storage and its copy-in of gradients before a reduce-scatter).

Beside the collectives, every rank at once runs the forward and backward of a stack of MLP linears
(hidden 512, inner 1536, SiLU between: the shapes of a small Llama's blocks) over a few row counts:
`train_matmul`, the FLOP/s one rank achieves on a training step's matmuls (forward, input gradients,
weight gradients, the last with only `rows` as the reduction) while its peers compute beside it. The
`cpu` record's prefill matmul rate is a forward at the whole machine's threads; split evenly over the
ranks it overstated a training rank's rate (SmolLM2, 2 ranks: 1.29 s of compute predicted, about 1.8
measured).

Sizes are the WHOLE tensor's bytes (the gathered output, the reduce-scatter's input, the all-reduced
tensor, the copied tensor), so a call of a collective over B bytes costs `latency_s + B / Bps` with the
figures fitted here (least squares over the per-size medians), for this rank count: the ring factors
(N-1)/N and 2(N-1)/N are inside the measured rate. Cached in the probe cache as its own record,
`collective:gloo:<ranks>x<threads>`, beside the `cpu` record, and measured lazily the first time a
training plan with that many local ranks is solved, estimated or run.
"""
from __future__ import annotations

import os
import socket
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lwdsl.errors import Span, fail

VERSION = 3  # 2: fresh outputs, the trainer's malloc setting; 3: the ranks' training matmul rate
SIZES = (1 << 20, 4 << 20, 16 << 20, 64 << 20)  # whole-tensor bytes timed (a SmolLM2 block is 14 MB)
TRAIN_ROWS = (32, 128, 512)  # activation rows (tokens) of the training matmuls timed
TRAIN_SHAPE = (512, 1536, 4)  # hidden, inner, MLP pairs
OPERATIONS = ("all_gather", "reduce_scatter", "all_reduce", "clone")
MMAP_THRESHOLD = 128 << 10  # the trainer's MALLOC_MMAP_THRESHOLD_ (`lwdsl.train.launch`): freed tensors go back
TIMEOUT_S = 300.0


def record_kind(ranks: int, threads: int, transport: str = "gloo") -> str:
    return f"collective:{transport}:{ranks}x{threads}"


def local_threads(ranks: int) -> int:
    """Torch threads a rank of `lwdsl train` computes with when `ranks` of them share this machine."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, ranks))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _time_calls(call, barrier, repeats: int) -> float:
    """Median seconds of `call` (one warm-up), every call started together on all ranks."""
    seconds = []
    for _ in range(repeats + 1):
        barrier()
        began = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds[1:])


def _rank_main(rank: int, ranks: int, threads: int, port: int, sizes: tuple[int, ...], repeats: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(ranks))
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore", category=FutureWarning)  # the *_tensor names FSDP2 itself calls
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    points: dict[str, dict[int, float]] = {op: {} for op in OPERATIONS}
    for nbytes in sizes:
        values = max(ranks, nbytes // 4 // ranks * ranks)
        whole = torch.ones(values)
        shard = torch.ones(values // ranks)
        calls = {
            "all_gather": lambda: dist.all_gather_into_tensor(torch.empty(values), shard),
            "reduce_scatter": lambda: dist.reduce_scatter_tensor(torch.empty(values // ranks), whole),
            "all_reduce": lambda: dist.all_reduce(whole),
            "clone": lambda: whole.clone(),
        }
        for op, call in calls.items():
            points[op][values * 4] = _time_calls(call, dist.barrier, repeats)
    train = _train_matmul(torch, dist.barrier, repeats)
    if rank == 0:
        queue.put((points, train))
    dist.barrier()
    os._exit(0)  # as the trainer's ranks: no gloo teardown racing a peer's exit


def _train_matmul(torch, barrier, repeats: int) -> dict[int, float]:
    """FLOP/s of one rank's forward + backward through `TRAIN_SHAPE` MLP linears, by rows, all ranks at once."""
    import torch.nn.functional as F

    hidden, inner, pairs = TRAIN_SHAPE
    weights = [(torch.randn(shape) * 0.02).requires_grad_(True) for _ in range(pairs)
               for shape in ((inner, hidden), (hidden, inner))]
    rates = {}
    for rows in TRAIN_ROWS:
        x = torch.randn(rows, hidden)

        def step():
            h = x
            for up, down in zip(weights[0::2], weights[1::2]):
                h = F.linear(F.silu(F.linear(h, up)), down)
            h.square().mean().backward()
            for w in weights:
                w.grad = None  # fresh gradients each step, as a training step allocates them

        seconds = _time_calls(step, barrier, repeats)
        # forward + weight gradients for every linear, input gradients for all but the first
        flops = 2 * rows * hidden * inner * (2 * pairs + 2 * pairs + (2 * pairs - 1))
        rates[rows] = flops / seconds
    return rates


def fit(points: dict[int, float]) -> dict[str, float]:
    """seconds = latency_s + bytes / Bps, least squares over the measured (bytes, seconds); a negative
    intercept (noise) is taken as 0 and the rate refitted through the origin."""
    xs, ys = zip(*sorted(points.items()))
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var if var > 0 else mean_y / mean_x
    latency = mean_y - slope * mean_x
    if latency < 0 or slope <= 0:
        latency, slope = 0.0, sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    return {"Bps": 1.0 / slope if slope > 0 else float("inf"), "latency_s": latency}


def measure_collectives(ranks: int, threads: int | None = None, sizes: tuple[int, ...] = SIZES,
                        repeats: int = 5) -> dict[str, Any]:
    """Spawn `ranks` gloo ranks here, time every operation at every size, fit, return the record."""
    import torch
    import torch.multiprocessing as mp

    from lwdsl.hardware.probe import cpu_identity

    if ranks < 2:
        raise fail("E408", f"a collective probe needs at least 2 ranks, not {ranks}", hint="--ranks 2")
    threads = threads or local_threads(ranks)
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # read by the spawned ranks at start
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    try:
        processes = mp.start_processes(_rank_main, args=(ranks, threads, _free_port(), tuple(sizes), repeats, queue),
                                       nprocs=ranks, join=False, start_method="spawn")
        deadline = time.monotonic() + TIMEOUT_S
        while not processes.join(timeout=0.5):
            if time.monotonic() > deadline:
                for process in processes.processes:
                    process.kill()
                raise fail("E408", f"the collective probe's {ranks} gloo ranks did not finish in {TIMEOUT_S:.0f} s")
    except mp.ProcessRaisedException as error:
        raise fail("E408", f"the collective probe's gloo ranks failed: {str(error).strip().splitlines()[-1]}",
                   hint="gloo needs 127.0.0.1 reachable; see the rank's traceback above") from None
    except mp.ProcessExitedException as error:
        raise fail("E408", f"a collective probe rank died: {error}") from None
    finally:
        if previous is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous
    if queue.empty():
        raise fail("E408", "the collective probe's ranks ended without a result")
    points, train = queue.get()
    return {
        "version": VERSION, "kind": record_kind(ranks, threads), "transport": "gloo", "ranks": ranks,
        "threads": threads, "points": {op: {str(b): s for b, s in by.items()} for op, by in points.items()},
        "fit": {op: fit(by) for op, by in points.items()}, "train_matmul": {str(r): v for r, v in train.items()},
        "cpu": cpu_identity(), "torch": torch.__version__,
        "load_average": os.getloadavg()[0], "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def local_collectives(ranks: int, threads: int | None = None, cache_file: Path | None = None,
                      run_probe: bool = True, span: Span | None = None) -> dict[str, Any]:
    """The cached collective figures of `ranks` local ranks (measured and cached when there are none,
    or when they were measured on another CPU or by another probe version)."""
    from lwdsl.errors import LwdslError
    from lwdsl.hardware.probe import cpu_identity, read_cache, write_cache

    threads = threads or local_threads(ranks)
    kind = record_kind(ranks, threads)
    cached = read_cache(cache_file).get(kind)
    if cached and cached.get("version") == VERSION and cached.get("cpu") == cpu_identity():
        return cached
    if not run_probe:
        if cached:
            return cached
        raise fail("E405", f"no collective probe of {ranks} local ranks in the probe cache", span,
                   hint=f"run `lwdsl probe --ranks {ranks}`")
    try:
        figures = measure_collectives(ranks, threads)
    except LwdslError as error:  # place it on the plan line that asked for the ranks
        raise fail(error.diagnostics[0].code, error.diagnostics[0].message, span) from None
    write_cache(figures, cache_file)
    return figures


def rates_of(record: dict[str, Any]):
    """A cached record as `CollectiveRates`."""
    from lwdsl.hardware.records import CallRate, CollectiveRates

    fitted = record["fit"]
    return CollectiveRates(ranks=record["ranks"], threads=record["threads"], transport=record.get("transport", "gloo"),
                           source=f"measured {record.get('measured_at', '?')} (load {record.get('load_average', 0):.1f})",
                           train_matmul=tuple(sorted((int(r), v) for r, v in (record.get("train_matmul") or {}).items())),
                           **{op: CallRate(**fitted[op]) for op in OPERATIONS})


def _local_cpus(target) -> list[str]:
    return [n for n in target.compute_devices() if target.device(n).catalog == "local" and target.device(n).kind == "cpu"]


def ranks_local(target, ranks: int) -> bool:
    """Whether the first `ranks` compute devices (a training run's ranks) are all this machine's CPU."""
    first = target.compute_devices()[:ranks]
    return len(first) == ranks and set(first) <= set(_local_cpus(target))


def local_rank_counts(target) -> list[int]:
    """The data-parallel rank counts (2, 4, ... and all of them) the target's local CPUs could train with."""
    local = _local_cpus(target)
    counts, n = set(), 2
    while n <= len(local):
        counts.add(n)
        n *= 2
    if len(local) >= 2:
        counts.add(len(local))
    return sorted(counts)


def with_local_collectives(target, counts: list[int] | None = None, run_probe: bool = True, span: Span | None = None,
                           cache_file: Path | None = None):
    """The target with the collective figures of its local CPU ranks attached (probed once, then cached)."""
    counts = local_rank_counts(target) if counts is None else [n for n in counts if n >= 2]
    if not counts:
        return target
    found = {n: rates_of(local_collectives(n, cache_file=cache_file, run_probe=run_probe, span=span)) for n in counts}
    return target.model_copy(update={"collectives": {**target.collectives, **found}})

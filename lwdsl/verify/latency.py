"""Time to first token, time per generated token and throughput, as a user of the artifact sees them.

One *run* is the workload once: a prompt of `context` tokens for each of `batch` sequences (prefill,
ending with the first new token), then `generate - 1` decode steps, greedy. Runs are repeated after
warm-up runs that are not counted; each figure is the median over runs (per-token time: the median
step of each run, then the median over runs), so one stall does not move the verdict.

    >>> timing = measure_latency(model, prompt_ids, generate=32, repeats=3)   # doctest: +SKIP
    >>> timing.token_s                                                        # doctest: +SKIP
    0.0123
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class RunTiming:
    prefill_s: float
    step_s: tuple[float, ...]  # each decode step after the first token
    decode_step: str = ""  # "fused" or "eager: <why>" (lwdsl.runtime.generate.Decoded.step)

    @property
    def request_s(self) -> float:
        return self.prefill_s + sum(self.step_s)


@dataclass(frozen=True)
class LatencyResult:
    prefill_s: float  # time to first token (whole batch), median over runs
    token_s: float  # one decode step (whole batch), median over runs of each run's median step
    request_s: float  # prefill + every generated token, median over runs
    throughput_tok_s: float  # generated tokens per second, whole batch, from the median run
    runs: int
    batch: int
    context: int
    generate: int
    decode_step: str = ""  # how the decode steps ran: "fused", or "eager: <why not>"
    read_Bps: float | None = None  # memory read rate sampled next to the timed runs (median; None: not sampled)

    def to_dict(self) -> dict:
        return asdict(self)


def _lean_generate(model, prompt_ids: torch.Tensor, generate: int) -> RunTiming:
    """Batched prefill then greedy decode through the Hugging Face KV cache (last logits only)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    start = time.perf_counter()
    output = model(prompt_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = output.logits[:, -1:].argmax(-1)
    prefill_s = time.perf_counter() - start
    steps = []
    for _ in range(generate - 1):
        start = time.perf_counter()
        output = model(token, past_key_values=cache, use_cache=True)
        token = output.logits[:, -1:].argmax(-1)
        steps.append(time.perf_counter() - start)
    return RunTiming(prefill_s, tuple(steps))


def time_one_run(model, prompt_ids: torch.Tensor, generate: int, kv_format=None) -> RunTiming:
    """One timed run: the executor's lean decode loop (`lwdsl.runtime.generate.decode`) at batch 1,
    the serving executor's batch on a GPU (`lwdsl.runtime.serve`), else the Hugging Face forward with
    its cache for larger batches."""
    from lwdsl.runtime import serve

    if prompt_ids.shape[0] > 1 and serve.serves(model):  # on a GPU: the serving executor, whole batch
        from lwdsl.runtime.serve.loop import decode_batch

        prefill_s, steps, step = decode_batch(model, prompt_ids, generate, kv_format)
        return RunTiming(prefill_s, tuple(steps), step)
    if prompt_ids.shape[0] == 1:
        from lwdsl.runtime.generate import decode

        run = decode(model, prompt_ids, generate, kv_format=kv_format, stop_at_eos=False)
        return RunTiming(run.prefill_s, tuple(run.token_s), run.step)
    run = _lean_generate(model, prompt_ids, generate)
    return RunTiming(run.prefill_s, run.step_s, "eager: batch > 1 (the Hugging Face forward and cache)")


@torch.inference_mode()
def measure_latency(model, prompt_ids: torch.Tensor, generate: int, repeats: int = 5,
                    warmup: int = 1, kv_format=None, read_rate: Callable[[], float] | None = None) -> LatencyResult:
    """Median timings of `repeats` runs of the workload after `warmup` uncounted runs.

    `read_rate` (bytes/s of a streaming read now), where given, is sampled before each timed run and
    after the last: each run's rate is the mean of the samples on either side, and `read_Bps` their
    median. A decode step streams its weights, so its time moves with that rate; on a shared host it
    moves by tens of percent within seconds, and the check sets its measurement beside the one the
    prediction took."""
    generate = max(1, generate)
    for _ in range(warmup):
        time_one_run(model, prompt_ids, min(generate, 8), kv_format)
    samples = [read_rate()] if read_rate else []
    runs = []
    for _ in range(max(1, repeats)):
        runs.append(time_one_run(model, prompt_ids, generate, kv_format))
        if read_rate:
            samples.append(read_rate())
    adjacent = [(a + b) / 2 for a, b in zip(samples, samples[1:])]
    batch = prompt_ids.shape[0]
    token_s = statistics.median(statistics.median(r.step_s) for r in runs) if generate > 1 else \
        statistics.median(r.prefill_s for r in runs)
    request_s = statistics.median(r.request_s for r in runs)
    decode_s = statistics.median(sum(r.step_s) for r in runs)
    throughput = batch * (generate - 1) / decode_s if generate > 1 and decode_s > 0 else \
        batch * generate / request_s
    return LatencyResult(
        prefill_s=statistics.median(r.prefill_s for r in runs),
        token_s=token_s,
        request_s=request_s,
        throughput_tok_s=throughput,
        runs=len(runs),
        batch=batch,
        context=prompt_ids.shape[1],
        generate=generate,
        decode_step=runs[0].decode_step,
        read_Bps=statistics.median(adjacent) if adjacent else None,
    )

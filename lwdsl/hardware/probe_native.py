"""The probe's figures of lwdsl's native kernels as the executor runs them (`lwdsl.hardware.probe`
collects them): the fused decode step's stream rates by family and width and its fixed costs per
block and per step (`fused`), and what a prompt's forward runs by prompt length (`prefill`: matmul,
attention, elementwise and dequantization rates, and the faster of float32 and bfloat16 for the
native int layers' matmuls), through synthetic Llama blocks."""
from __future__ import annotations

import statistics
import time
from types import SimpleNamespace
from typing import Any, Callable

from lwdsl.hardware.probe_timing import OpCounter as _OpCounter
from lwdsl.hardware.probe_timing import median_time as _median_time


FUSED_ROW_LENGTHS = (512, 1024, 2048, 4096)  # hidden widths of the synthetic blocks
# Weights a timed step reads: beyond the caches (a VM on a Xeon whose L3 is shared by the host kept
# ~100 MB: its int4 step read 47 GB/s at 96 MiB, 29 at 256, 27 at 384), and within them (the rate a
# small model that stays cached decodes at: then the cores' unpacking, not memory, sets it). The
# cost model weighs the two by what the step's rate by working set says the caches keep of a model.
FUSED_CHAIN_BYTES = 384 << 20
FUSED_CACHED_BYTES = 12 << 20
# Working sets the step's own rate is measured at, to find where the caches stop keeping a model's
# weights between steps. A streaming read (matrix-vector) kept 98% of its in-cache rate at 144 MiB on
# a Xeon VM where the decode step of a 183 MiB model ran at its beyond-cache rate: the step (its
# activations, KV cache, many matrices) keeps less than a read of one matrix does, so it is measured.
WORKING_SET_BYTES = tuple(mib << 20 for mib in (16, 32, 48, 64, 96, 128, 160, 192, 256, 384))
FUSED_ROUNDS = 5  # interleaved rounds the fused stream rates are the median of
FUSED_LAYOUT_BLOCKS = ("gemma3_text",)  # layouts whose fused block's fixed cost is its own, not a Llama block's


def _fused_model(torch, native, family: str, blocks: int, width: int, threads: int, max_len: int = 64,
                 inner: int | None = None, gemma: bool = False):
    """A synthetic Llama-layout step for `native.llama_step`: hidden `width`, an MLP `inner` wide (default
    8/3 as wide, the Llama proportion; `inner=width` makes every linear a matrix of `width` inputs),
    constant codes (no model, no quantizer: a stream rate does not depend on the values); `gemma`: Gemma
    3's block (q/k head norms, the sublayers' outputs normed, GELU). Returns the description, the
    tensors it points at, and the weight bytes a step reads."""
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

    head_dim, kv = 64, max(1, width // 256)
    inner = inner or (width * 8 // 3 + 31) // 32 * 32
    table = (native.LwBlock * blocks)()
    weights = 0
    for b in range(blocks):
        before = len(keep)
        parts = dict(q=linear(width, width), k=linear(kv * head_dim, width), v=linear(kv * head_dim, width),
                     o=linear(width, width), gate=linear(inner, width), up=linear(inner, width),
                     down=linear(width, inner))
        weights += sum(t.numel() * t.element_size() for t in keep[before:])
        norms = dict(q_norm=tensor(head_dim), k_norm=tensor(head_dim), attn_out_norm=tensor(width),
                     mlp_out_norm=tensor(width)) if gemma else {}
        table[b] = native.LwBlock(**parts, **norms, input_norm=tensor(width), post_norm=tensor(width),
                                  keys=tensor(kv, max_len, head_dim), values=tensor(kv, max_len, head_dim),
                                  heads=width // head_dim, kv_heads=kv, cache_len=max_len)
    described = native.LwModel(
        blocks=blocks, hidden=width, head_dim=head_dim, max_len=max_len, threads=threads, eps=1e-5,
        attention_scale=head_dim ** -0.5, cos=tensor(max_len, head_dim), sin=tensor(max_len, head_dim),
        final_norm=tensor(width), head=linear(64, width), block=ctypes.cast(table, ctypes.POINTER(native.LwBlock)),
        max_rows=inner, max_features=inner, activation=int(gemma))
    keep.append(table)
    return described, keep, weights


def _fused_figures(torch, budget_s: float) -> dict[str, Any] | None:
    """The fused decode step's stream rate per weight family and row length, and its fixed costs per
    block and per step (None where the native library is not built)."""
    from lwdsl.apply import native

    if not native.available():
        return None
    threads = torch.get_num_threads()

    def fixed_costs(gemma: bool) -> tuple[float, float]:
        small = []
        for blocks in (2, 10):
            described, keep, _ = _fused_model(torch, native, "fp32", blocks, 64, threads,
                                              gemma=gemma)  # keep: what it points at
            small.append(_fused_step_s(torch, native, described, budget_s / 8))
        block_s = max(0.0, (small[1] - small[0]) / 8)
        return block_s, max(0.0, small[0] - 2 * block_s)

    block_s, fixed_s = fixed_costs(False)
    # Gemma 3's block: two more barriers (its sublayers' outputs are normed whole before the residual
    # add) and six more norms
    layout_block_s = {layout: fixed_costs(True)[0] for layout in FUSED_LAYOUT_BLOCKS}
    # every (family, width) once a round, the median over rounds: a burst on this shared machine that
    # slows a second of steps (one 0.1 s measurement of int4 read 17 GB/s between 25.3 and 26.1) then
    # moves one sample, not the figure
    samples: dict[tuple[str, int, int], list[float]] = {}
    families = ("fp32", "int8", "int4", "int8g")
    for _ in range(FUSED_ROUNDS):
        for chain in (FUSED_CHAIN_BYTES, FUSED_CACHED_BYTES):
            for family in families:
                for width in FUSED_ROW_LENGTHS:
                    samples.setdefault((chain, family, width), []).append(_stream_rate(
                        torch, native, family, width, threads, budget_s / 6, fixed_s, block_s, chain))
    stream, cached = ({family: {width: statistics.median(samples[chain, family, width]) for width in FUSED_ROW_LENGTHS}
                       for family in families} for chain in (FUSED_CHAIN_BYTES, FUSED_CACHED_BYTES))
    # the step's own rate by the bytes it reads (int4 rows of 1024): where the caches stop keeping them
    by_bytes: dict[int, list[float]] = {}
    for _ in range(3):
        for chain in WORKING_SET_BYTES:
            by_bytes.setdefault(chain, []).append(_stream_rate(torch, native, "int4", 1024, threads, budget_s / 8,
                                                               fixed_s, block_s, chain))
    return {"stream_Bps": stream, "stream_cached_Bps": cached, "block_s": block_s, "step_s": fixed_s,
            "layout_block_s": layout_block_s,
            "working_set_Bps": {chain: statistics.median(rates) for chain, rates in by_bytes.items()},
            "threads": threads}


def _fused_step_s(torch, native, described, budget_s: float) -> float:
    hidden = torch.zeros(described.hidden)

    def run():  # what `Fused.step` does around the call
        native.llama_step(described, hidden.clone(), 16, torch.empty(described.head.N))
    return _median_time(run, budget_s)


def _stream_rate(torch, native, family: str, width: int, threads: int, budget_s: float, fixed_s: float,
                 block_s: float, chain_bytes: int = FUSED_CHAIN_BYTES) -> float:
    """Bytes/s the fused step streams `family` weights of `width` inputs at (synthetic blocks holding
    `chain_bytes`, every matrix `width` inputs wide: the rate depends on the row length, from
    about 22 GB/s for int4 rows of 576 to 29 for rows of 2048 on a Zen 4, so a block mixing widths
    would price none of them), its fixed costs per step and block taken off."""
    one = _fused_model(torch, native, family, 1, width, threads, inner=width)[2]
    blocks = max(1, chain_bytes // one)
    described, keep, weights = _fused_model(torch, native, family, blocks, width, threads,
                                            inner=width)  # keep: what it points at
    seconds = _fused_step_s(torch, native, described, budget_s)
    # the fixed costs never take more than half a step: a step they would outweigh was measured while
    # this machine was busy, and the bytes still set it
    seconds -= min(fixed_s + blocks * block_s, seconds / 2)
    del described, keep
    return weights / seconds


PREFILL_ROWS = (16, 64, 256, 512, 1024, 2048)  # prompt tokens the prefill figures are measured at (from DEQUANT_ROWS)
PREFILL_ROUNDS = 5  # interleaved rounds at least: a Xeon VM's elementwise ops at 2048 rows read 9 to 19 GB/s
# The synthetic blocks: heads of 64, a fifth as many kv heads, an MLP 8/3 as wide rounded up to 256 as
# Llama sizes it. Not a power of two: on a Xeon's AMX the bf16 matmuls of a 512-wide block measured
# ~35% slower than those of 576 or 640 (1 KB rows alias in the caches), a width the small models
# lwdsl meets (576, 640, 896) do not have.
PREFILL_HIDDEN = 640
# The int matmul's rate grows with the matrices (on AMX: ~40% from 512- to 1024-wide blocks at 512 rows;
# Qwen2.5-0.5B's 896-wide prefill ran 26% faster than priced from 640): a second, wider block is timed
# in the chosen dtype, and the cost model interpolates by the model's hidden size.
PREFILL_WIDE_HIDDEN = 1280
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


def _synthetic_prefill(torch, native, rows: int, dtype=None, hidden: int = PREFILL_HIDDEN):
    """A prefill of `rows` tokens through synthetic Llama blocks of `hidden` (`PREFILL_HIDDEN`), op for op
    as `lwdsl.runtime.generate.LeanLlama.forward` runs it (its own norm and rotary helpers) over
    native int linears as `lwdsl.apply.native.q4_linear` / `q8_linear` run them from `DEQUANT_ROWS`
    rows on (a transient float32 matrix, then the float matmul), one block per family in
    `PREFILL_FAMILIES`; the matmuls and the attention core in `dtype` (default float32).
    Ops run in context, as in the executor: each on the fresh output of the one before, the
    transient matrices evicting activations from the caches. Returns `run(clock)` and the amounts
    its categories' rates divide (FLOPs, bytes)."""
    import torch.nn.functional as F

    from lwdsl.cost.time import attention_flops, lean_elementwise_values
    from lwdsl.runtime.generate import LeanLlama

    h, d, inner = hidden, 64, (hidden * 8 // 3 + 255) // 256 * 256
    heads = h // d
    kv_heads = max(1, heads // 5)
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
                flat = x.reshape(-1, x.shape[-1])
                if dtype in (None, torch.float32):
                    return clock("matmul", lambda: native.prefill_linear(flat, weight, dtype)).view(1, rows, -1)
                # `native.prefill_linear` in a half dtype, its two conversions clocked apart from the
                # matmul: they cost by the activations' bytes, the matmul by its FLOPs
                operand = clock("convert", lambda: flat.to(dtype))
                out = clock("matmul", lambda: F.linear(operand, weight.to(dtype)))
                return clock("convert", lambda: out.float()).view(1, rows, -1)

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
            out = clock("attention", lambda: native.prefill_attention(q, keys, values, dtype or torch.float32))
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
               "elementwise": n * rows * lean_elementwise_values(h, h, kv, inner) * 4.0,
               # a half-dtype matmul's activations in (float32 read, half written) and out (the reverse)
               "convert": n * sum(rows * (out + inp) * 6.0 for out, inp in shapes.values())}
    amounts.update({f"dequant {family}": 4.0 * sum(out * inp for out, inp in shapes.values())
                    for family in PREFILL_FAMILIES})
    return run, amounts


def _prefill_figures(torch, budget_s: float, op_overhead_s: float) -> dict[str, Any] | None:
    """The prefill figures by prompt length (rows), from synthetic prefills timed op by op: the
    median over runs of each category's seconds (the statistic `lwdsl check` reports time to first
    token by). The elementwise ops' fixed cost, priced per op (`op_overhead_s`), is taken out of
    their seconds (never more than half). The int layers' matmul is timed in float32 and in
    bfloat16 (`native.PREFILL_DTYPES`), interleaved; the faster by rows is what the executor runs
    (`int_dtype`, read by `native.prefill_dtype`) and `int_matmul_flops` its rate; the attention core
    likewise (`attention_dtype`, `attention_run_flops`; `attention_flops` keeps the float32 rate). None
    where the native kernels are not built (the executor's int prefill is then another path)."""
    from lwdsl.apply import native
    from lwdsl.runtime import heap

    if not native.available():
        return None
    heap.prime()  # as the executor runs (measured on a Xeon unprimed: matmuls 519 vs 762 GFLOP/s at 256 rows)
    figures: dict[str, Any] = {"matmul_flops": {}, "attention_flops": {}, "elementwise_Bps": {},
                               "int_matmul_flops": {}, "int_dtype": {}, "int_matmul_flops_by_dtype": {},
                               "attention_run_flops": {}, "attention_dtype": {}, "attention_flops_by_dtype": {},
                               "hidden": PREFILL_HIDDEN}
    dequant: dict[str, list[float]] = {family: [] for family in PREFILL_FAMILIES}
    with torch.inference_mode():
        setups = {}
        for rows in PREFILL_ROWS:
            prefills = {name: _synthetic_prefill(torch, native, rows, dtype)
                        for name, dtype in native.PREFILL_DTYPES.items()}
            counted = _Clock(torch)
            prefills["fp32"][0](counted)
            setups[rows] = prefills, counted
        # rounds of every (rows, dtype) once, interleaved: a slow phase of a shared machine (seconds
        # long on the VM this was built on) then lands on one round of each figure, not on all of one
        # row count's runs, and the median over rounds passes it by
        every: dict[int, dict[str, list[dict[str, float]]]] = {
            rows: {name: [] for name in prefills} for rows, (prefills, _) in setups.items()}
        started, rounds = time.perf_counter(), 0
        while rounds < PREFILL_ROUNDS or (time.perf_counter() - started < budget_s and rounds < 15):
            for rows, (prefills, _) in setups.items():
                for name, (run, _) in prefills.items():
                    clock = _Clock()
                    run(clock)
                    every[rows][name].append(clock.totals)
            rounds += 1
        for rows in PREFILL_ROWS:
            prefills, counted = setups[rows]
            amounts = prefills["fp32"][1]
            runs = every[rows]
            by_dtype = {name: {key: statistics.median(r[key] for r in found) for key in amounts if key in found[0]}
                        for name, found in runs.items()}
            seconds = by_dtype["fp32"]
            elementwise = seconds["elementwise"] - min(counted.totals["elementwise"] * op_overhead_s,
                                                       seconds["elementwise"] / 2)
            figures["matmul_flops"][rows] = amounts["matmul"] / seconds["matmul"]
            figures["attention_flops"][rows] = amounts["attention"] / seconds["attention"]
            figures["elementwise_Bps"][rows] = amounts["elementwise"] / elementwise
            # a dtype's whole cost: its matmul and (a half dtype) the activations' conversions
            rates = {name: amounts["matmul"] / (found["matmul"] + found.get("convert", 0.0))
                     for name, found in by_dtype.items()}
            # the choice by each dtype's fastest run (what the units can do: a burst of other work on a
            # shared machine lands on one dtype's median, not on both bests); the price by the median
            fastest = {name: min(r["matmul"] + r.get("convert", 0.0) for r in found) for name, found in runs.items()}
            figures["int_matmul_flops_by_dtype"][rows] = rates
            chosen = figures["int_dtype"][rows] = min(fastest, key=fastest.get)
            # priced apart: the matmul by FLOPs, the conversions by bytes (a model's matrices wider than
            # the synthetic block's, Qwen2.5's MLP at 5.4x its hidden size, convert less per FLOP)
            figures["int_matmul_flops"][rows] = amounts["matmul"] / by_dtype[chosen]["matmul"]
            figures.setdefault("int_convert_s_per_byte", {})[rows] = \
                by_dtype[chosen].get("convert", 0.0) / amounts["convert"]  # 0: float32 chosen, nothing converted
            # the attention core the same way (`native.prefill_attention`): `attention_flops` stays the
            # float32 rate (what a training step's attention runs), `attention_run_flops` the chosen one
            rates = {name: amounts["attention"] / found["attention"] for name, found in by_dtype.items()}
            fastest = {name: min(r["attention"] for r in found) for name, found in runs.items()}
            figures["attention_flops_by_dtype"][rows] = rates
            figures["attention_dtype"][rows] = min(fastest, key=fastest.get)
            figures["attention_run_flops"][rows] = rates[figures["attention_dtype"][rows]]
            for family in PREFILL_FAMILIES:
                chosen = by_dtype[figures["int_dtype"][rows]]  # the dequantization the executor runs there
                dequant[family].append(amounts[f"dequant {family}"] / chosen[f"dequant {family}"])
    figures["dequant_Bps"] = {family: statistics.median(rates) for family, rates in dequant.items()}
    # the int matmul of a wider block, in the dtype chosen at each row count, over interleaved rounds
    with torch.inference_mode():
        wide = {rows: _synthetic_prefill(torch, native, rows, native.PREFILL_DTYPES[figures["int_dtype"][rows]],
                                         PREFILL_WIDE_HIDDEN) for rows in PREFILL_ROWS}
        seconds: dict[int, list[float]] = {rows: [] for rows in PREFILL_ROWS}
        for _ in range(3):
            for rows, (run, _) in wide.items():
                clock = _Clock()
                run(clock)
                seconds[rows].append(clock.totals["matmul"])
    figures["wide_hidden"] = PREFILL_WIDE_HIDDEN
    figures["int_matmul_flops_wide"] = {rows: wide[rows][1]["matmul"] / statistics.median(found)
                                        for rows, found in seconds.items()}
    return figures

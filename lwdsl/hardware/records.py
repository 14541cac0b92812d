"""Resolved hardware as data: every device with numbers, every declared link keyed both ways."""
from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


KNEE = 0.9  # a working set the caches keep streams within 10% of the fastest rate measured


def _log_interpolate(points: tuple[tuple[int, float], ...], x: float) -> float:
    """y at `x` on measured (x, y) points: linear in log2(x) between them, flat beyond the ends."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            t = (math.log2(x) - math.log2(x0)) / (math.log2(x1) - math.log2(x0))
            return y0 + t * (y1 - y0)
    return points[-1][1]


class DeviceSpec(Record):
    """One device after catalog + probe + the plan's overrides."""

    name: str
    kind: Literal["cpu", "gpu", "disk"]
    catalog: str | None = None
    memory_bytes: int
    bandwidth_Bps: float  # to its own memory (streaming)
    rates: dict[str, float] = Field(default_factory=dict)  # peak dense FLOP/s (OP/s for int*) per dtype
    price_per_h: float = 0.0
    op_overhead_s: float = 0.0  # fixed cost of one eager op (dispatch + launch); 0 = pure roofline
    runtime_bytes: int = 0  # resident bytes of the runtime itself where this device computes (probe)
    # (row bytes, fraction of bandwidth_Bps) a matrix-vector product streams at, by the length of the
    # matrix rows it reads; measured by the probe, empty = every row length streams at full bandwidth
    row_efficiency: tuple[tuple[int, float], ...] = ()
    # The native fused decode step (CPU, measured by the probe; empty = this device has none): bytes/s
    # it streams each weight family at, by the matrices' input features, and its fixed seconds per
    # block and per step. See `lwdsl.runtime.fused`.
    fused_stream: dict[str, tuple[tuple[int, float], ...]] = Field(default_factory=dict)
    fused_block_s: float = 0.0
    fused_step_s: float = 0.0
    # a layout whose fused block does more than a Llama block's fixed work (Gemma 3: its norms and two
    # more barriers), by model type; missing: `fused_block_s`
    fused_layout_block_s: dict[str, float] = Field(default_factory=dict)
    # The eager decode step of a layout the fused step does not compute (`probe_eager`: GPT-2): seconds a block
    # and a step cost besides their weights' reads, by model type; missing: counted ops · op_overhead_s.
    eager_steps: dict[str, tuple[float, float]] = Field(default_factory=dict)
    # The same rates with the weights in the caches (a step over ~12 MB of them), and the step's own
    # rate by working-set bytes (`probe_native.WORKING_SET_BYTES`, int4 rows of 1024): how much of a
    # model's weights the caches keep from one decode step to the next, so which of the two rates its
    # step runs at (`fused_rate`).
    fused_stream_cached: dict[str, tuple[tuple[int, float], ...]] = Field(default_factory=dict)
    working_set_curve: tuple[tuple[int, float], ...] = ()
    # The bytes a decode step on this device reads (weights and KV cache), set by the cost model for
    # the choices it prices (`lwdsl.cost.evaluate.with_working_set`); 0: unknown, priced beyond the caches.
    working_set_bytes: float = 0.0
    # What a prefill runs, measured by the probe at a few prompt lengths (empty = the peak `rates` and
    # `bandwidth_Bps`; see `lwdsl.hardware.probe_native._prefill_figures`): the float32 matmul's FLOP/s by
    # activation rows on Llama-proportioned skinny linears; causal attention's FLOP/s (counted as
    # `time.attention_flops` counts them) by prompt length; bytes/s of the eager elementwise ops between
    # the matmuls (counted as `time.lean_elementwise_values` counts them) by rows; and the float32
    # bytes/s the native int8 / int4 kernels dequantize a layer at before a prefill's float matmul.
    prefill_matmul: tuple[tuple[int, float], ...] = ()
    prefill_attention: tuple[tuple[int, float], ...] = ()
    prefill_elementwise: tuple[tuple[int, float], ...] = ()
    dequant_Bps: dict[str, float] = Field(default_factory=dict)
    # The native int layers' prefill matmul (dequantized, in the dtype the probe found faster by rows:
    # float32, or bfloat16 through oneDNN's AMX / AVX512-BF16 paths), FLOP/s by rows; empty: as fp32.
    prefill_int_matmul: tuple[tuple[int, float], ...] = ()
    # The attention core as lwdsl's lean prefill runs it (in the dtype the probe found faster by prompt
    # length: bfloat16 SDPA runs AMX tiles on a Xeon), FLOP/s by length; empty: as `prefill_attention`.
    prefill_attention_run: tuple[tuple[int, float], ...] = ()
    # The same int matmul in a wider synthetic block (FLOP/s by rows), and the two blocks' hidden sizes:
    # a model's rate is interpolated by its own hidden size (`prefill_int_matmul_rate`); empty: as above.
    prefill_int_matmul_wide: tuple[tuple[int, float], ...] = ()
    prefill_hiddens: tuple[int, int] = (0, 0)
    # Seconds a byte of a half-dtype int matmul's activation conversions costs (float32 in, half to the
    # matmul, half out, float32 back: 6 bytes a value, in and out), by rows; 0 where float32 runs.
    # `prefill_int_matmul` is then the matmul's own rate. Empty: included in that rate (older probes).
    prefill_int_convert: tuple[tuple[int, float], ...] = ()
    source: str = "plan"  # where the figures come from

    @property
    def computes(self) -> bool:
        return self.kind != "disk"

    def stream_efficiency(self, row_bytes: float) -> float:
        """Fraction of `bandwidth_Bps` a matrix-vector product achieves over rows of `row_bytes`:
        piecewise linear in log2(row bytes) between the measured points, flat beyond them."""
        if not self.row_efficiency or row_bytes <= 0:
            return 1.0
        return _log_interpolate(self.row_efficiency, row_bytes)

    def cached_fraction(self, working_set_bytes: float | None = None) -> float:
        """The share of a decode step's reads the caches serve when it reads `working_set_bytes`
        (default `self.working_set_bytes`) once a step: all of them up to the knee of the step's rate
        by working set (the largest set measured within `KNEE` of the fastest rate), none from the
        next set measured on, linear in between. A step reads its weights cyclically, and a cyclic
        read of more than a least-recently-used cache holds evicts every line before its reuse: on a
        Xeon VM a 183 MiB model decoded at its beyond-cache rates although a synthetic step of that
        size still ran at half its in-cache advantage. 0 with no curve or no working set."""
        w = self.working_set_bytes if working_set_bytes is None else working_set_bytes
        curve = self.working_set_curve
        if len(curve) < 2 or w <= 0:
            return 0.0
        fastest = max(rate for _, rate in curve)
        inside = [i for i, (_, rate) in enumerate(curve) if rate >= KNEE * fastest]
        knee = max(inside)
        if knee == len(curve) - 1:  # never fell off: nothing measured beyond the caches
            return 1.0 if w <= curve[knee][0] else 0.0
        start, end = curve[knee][0], curve[knee + 1][0]
        return min(1.0, max(0.0, (end - w) / (end - start)))

    def fused_rate(self, family: str, in_features: int) -> float:
        """Bytes/s the fused step streams a `family` matrix of `in_features` inputs at: piecewise
        linear in log2(in_features) between the measured widths, flat beyond (0: not measured); where
        the caches keep a share of the step's working set (`cached_fraction`), that share at the
        in-cache rate: 1/rate = f/cached + (1-f)/beyond."""
        points = self.fused_stream.get(family, ())
        if not points:
            return 0.0
        beyond = _log_interpolate(points, in_features)
        cached_points = self.fused_stream_cached.get(family, ())
        fraction = self.cached_fraction() if cached_points else 0.0
        if fraction <= 0:
            return beyond
        return 1.0 / (fraction / _log_interpolate(cached_points, in_features) + (1 - fraction) / beyond)

    def rate(self, dtype: str) -> float:
        """Peak rate for a compute dtype, falling back to fp32 (what an unsupported dtype runs as)."""
        return self.rates.get(dtype) or self.rates.get("fp32", 0.0)

    def prefill_matmul_rate(self, dtype: str, rows: int) -> float:
        """FLOP/s of a prefill's matmul over `rows` activation rows: the probe's float32 figure at that
        many rows (piecewise linear in log2(rows), flat beyond the measured ones), else the peak rate.
        Short prompts run the matmul well below the square-matrix peak (16 rows: about a third here)."""
        if dtype == "fp32" and self.prefill_matmul:
            return _log_interpolate(self.prefill_matmul, rows)
        return self.rate(dtype)

    def prefill_int_matmul_rate(self, rows: int, hidden: int | None = None) -> float:
        """FLOP/s of a native int layer's prefill matmul over `rows` rows in a model of `hidden` (the
        probe's figure in the dtype it chose, else the float32 one): between the probe's two block
        widths linear in log2(hidden), flat beyond them."""
        if not self.prefill_int_matmul:
            return self.prefill_matmul_rate("fp32", rows)
        base = _log_interpolate(self.prefill_int_matmul, rows)
        narrow, wide = self.prefill_hiddens
        if not hidden or not self.prefill_int_matmul_wide or not 0 < narrow < wide:
            return base
        wider = _log_interpolate(self.prefill_int_matmul_wide, rows)
        return _log_interpolate(((narrow, base), (wide, wider)), hidden)

    def prefill_int_convert_s(self, rows: int, out_features: int, in_features: int) -> float:
        """Seconds a native int layer's prefill spends converting its activations for a half-dtype
        matmul over `rows` rows (0 where the probe chose float32 or measured no conversions)."""
        if not self.prefill_int_convert:
            return 0.0
        return rows * (out_features + in_features) * 6.0 * _log_interpolate(self.prefill_int_convert, rows)

    def prefill_attention_rate(self, dtype: str, length: int) -> float:
        """FLOP/s of causal attention over a prompt of `length` tokens (measured, else the peak rate)."""
        if dtype == "fp32" and self.prefill_attention:
            return _log_interpolate(self.prefill_attention, length)
        return self.rate(dtype)

    def prefill_run_attention_rate(self, length: int) -> float:
        """FLOP/s of the attention core of lwdsl's own prefill (`LeanLlama`, `native.prefill_attention`:
        the dtype the probe chose) over a prompt of `length` tokens, else the float32 figure."""
        if self.prefill_attention_run:
            return _log_interpolate(self.prefill_attention_run, length)
        return self.prefill_attention_rate("fp32", length)

    def elementwise_Bps(self, rows: int) -> float:
        """Bytes/s the eager elementwise ops of a prefill over `rows` rows move (measured, else the
        streaming bandwidth: the ops read and write every value once)."""
        if self.prefill_elementwise:
            return _log_interpolate(self.prefill_elementwise, rows)
        return self.bandwidth_Bps


class LinkSpec(Record):
    a: str
    b: str
    rate_Bps: float
    latency_s: float = 0.0
    hops: tuple[str, ...] = ()  # a route's nodes from a to b (`lwdsl.hardware.topology`); empty for a declared link


class SwitchSpec(Record):
    """v1 `switch`: its members reach each other through it, each port at `rate_Bps` (per direction)."""

    name: str
    devices: tuple[str, ...]
    rate_Bps: float
    latency_s: float = 0.0


class CallRate(Record):
    """One collective (or copy) over a whole tensor of B bytes: `latency_s + B / Bps` a call."""

    Bps: float
    latency_s: float = 0.0

    def seconds(self, nbytes: float, calls: int = 1) -> float:
        return calls * self.latency_s + nbytes / self.Bps if nbytes > 0 or calls > 0 else 0.0


class CollectiveRates(Record):
    """What N data-parallel ranks on one measured machine exchange tensors at (`probe_collective`)."""

    ranks: int
    threads: int
    transport: str = "gloo"
    all_gather: CallRate
    reduce_scatter: CallRate
    all_reduce: CallRate
    clone: CallRate  # a plain copy into fresh memory, every rank at once
    # (rows, FLOP/s) one rank's training-step matmuls (forward and backward) run at, all ranks at once
    train_matmul: tuple[tuple[int, float], ...] = ()
    source: str = "probe"

    def train_matmul_rate(self, rows: int) -> float:
        """FLOP/s of a rank's training matmuls over `rows` rows (piecewise linear in log2(rows)); 0: not measured."""
        return _log_interpolate(self.train_matmul, rows) if self.train_matmul else 0.0


class ResolvedTarget(Record):
    name: str | None = None
    devices: dict[str, DeviceSpec]
    links: dict[tuple[str, str], LinkSpec] = Field(default_factory=dict)  # (a, b) and (b, a) both present
    switches: tuple[SwitchSpec, ...] = ()
    # the fastest path between two devices over links and switches (`lwdsl.hardware.topology.route_table`,
    # filled by `resolve_target`); empty: only the declared links join devices
    routes: dict[tuple[str, str], LinkSpec] = Field(default_factory=dict)
    # collectives among N ranks on this one measured machine, by N (`lwdsl.hardware.probe_collective`,
    # attached for training plans by `with_local_collectives`); empty: priced at memory bandwidth
    collectives: dict[int, CollectiveRates] = Field(default_factory=dict)

    def device(self, name: str) -> DeviceSpec:
        return self.devices[name]

    def link(self, a: str, b: str) -> LinkSpec | None:
        """The declared link between two devices (either order), None when there is none."""
        return self.links.get((a, b))

    def route(self, a: str, b: str) -> LinkSpec | None:
        """How traffic goes from a to b: the routed path (slowest hop's rate, summed latency), None when no
        path joins them. A target built without routes has its declared links only."""
        if a == b:
            return None
        return self.routes.get((a, b)) if self.routes else self.links.get((a, b))

    def compute_devices(self) -> list[str]:
        """Devices that compute, in declaration order."""
        return [name for name, spec in self.devices.items() if spec.computes]

    def storage_devices(self) -> list[str]:
        return [name for name, spec in self.devices.items() if not spec.computes]

"""What `lwdsl check` found, as plain frozen records: the one result object every report renders.

The JSON form (`CheckReport.model_dump_json`) is a stable contract, documented in docs/CHECK.md:
fields may be added, none removed or renamed without bumping `schema_version`.
All quantities are in base units: bytes, seconds, tokens per second, dollars per hour; quality as a
relative perplexity change (0.05 = +5%) or nats per token.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "lwdsl.check/1"


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Measurements(Record):
    """One model measured on this machine: the artifact, or the original (`baseline`)."""

    memory_bytes: dict[str, int] = Field(default_factory=dict)  # peak per plan device name
    memory_total_bytes: int | None = None  # peak over all non-disk devices together
    resident_after_load_bytes: int | None = None  # CPU: resident above the floor once loaded, before running
    prefill_s: float | None = None  # time to first token, whole batch
    token_s: float | None = None  # one decode step, whole batch
    request_s: float | None = None  # prefill and every generated token
    throughput_tok_s: float | None = None  # generated tokens per second, whole batch
    decode_step: str | None = None  # how decode steps ran: "fused" (one native call) or "eager: <why>"
    stream_read_Bps: float | None = None  # streamed (offloaded) blocks: bytes/s their reads ran at
    token_read_Bps: float | None = None  # CPU: memory read rate sampled beside the timed runs (median)
    perplexity: float | None = None  # on the evaluation windows
    perplexity_increase: float | None = None  # relative to the original: 0.05 = +5%
    kld: float | None = None  # mean KL(original || this) per token, nats
    cost_per_h: float | None = None  # $/h of the devices used (from the plan, not measured)
    training_time_s: float | None = None  # training plans: the whole run at the measured step time
    step_s: float | None = None  # training plans: median seconds an optimizer step


class RequirementResult(Record):
    """One `require` line: what it asks, what the solver predicted, what was measured, the verdict."""

    line: int  # line of the plan file
    text: str  # the line as written, e.g. "memory cpu0 <= 150 MiB"
    metric: str  # "memory cpu0", "latency token", "quality perplexity", ...
    op: str  # "<=", "<", ">=", ">"
    required: float  # base units
    unit: str  # the unit the plan wrote, for display ("MiB", "ms", "%")
    predicted: float | None = None
    measured: float | None = None
    margin: float | None = None  # headroom in base units: > 0 means room to spare, < 0 a miss
    margin_relative: float | None = None  # margin / |required|
    passed: bool
    note: str | None = None  # why a figure is missing, or what it means


class PredictionResult(Record):
    """A solver prediction next to its measurement, whether or not a `require` line names it."""

    metric: str
    predicted: float
    measured: float
    error_relative: float  # (measured - predicted) / predicted


class CheckSettings(Record):
    eval_tokens: int
    eval_source: str
    batch: int
    context: int
    generate: int
    repeats: int
    warmup: int


class CheckReport(Record):
    schema_version: str = SCHEMA_VERSION
    plan: str  # plan name
    plan_file: str
    plan_hash: str
    artifact: str | None = None  # the folder measured (None: applied to a temporary folder)
    solution_status: str | None = None
    passed: bool
    requirements: list[RequirementResult] = Field(default_factory=list)
    predictions: list[PredictionResult] = Field(default_factory=list)
    measured: Measurements
    baseline: Measurements  # the original model, as its source gives it, on the same machine
    settings: CheckSettings
    machine: dict = Field(default_factory=dict)  # cpu count, torch version, ...
    notes: list[str] = Field(default_factory=list)

"""The solver's answer as plain data: a module name -> choice mapping with a version tag.

`solve` writes it (`solution.json`), `apply` reads it and looks a handler up by each choice's type,
`check` compares its `predicted` figures with measurements. No solver or torch object inside.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "lwdsl.solution/1"


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class QuantFormat(Record):
    """How one weight is stored: `fp32` (as loaded), `int4` group 128 asymmetric, ..."""

    dtype: Literal["fp32", "fp16", "bf16", "fp8", "int8", "int4", "nf4", "int2"] = "fp32"
    group: int | None = None  # None: one scale per output channel
    symmetric: bool = True

    def label(self) -> str:
        parts = [self.dtype]
        if self.group:
            parts.append(f"g{self.group}")
        if not self.symmetric:
            parts.append("asym")
        return " ".join(parts)


class PruneChoice(Record):
    """What is removed from one layer: nothing, a fraction of MLP channels / heads, or a mask."""

    kind: Literal["none", "channels", "heads", "unstructured", "2:4"] = "none"
    fraction: float = 0.0


class LayerChoice(Record):
    """Everything decided for one linear (or embedding) module."""

    name: str  # the module's name in the HF implementation: "model.layers.3.mlp.down_proj"
    block: int | None = None  # transformer block index; None for embedding / head / final norm
    format: QuantFormat = Field(default_factory=QuantFormat)
    prune: PruneChoice = Field(default_factory=PruneChoice)
    device: str  # where the weight lives (a disk device name means offloaded there)
    compute_device: str  # where it is computed
    kept: bool = False  # matched by `keep`: left exactly as it is
    note: str | None = None  # e.g. why a format was not an option for this layer
    loaded_as: str | None = None  # left as loaded (`format` fp32) but held in the checkpoint's dtype ("bf16")


class DeviceMemory(Record):
    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    activations_bytes: int = 0
    runtime_bytes: int = 0  # the runtime itself (libraries, allocator pools) where the device computes
    total_bytes: int = 0


class MemoryPrediction(Record):
    by_device: dict[str, DeviceMemory] = Field(default_factory=dict)
    total_bytes: int = 0  # all non-disk devices together


class LatencyPrediction(Record):
    prefill_s: float | None = None
    token_s: float | None = None
    request_s: float | None = None


class QualityPrediction(Record):
    perplexity_increase: float = 0.0  # relative: 0.05 = +5%
    kld: float = 0.0  # nats per token
    source: Literal["profile", "prior"] = "prior"


class TrainingPrediction(Record):
    zero_stage: int = 0
    checkpoint_activations: bool = False
    accumulate: int = 1
    data_parallel: int = 1
    optimizer_offload: str | None = None
    model_states_bytes: int = 0
    flops: float = 0.0
    time_s: float = 0.0


class Predicted(Record):
    memory: MemoryPrediction = Field(default_factory=MemoryPrediction)
    latency: LatencyPrediction = Field(default_factory=LatencyPrediction)
    throughput_tok_s: float | None = None
    quality: QualityPrediction = Field(default_factory=QualityPrediction)
    cost_per_h: float | None = None
    training: TrainingPrediction | None = None


class Conflict(Record):
    """One `require` line (or capacity) in a minimal infeasible set, and where it would have to move."""

    line: int
    text: str
    needed: str | None = None  # "memory cpu0 <= 212 MiB", in the plan's own units


class RecoverChoice(Record):
    """Distillation after compression (`recover distill up to N steps`): the solver's step count."""

    method: Literal["distill"] = "distill"
    steps: int = 0
    recovered_fraction: float = 0.0  # of the compression's quality loss, predicted
    unrecovered_perplexity_increase: float = 0.0  # what the compression alone predicts
    unrecovered_kld: float = 0.0
    time_s: float = 0.0  # predicted seconds of the distillation on this machine
    curve_source: str = "prior"  # "profile" (measured and fitted) or "prior"


class Solution(Record):
    schema_version: str = SCHEMA_VERSION
    plan_name: str
    plan_hash: str  # sha256 of the plan text
    status: Literal["OPTIMAL", "FEASIBLE", "INFEASIBLE", "UNKNOWN"]
    gap: float | None = None
    objective: list[dict] = Field(default_factory=list)  # [{"metric": "latency token", "value": ...}]
    layers: list[LayerChoice] = Field(default_factory=list)
    kv_format: QuantFormat = Field(default_factory=QuantFormat)
    tensor_parallel: int = 1
    pipeline_stages: list[str] = Field(default_factory=list)  # compute devices in block order
    devices_used: list[str] = Field(default_factory=list)
    predicted: Predicted = Field(default_factory=Predicted)
    conflicts: list[Conflict] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    recover: RecoverChoice | None = None  # `recover distill`: the steps chosen and what they predict
    # The dtype each part of a prefill was priced in ("int": native int layers' matmul, "attention"),
    # by activation rows: this CPU's probe at solve time. The executor of the artifact runs these where
    # no current probe of its CPU chooses (`lwdsl.apply.native.prefill_dtype`).
    prefill_dtypes: dict[str, dict[int, str]] = Field(default_factory=dict)


class ProfileEntry(Record):
    """Measured quality loss of one option applied to one layer alone (written by `lwdsl profile`)."""

    layer: str
    format: QuantFormat = Field(default_factory=QuantFormat)
    prune: PruneChoice = Field(default_factory=PruneChoice)
    kld: float  # mean KL divergence per token to the original, nats
    perplexity_increase: float  # relative: 0.01 = +1%
    # the same on each calibration text alone: {`text:` source: (kld, perplexity_increase)}; the
    # figures above are their mix (`lwdsl.profile.store.find_profile` picks the plan's `eval` text's)
    by_text: dict[str, tuple[float, float]] = Field(default_factory=dict)


class QualityProfile(Record):
    """The per-layer sensitivity table the solver reads instead of priors when it exists."""

    schema_version: str = "lwdsl.profile/1"
    model_hash: str  # identifies the weights the profile was measured on
    text_hash: str  # identifies the calibration text and token count
    baseline_perplexity: float
    entries: list[ProfileEntry] = Field(default_factory=list)

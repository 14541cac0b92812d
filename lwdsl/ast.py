"""The plan as data: frozen pydantic nodes, each with its span; no parser objects inside.

Quantities are normalised on the way in to SI-like base units (see `Quantity.kind`) and keep their
original text for messages and for `fmt`. Every later stage reads these nodes and nothing else of
the source text.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from lwdsl.errors import Span


class Node(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    span: Span = Field(default_factory=Span)


QuantityKind = Literal[
    "size",  # bytes
    "bandwidth",  # bytes per second
    "compute",  # FLOP/s (or integer OP/s when `integer`)
    "time",  # seconds
    "token_rate",  # generated tokens per second
    "money",  # dollars per device-hour
    "percent",  # a fraction: `5%` -> 0.05; `relative` when written `+5%`
    "number",  # a bare number (batch sizes, KL divergence in nats, counts)
]


class Quantity(Node):
    """A number with its unit, normalised: `8 GiB` -> value=8589934592, kind="size", text="8 GiB"."""

    value: float
    kind: QuantityKind
    text: str
    unit: str = ""  # the unit as written (`GiB`), empty for a bare number
    relative: bool = False  # `+5%`: an increase relative to the original model
    integer: bool = False  # `TOPS`: an integer-op rate rather than FLOP/s


class Comment(Node):
    text: str  # without the leading `#`


# --- model ------------------------------------------------------------------------------------------

class TextSource(Node):
    """`eval "text:FILE" tokens 4096` / `calibrate ...`."""

    source: str  # as written, e.g. "text:data/eval.txt" or "text:python-docs"
    tokens: int | None = None


class ModelBlock(Node):
    source: str  # as written, with its scheme: "gguf:models/x.gguf", "arch:llama-3.1-70b", ...
    scheme: Literal["hf", "gguf", "arch", "config"]
    location: str  # the part after the scheme (a path as written, or a catalog id)
    eval: TextSource | None = None
    calibrate: TextSource | None = None


# --- target -----------------------------------------------------------------------------------------

class Device(Node):
    name: str  # a group's stem: `device gpu[8] ...` declares gpu0 .. gpu7
    count: int | None = None  # v1 `NAME[COUNT]`: a group of identical devices; None for one device
    kind: Literal["cpu", "gpu", "disk"]
    catalog: str | None = None  # "rtx-4090", "local", ...
    memory: Quantity | None = None
    bandwidth: Quantity | None = None
    compute: Quantity | None = None
    price: Quantity | None = None


class Link(Node):
    a: str  # a device name, or a group reference as written canonically: `gpu[*]`, `gpu[2..5]`
    b: str
    rate: Quantity
    latency: Quantity | None = None


class Switch(Node):
    """v1 `switch NAME { DEVICES } [RATE] [latency T]`: the devices reach each other through one switch,
    each device's port at `rate` (None: the catalog's interconnect of the member GPUs)."""

    name: str
    devices: tuple[str, ...]  # device names or group references, as written
    rate: Quantity | None = None
    latency: Quantity | None = None


class Target(Node):
    name: str | None = None
    devices: tuple[Device, ...] = ()
    links: tuple[Link, ...] = ()
    switches: tuple[Switch, ...] = ()


# --- workload ---------------------------------------------------------------------------------------

class InferenceWorkload(Node):
    type: Literal["inference"] = "inference"
    batch: int = 1
    context: int = 512
    generate: int = 128


class TrainingWorkload(Node):
    type: Literal["training"] = "training"
    batch: int = 1
    sequence: int = 2048
    tokens: int = 0  # dataset size D in tokens
    optimizer: Literal["adamw", "sgd"] = "adamw"
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"


Workload = Annotated[Union[InferenceWorkload, TrainingWorkload], Field(discriminator="type")]


# --- require and objective --------------------------------------------------------------------------

class Metric(Node):
    """`memory`, `memory cpu0`, `latency token|prefill|request`, `throughput`,
    `quality perplexity|kld`, `cost`, `time`."""

    name: Literal["memory", "latency", "throughput", "quality", "cost", "time"]
    qualifier: str | None = None  # device name, latency phase, or quality measure


class Constraint(Node):
    metric: Metric
    op: Literal["<=", "<", ">=", ">"]
    value: Quantity


class ObjectiveTerm(Node):
    direction: Literal["minimize", "maximize"]
    metric: Metric


class Objective(Node):
    """`minimize A then B`: lexicographic; each term keeps the direction it was written under."""

    terms: tuple[ObjectiveTerm, ...]


# --- allow ------------------------------------------------------------------------------------------

WeightDType = Literal["fp32", "fp16", "bf16", "fp8", "int8", "int4", "nf4", "int2"]


class Format(Node):
    """`int4 group 128 asymmetric`: dtype, optional group size (None = per output channel)."""

    dtype: WeightDType
    group: int | None = None
    symmetric: bool = True


class QuantizeWeights(Node):
    technique: Literal["quantize_weights"] = "quantize_weights"
    formats: tuple[Format, ...]


class QuantizeKV(Node):
    technique: Literal["quantize_kv"] = "quantize_kv"
    formats: tuple[Format, ...]


class Prune(Node):
    technique: Literal["prune"] = "prune"
    kind: Literal["unstructured", "channels", "heads", "2:4"]
    up_to: Quantity | None = None  # a percent; None for 2:4


class Shard(Node):
    technique: Literal["shard"] = "shard"
    kind: Literal["tensor", "pipeline", "data"]
    up_to: int | None = None  # None for pipeline


class Offload(Node):
    technique: Literal["offload"] = "offload"
    devices: tuple[str, ...]


class OffloadOptimizer(Node):
    technique: Literal["offload_optimizer"] = "offload_optimizer"
    device: str


class Selector(Node):
    """A module name (`lm_head`) or a quoted glob (`"model.layers.*.mlp.down_proj"`)."""

    pattern: str
    quoted: bool = False


class Keep(Node):
    technique: Literal["keep"] = "keep"
    selectors: tuple[Selector, ...]


class Zero(Node):
    technique: Literal["zero"] = "zero"
    low: int = 0
    high: int = 3


class Checkpoint(Node):
    technique: Literal["checkpoint"] = "checkpoint"


class Accumulate(Node):
    technique: Literal["accumulate"] = "accumulate"
    up_to: int


class Recover(Node):
    """`recover distill up to N steps` (v1): distillation from the original model after compression."""

    technique: Literal["recover"] = "recover"
    method: Literal["distill"] = "distill"
    up_to_steps: int


class Within(Node):
    technique: Literal["within"] = "within"
    selector: Selector
    techniques: tuple["Technique", ...]


Technique = Annotated[
    Union[QuantizeWeights, QuantizeKV, Prune, Shard, Offload, OffloadOptimizer, Keep, Zero,
          Checkpoint, Accumulate, Recover, Within],
    Field(discriminator="technique"),
]


class Allow(Node):
    techniques: tuple[Technique, ...] = ()


# --- the plan ---------------------------------------------------------------------------------------

class Plan(Node):
    name: str
    model: ModelBlock
    target: Target
    workload: Workload = Field(default_factory=InferenceWorkload)
    require: tuple[Constraint, ...] = ()
    allow: Allow = Field(default_factory=Allow)
    objective: Objective | None = None  # None: the default `minimize quality then memory then latency token`
    comments: tuple[Comment, ...] = ()  # kept for `fmt`; meaning never depends on them


Within.model_rebuild()
Allow.model_rebuild()
Plan.model_rebuild()

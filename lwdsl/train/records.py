"""What a training run is told and what it reports: plain frozen records, no torch."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RunConfig(Record):
    """Everything a rank needs; the same object on every rank."""

    model_dir: str  # a Hugging Face folder (a GGUF source is converted once, `lwdsl.models.load`)
    ranks: int
    zero_stage: int
    checkpoint_activations: bool
    accumulate: int
    micro_batch: int
    sequence: int
    precision: str  # fp32 | bf16 | fp16 (autocast around the forward; master weights stay fp32)
    optimizer: str  # adamw | sgd
    offload_optimizer: bool = False
    steps: int
    lr: float = 1e-4
    seed: int = 0
    out_dir: str
    checkpoint_every: int = 10
    text_hash: str = ""
    device: str = "cpu"  # cpu (gloo) or cuda (nccl)
    threads: int = 1  # torch threads per rank

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.ranks * self.accumulate

    def fingerprint(self) -> dict:
        """What a checkpoint must share with the run that resumes it (the data order and the model)."""
        return {"model_dir": self.model_dir, "global_batch": self.global_batch, "sequence": self.sequence,
                "text_hash": self.text_hash, "optimizer": self.optimizer, "seed": self.seed}


class Measured(Record):
    peak_memory_bytes: int  # the largest rank's peak resident bytes above its floor
    peak_memory_by_rank: list[int] = Field(default_factory=list)
    step_s: float  # median seconds a step (the first step of a run excluded)
    tokens_per_s: float


class PredictedStep(Record):
    peak_memory_bytes: int
    step_s: float
    tokens_per_s: float
    # the step's parts (`cost.training.step_figures`): forward and backward, the optimizer, the collectives
    compute_s: float = 0.0
    optimizer_s: float = 0.0
    collective_s: float = 0.0


class TrainReport(Record):
    schema_version: str = "lwdsl.train/1"
    plan: str
    steps: int  # the steps this run has reached (counting those before a resume)
    ranks: int
    zero_stage: int
    checkpoint_activations: bool
    accumulate: int
    micro_batch: int
    sequence: int
    precision: str
    optimizer_offload: str | None = None
    resumed_from: int = 0  # the step the run resumed at (0: from scratch)
    loss: list[float]  # one value a step, from step 1
    measured: Measured
    predicted: PredictedStep
    checkpoint: str | None = None  # the last checkpoint folder written
    notes: list[str] = Field(default_factory=list)

"""Training memory and time. Pure; no torch.

Model states per ZeRO stage follow Rajbhandari et al. 2020 ("ZeRO", §3 and Fig. 1) and DeepSpeed's
`estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs`: mixed-precision
Adam keeps 2 (16-bit params) + 2 (16-bit grads) + 12 (fp32 master params, momentum, variance) bytes a
parameter; stage 1 partitions the 12 over the N data-parallel ranks, stage 2 also the gradients,
stage 3 also the parameters. Activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation
in Large Transformer Models", §4): s·b·h·(34 + 5·a·s/h) bytes a layer in 16-bit; with full
checkpointing only each layer's 2·s·b·h input is kept, plus one layer recomputed at a time.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from lwdsl.inventory.records import ArchNumbers

# Bytes a parameter for (params, grads, optimizer states) by precision and optimizer.
_PARAM_GRAD = {"fp32": (4, 4), "bf16": (2, 2), "fp16": (2, 2)}
_OPTIMIZER = {  # fp32 master copy (mixed precision only) + the optimizer's own states
    ("adamw", True): 12, ("adamw", False): 8,  # master + m + v / m + v
    ("sgd", True): 8, ("sgd", False): 4,  # master + momentum / momentum
}
# Model FLOPs utilisation: the fraction of peak a well-tuned large run achieves (PaLM, Chowdhery et
# al. 2022, Table 3: 46%; Megatron-LM, Narayanan et al. 2021: 52%). Used for the achieved rate.
DEFAULT_MFU = 0.4


class ModelStates(BaseModel):
    """Bytes a data-parallel rank holds, and what an optimizer offload moves elsewhere."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int  # on the rank, 0 when offloaded
    offloaded_bytes: int = 0  # on the offload device (per rank)

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes


def model_states(params: int, zero_stage: int, data_parallel: int = 1, precision: str = "bf16",
                 optimizer: str = "adamw", offload_optimizer: bool = False) -> ModelStates:
    """Per-rank model states under ZeRO stage 0-3 (ZeRO §3: Ψ·(2+2+K) at stage 0, Ψ·(2+2)+KΨ/N at 1,
    2Ψ+(2+K)Ψ/N at 2, (2+2+K)Ψ/N at 3; K = 12 for mixed-precision Adam).

    >>> model_states(7_500_000_000, 0).total_bytes
    120000000000
    """
    param_b, grad_b = _PARAM_GRAD[precision]
    optim_b = _OPTIMIZER[(optimizer, precision != "fp32")]
    n = max(1, data_parallel)
    params_bytes = params * param_b // (n if zero_stage >= 3 else 1)
    grads_bytes = params * grad_b // (n if zero_stage >= 2 else 1)
    optimizer_bytes = params * optim_b // (n if zero_stage >= 1 else 1)
    if offload_optimizer:
        return ModelStates(params_bytes=params_bytes, grads_bytes=grads_bytes, optimizer_bytes=0,
                           offloaded_bytes=optimizer_bytes)
    return ModelStates(params_bytes=params_bytes, grads_bytes=grads_bytes, optimizer_bytes=optimizer_bytes)


def activation_bytes(arch: ArchNumbers, micro_batch: int, sequence: int, checkpoint: bool,
                     precision: str = "bf16") -> int:
    """Activation memory of one micro-batch (Korthikanti et al. 2022, eq. 1, no tensor parallelism):
    L · s·b·h·(34 + 5·a·s/h) in 16-bit; checkpointed: L · 2·s·b·h + one layer's full activations."""
    s, b, h, a = sequence, micro_batch, arch.hidden, arch.heads
    scale = 2.0 if precision == "fp32" else 1.0  # the 34 counts 16-bit values; fp32 doubles it
    per_layer = s * b * h * (34 + 5 * a * s / h) * scale
    if checkpoint:
        return int(arch.layers * 2 * s * b * h * scale + per_layer)
    return int(arch.layers * per_layer)


def training_flops(params: int, tokens: int, checkpoint: bool = False) -> float:
    """C = 6·P·D (Kaplan et al. 2020, §2.1: 2 forward + 4 backward per parameter per token);
    full activation checkpointing recomputes the forward: 8·P·D."""
    return (8.0 if checkpoint else 6.0) * params * tokens


def training_time_s(flops: float, devices: int, peak_rate: float, mfu: float = DEFAULT_MFU) -> float:
    """T = C / (devices × achieved rate), achieved = peak × model-FLOPs utilisation."""
    achieved = devices * peak_rate * mfu
    return flops / achieved if achieved > 0 else float("inf")

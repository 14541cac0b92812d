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


# --- one step of lwdsl's own trainer (`lwdsl.train`: DDP / ZeroRedundancyOptimizer / FSDP2) ----------------
# What the executor holds and does, priced on the device's measured figures. The trainer keeps fp32
# master parameters, fp32 gradients and the optimizer's fp32 states whatever the precision (bf16 /
# fp16 run the forward under autocast, which caches a 16-bit copy of the weights it casts).
FP32 = 4
_STATE_VALUES = {"adamw": 2, "sgd": 1}  # exp_avg + exp_avg_sq / momentum, fp32 each
# Fused optimizer step: reads param, grad and states, writes param and states, once each.
_OPTIMIZER_PASS_VALUES = {"adamw": 7, "sgd": 5}


class StepFigures(BaseModel):
    """One optimizer step on one rank: memory at its peak and seconds, with their parts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    runtime_bytes: int
    peak_bytes: int
    compute_s: float
    optimizer_s: float
    collective_s: float
    step_s: float
    tokens_per_s: float


def block_params(arch: ArchNumbers) -> int:
    """Parameters of one decoder block (attention, MLP, two norms)."""
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    return arch.hidden * (q + 2 * kv) + q * arch.hidden + 3 * arch.hidden * arch.intermediate + 2 * arch.hidden


def activation_values_per_token(arch: ArchNumbers) -> int:
    """Values autograd keeps per token and block for the backward of a Hugging Face Llama block in
    eager mode (SDPA attention, which keeps its inputs, output and a log-sum-exp, no s² matrix):
    two RMS norms keep their input and normalised output (4h); q, k, v projections' outputs and their
    rotary results (2q + 4kv), the key/value heads repeated for grouped-query attention (2q), the
    attention output and its row copy for o_proj (2q); gate, up, SiLU(gate) and the product (4i)."""
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    return 4 * arch.hidden + 2 * q + 4 * kv + 2 * q + 2 * q + 4 * arch.intermediate


def trainer_activation_bytes(arch: ArchNumbers, micro_batch: int, sequence: int, checkpoint: bool) -> int:
    """fp32 activations of one micro-batch at the end of the forward, plus the logits' workspace
    (logits, their log-softmax for the loss, and its gradient: 3 · tokens · vocab values)."""
    tokens = micro_batch * sequence
    per_block = activation_values_per_token(arch) * tokens * FP32
    kept = arch.layers * (arch.hidden * tokens * FP32 if checkpoint else per_block)
    if checkpoint:
        kept += per_block  # the block being recomputed
    return int(kept + 3 * tokens * arch.vocab * FP32 + 2 * tokens * arch.hidden * FP32)


def _host_share(target, ranks: list[str]) -> int:
    """Ranks that are this same measured machine (`"local"`) split its cores and memory bandwidth."""
    local = [n for n in ranks if target.device(n).catalog == "local"]
    return max(1, len(local))


def _sharded_param_bytes(arch: ArchNumbers, params: int, zero_stage: int, n: int) -> int:
    """Parameters resident at the step's peak: whole below stage 2; stage 2 keeps its shard and the
    gathered whole for forward and backward (FSDP2 without resharding); stage 3 its shard plus the
    units gathered at once: the root (embedding, tied head, final norm) and two blocks (one computing,
    one prefetched)."""
    if zero_stage < 2 or n == 1:
        return params * FP32
    shard = params * FP32 // n
    if zero_stage == 2:
        return shard + params * FP32
    root = params - arch.layers * block_params(arch)
    return shard + (root + 2 * block_params(arch)) * FP32


def _collective_s(inventory, target, zero_stage: int, n: int, share: int, accumulate: int) -> float:
    """Seconds of a step's collectives: on the measured collective figures of `n` ranks on this machine
    (`train_collectives`, the probe's `collective:gloo:NxT` record) when every rank is local and they were
    measured; else ring collectives at the memory bandwidth the ranks share (2(N-1)/N of the gradient
    bytes all-reduced at stages 0-1 and stage 1's parameters gathered; FSDP2's reduce-scatter and one or
    two all-gathers, (N-1)/N each, every micro-batch)."""
    if n < 2:
        return 0.0
    rates = target.collectives.get(n) if share == n else None
    if rates is not None:
        from lwdsl.cost.train_collectives import step_collectives

        return step_collectives(inventory, rates, zero_stage, accumulate).total_s
    grad_bytes_all = inventory.params() * FP32
    ring = (n - 1) / n
    if zero_stage <= 1:
        moved = 2 * ring * grad_bytes_all + (ring * grad_bytes_all if zero_stage == 1 else 0.0)
    else:
        moved = max(1, accumulate) * ((1 if zero_stage == 2 else 2) + 1) * ring * grad_bytes_all
    spec = target.device(target.compute_devices()[0])
    return moved / (spec.bandwidth_Bps / share)


def step_figures(inventory, target, workload, zero_stage: int = 0, data_parallel: int | None = None,
                 checkpoint: bool = False, accumulate: int = 1, offload_optimizer: str | None = None) -> StepFigures:
    """Peak bytes on one rank and seconds of one optimizer step of lwdsl's trainer.

    Time: each micro-batch runs the forward, the backward (twice the forward's matmul FLOPs) and,
    checkpointing, the forward again; the matmuls at the device's measured rate for that many rows
    (`prefill_matmul_rate`; for ranks on this machine with a collective probe, the FLOP/s its ranks
    achieved on training matmuls all at once, `CollectiveRates.train_matmul`), attention at its measured rate, the elementwise work at the measured
    elementwise bandwidth (three passes: forward, and twice that backward). Ranks on one measured
    machine split its rates and bandwidth evenly. The fused optimizer step streams its values once at
    the memory bandwidth. The collectives (`_collective_s`: DDP's bucketed all-reduces, FSDP2's per-unit
    all-gathers and reduce-scatters, on the probe's measured gloo figures for local ranks) are added, not
    overlapped: ranks sharing one host's cores run gloo's transfers on the same cores as their compute.
    """
    from lwdsl.cost.time import attention_flops, lean_elementwise_values

    arch = inventory.arch
    ranks = target.compute_devices()[: max(1, data_parallel or 1)]
    n = len(ranks)
    spec = target.device(ranks[0])
    share = _host_share(target, ranks)
    params = inventory.params()
    micro_batch = max(1, -(-workload.batch // (n * max(1, accumulate))))
    tokens = micro_batch * workload.sequence
    states_values = _STATE_VALUES[workload.optimizer]
    params_bytes = _sharded_param_bytes(arch, params, zero_stage, n)
    if workload.precision != "fp32":
        params_bytes += params * 2  # autocast's 16-bit copies of the weights
    grads_bytes = params * FP32 // (n if zero_stage >= 2 else 1)
    optimizer_bytes = params * states_values * FP32 // (n if zero_stage >= 1 else 1)
    resident_optimizer = 0 if offload_optimizer is not None and spec.kind == "gpu" else optimizer_bytes
    activations = trainer_activation_bytes(arch, micro_batch, workload.sequence, checkpoint)
    runtime = spec.runtime_bytes
    if zero_stage <= 1:
        # DDP's gradients are views into its all-reduce buckets, which live from step to step: the
        # backward's peak holds them and the forward's activations together
        peak = runtime + params_bytes + resident_optimizer + grads_bytes + activations
    else:
        # FSDP2 frees the gradients between steps; the backward frees activations as it makes them.
        # Its last unit (the root: embedding, tied head, final norm) ends the backward holding its whole
        # gradient and the reduce-scatter's copy of it beside the sharded gradients of the others
        root = params - arch.layers * block_params(arch)
        peak = runtime + params_bytes + resident_optimizer + max(activations, grads_bytes + 2 * root * FP32)

    dtype = "fp32" if workload.precision == "fp32" else workload.precision
    measured = target.collectives.get(n) if n > 1 and share == n else None
    matmul_rate = spec.prefill_matmul_rate(dtype, tokens) / share
    if measured is not None and measured.train_matmul and dtype == "fp32":
        matmul_rate = measured.train_matmul_rate(tokens)  # what a rank achieves beside its peers
    linear_numel = sum(w.numel for w in inventory.linear_layers())
    matmul_flops = 2.0 * tokens * linear_numel
    attention = attention_flops(micro_batch, arch.heads, arch.head_dim, workload.sequence, (workload.sequence + 1) / 2)
    attention_rate = spec.prefill_attention_rate("fp32", workload.sequence) / share
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    elementwise_bytes = arch.layers * lean_elementwise_values(arch.hidden, q, kv, arch.intermediate) * tokens * FP32
    elementwise_bytes += 4 * tokens * arch.vocab * FP32  # log-softmax and its gradient over the logits
    elementwise_rate = spec.elementwise_Bps(tokens) / share
    forward_s = matmul_flops / matmul_rate + attention / attention_rate + elementwise_bytes / elementwise_rate
    passes = 4 if checkpoint else 3  # forward + backward (2x) [+ recomputed forward]
    compute_s = max(1, accumulate) * passes * forward_s
    local_values = params // (n if zero_stage >= 1 else 1)
    optimizer_s = local_values * _OPTIMIZER_PASS_VALUES[workload.optimizer] * FP32 / (spec.bandwidth_Bps / share)
    collective_s = _collective_s(inventory, target, zero_stage, n, share, accumulate)
    step_s = compute_s + optimizer_s + collective_s
    return StepFigures(params_bytes=params_bytes, grads_bytes=grads_bytes, optimizer_bytes=resident_optimizer,
                       activations_bytes=activations, runtime_bytes=runtime, peak_bytes=int(peak),
                       compute_s=compute_s, optimizer_s=optimizer_s, collective_s=collective_s, step_s=step_s,
                       tokens_per_s=n * max(1, accumulate) * tokens / step_s if step_s > 0 else 0.0)

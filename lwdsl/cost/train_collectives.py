"""Seconds of one training step's collectives, by ZeRO stage, on measured collective figures. Pure; no torch.

What each engine of `lwdsl.train.zero` calls, per optimizer step on one rank (every call of a collective
over a whole tensor of B bytes costs `latency_s + B / Bps`, `hardware.records.CallRate`, measured for
this many ranks by `hardware.probe_collective`):

| stage | engine | calls a step |
|---|---|---|
| 0 | DDP | one all-reduce per gradient bucket (DDP's buckets: 1 MiB first, then 25 MiB, filled in reverse registration order), on the last micro-batch only |
| 1 | DDP + ZeroRedundancyOptimizer | the same all-reduces, then every rank broadcasts its updated parameters (one call per parameter tensor: priced as an all-gather of the whole parameters) |
| 2 | FSDP2, no reshard after forward | each micro-batch: one all-gather per unit (forward; the parameters stay gathered through the backward) and one reduce-scatter per unit |
| 3 | FSDP2, reshard after forward | each micro-batch: one all-gather per unit in the forward and again in the backward, one reduce-scatter per unit |

Units are FSDP2's: one per decoder block plus the root (embedding, tied head, final norm). FSDP2 also
copies (`torch.distributed.fsdp._fully_shard._fsdp_collectives`): each all-gather's shard into its send
buffer (1/N of the unit) and the gathered unit out of it into the parameters' own storage (the whole
unit), and each unit's gradients into the reduce-scatter's input (the whole unit, `chunk_cat`): plain
copies into fresh memory, at the measured `clone` rate.

Ranks that share one host's cores (the case the probe measures) cannot overlap these with compute:
gloo's transfers are CPU work too, so the step's time is compute + optimizer + collectives.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

FP32 = 4
DDP_FIRST_BUCKET_BYTES = 1 << 20  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
DDP_BUCKET_BYTES = 25 << 20  # DistributedDataParallel(bucket_cap_mb=25)


class CollectiveTime(BaseModel):
    """One step's collective seconds on one rank, with the calls and bytes that make them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    all_reduce_s: float = 0.0
    all_gather_s: float = 0.0
    reduce_scatter_s: float = 0.0
    copy_s: float = 0.0
    calls: int = 0
    bytes_moved: int = 0  # whole-tensor bytes over all calls

    @property
    def total_s(self) -> float:
        return self.all_reduce_s + self.all_gather_s + self.reduce_scatter_s + self.copy_s


def parameter_tensor_bytes(inventory) -> list[int]:
    """fp32 bytes of each trained parameter tensor in registration order (tied copies counted once)."""
    return [w.numel * FP32 for w in inventory.weights if w.tied_to is None]


def ddp_buckets(tensor_bytes: list[int]) -> list[int]:
    """Bytes of each of DDP's gradient buckets: tensors taken in reverse registration order, a bucket
    closed once it reaches its cap (1 MiB for the first, 25 MiB after), as `_compute_bucket_assignment_by_size`."""
    buckets, current, cap = [], 0, DDP_FIRST_BUCKET_BYTES
    for nbytes in reversed(tensor_bytes):
        current += nbytes
        if current >= cap:
            buckets.append(current)
            current, cap = 0, DDP_BUCKET_BYTES
    if current:
        buckets.append(current)
    return buckets


def fsdp_units(inventory) -> list[int]:
    """fp32 bytes of each FSDP2 unit: one per decoder block, then the root (everything outside the blocks)."""
    blocks: dict[int, int] = {}
    root = 0
    for w in inventory.weights:
        if w.tied_to is not None:
            continue
        if w.block is None:
            root += w.numel * FP32
        else:
            blocks[w.block] = blocks.get(w.block, 0) + w.numel * FP32
    return [blocks[b] for b in sorted(blocks)] + [root]


def step_collectives(inventory, rates, zero_stage: int, accumulate: int = 1) -> CollectiveTime:
    """Seconds of one optimizer step's collectives on a rank, for `rates` (`CollectiveRates`) ranks."""
    tensors = parameter_tensor_bytes(inventory)
    whole = sum(tensors)
    micro = max(1, accumulate)
    if zero_stage <= 1:
        buckets = ddp_buckets(tensors)
        all_reduce = sum(rates.all_reduce.seconds(b) for b in buckets)
        calls, moved = len(buckets), whole
        gather = 0.0
        if zero_stage == 1:
            gather = rates.all_gather.seconds(whole, calls=len(tensors))
            calls, moved = calls + len(tensors), moved + whole
        return CollectiveTime(all_reduce_s=all_reduce, all_gather_s=gather, calls=calls, bytes_moved=moved)
    units = fsdp_units(inventory)
    gathers = 1 if zero_stage == 2 else 2  # forward only / forward and backward
    gather = micro * gathers * sum(rates.all_gather.seconds(u) for u in units)
    scatter = micro * sum(rates.reduce_scatter.seconds(u) for u in units)
    # all-gather: the shard copied into the send buffer (1/N of the unit) and the gathered unit out of it
    # into the parameters (all of it); reduce-scatter: the unit's gradients concatenated into its input
    share = 1.0 / max(1, rates.ranks)
    copies = micro * sum(gathers * (rates.clone.seconds(u * share) + rates.clone.seconds(u)) + rates.clone.seconds(u)
                         for u in units)
    return CollectiveTime(all_gather_s=gather, reduce_scatter_s=scatter, copy_s=copies,
                          calls=micro * (gathers + 1) * len(units), bytes_moved=micro * (gathers + 1) * whole)

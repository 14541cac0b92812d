"""The training samples: fixed windows of the plan's calibrate text, in a fixed order.

Sample `i` is window `i mod W` of the token stream (W = tokens // sequence). Step `s`, micro-step
`m`, rank `r` takes the global samples `((s·A + m)·N + r)·b ... + b-1` (A accumulation steps, N ranks,
b micro-batch), so the data position of a run is its step alone: a resumed run reads exactly the
samples an uninterrupted one would.
"""
from __future__ import annotations


def sample_ids(step: int, micro: int, rank: int, ranks: int, accumulate: int, micro_batch: int) -> list[int]:
    first = ((step * accumulate + micro) * ranks + rank) * micro_batch
    return list(range(first, first + micro_batch))


def windows(tokens: list[int], sequence: int) -> int:
    return len(tokens) // sequence


def batch(tokens: list[int], sequence: int, ids: list[int]):
    """A (len(ids), sequence) long tensor of the windows `ids` (cycled)."""
    import torch

    count = windows(tokens, sequence)
    rows = [tokens[(i % count) * sequence:(i % count + 1) * sequence] for i in ids]
    return torch.tensor(rows, dtype=torch.long)

"""Plan devices as torch devices, and the record of where a loaded model's blocks went.

A plan names its devices (`gpu0`, `host`, `ssd`); torch names them `cuda:N` and `cpu`. One rule maps
the first to the second, here so that the artifact (which writes each pipeline stage's torch device
into its manifest when it is applied) and the gate (which reads measured peaks back per plan device)
cannot disagree: gpu devices take CUDA indices in declaration order (the first gpu device is cuda:0,
whatever its name), every cpu device is the host ("cpu"), and a disk computes nothing, so it has none.

    torch_devices({"host": "cpu", "left": "gpu", "ssd": "disk", "right": "gpu"})
    == {"host": "cpu", "left": "cuda:0", "right": "cuda:1"}
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


def torch_devices(kinds: Mapping[str, str]) -> dict[str, str]:
    """Plan device name -> torch device for every device that computes; `kinds` in declaration order
    (name -> "cpu" | "gpu" | "disk")."""
    devices, gpus = {}, 0
    for name, kind in kinds.items():
        if kind == "cpu":
            devices[name] = "cpu"
        elif kind == "gpu":
            devices[name] = f"cuda:{gpus}"
            gpus += 1
    return devices


@dataclass(frozen=True)
class Placement:
    """Where a model's modules sit (`model.lwdsl_placement`, set by `place_pipeline` and `load`).

    `blocks`: the torch device of each decoder block, in block order; `io`: the device of the
    embedding, rotary table, final norm and head (the solver's "embedding + head" unit); `note`: how
    it was decided, in words (from the manifest, or overridden by the caller).
    """

    blocks: tuple[str, ...]
    io: str
    note: str = ""

    @property
    def devices(self) -> list[str]:
        """The distinct devices, in the order the forward pass meets them."""
        return list(dict.fromkeys((self.io, *self.blocks)))

    @property
    def pipelined(self) -> bool:
        return len(self.devices) > 1


def runs(blocks: tuple[str, ...] | list[str]) -> list[tuple[str, int, int]]:
    """Contiguous runs of equal devices: (device, first block, last block), for messages."""
    found: list[tuple[str, int, int]] = []
    for index, device in enumerate(blocks):
        if found and found[-1][0] == device and found[-1][2] == index - 1:
            found[-1] = (device, found[-1][1], index)
        else:
            found.append((device, index, index))
    return found


def describe_runs(blocks: tuple[str, ...] | list[str]) -> str:
    """`cuda:0 blocks 0-28, cuda:1 block 29`."""
    return ", ".join(f"{d} block {a}" if a == b else f"{d} blocks {a}-{b}" for d, a, b in runs(blocks))

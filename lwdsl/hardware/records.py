"""Resolved hardware as data: every device with numbers, every declared link keyed both ways."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


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
    source: str = "plan"  # where the figures come from

    @property
    def computes(self) -> bool:
        return self.kind != "disk"

    def rate(self, dtype: str) -> float:
        """Peak rate for a compute dtype, falling back to fp32 (what an unsupported dtype runs as)."""
        return self.rates.get(dtype) or self.rates.get("fp32", 0.0)


class LinkSpec(Record):
    a: str
    b: str
    rate_Bps: float
    latency_s: float = 0.0


class ResolvedTarget(Record):
    name: str | None = None
    devices: dict[str, DeviceSpec]
    links: dict[tuple[str, str], LinkSpec] = Field(default_factory=dict)  # (a, b) and (b, a) both present

    def device(self, name: str) -> DeviceSpec:
        return self.devices[name]

    def link(self, a: str, b: str) -> LinkSpec | None:
        """The declared link between two devices (either order), None when there is none."""
        return self.links.get((a, b))

    def compute_devices(self) -> list[str]:
        """Devices that compute, in declaration order."""
        return [name for name, spec in self.devices.items() if spec.computes]

    def storage_devices(self) -> list[str]:
        return [name for name, spec in self.devices.items() if not spec.computes]

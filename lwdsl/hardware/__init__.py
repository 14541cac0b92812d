"""Hardware: the catalog (with sources), the local probe, and a plan's target resolved to numbers."""
from __future__ import annotations

from lwdsl.hardware.catalog import hardware_entry, hardware_ids
from lwdsl.hardware.records import DeviceSpec, LinkSpec, ResolvedTarget
from lwdsl.hardware.resolve import resolve_device, resolve_target

__all__ = ["DeviceSpec", "LinkSpec", "ResolvedTarget", "hardware_entry", "hardware_ids",
           "resolve_device", "resolve_target"]

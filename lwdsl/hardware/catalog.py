"""The built-in hardware catalog (`lwdsl/data/hardware.json`): device figures with their sources."""
from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

DTYPES = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")
LOCAL = "local"


@cache
def _entries() -> dict[str, dict[str, Any]]:
    text = resources.files("lwdsl").joinpath("data").joinpath("hardware.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def hardware_ids() -> list[str]:
    """Catalog ids usable in `device NAME KIND "ID"`, `local` (measured) last."""
    return [*_entries(), LOCAL]


def hardware_entry(hardware_id: str) -> dict[str, Any]:
    """The catalog record of one id: kind, memory_bytes, bandwidth_Bps, rates, price_per_h, source."""
    return _entries()[hardware_id]

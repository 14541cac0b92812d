"""Quantities and their units: the unit table, conversion to base units, and how a kind is named.

    >>> quantity_from_text("8GiB").value
    8589934592.0
    >>> quantity_from_text("+5%").relative
    True

Base units: bytes, bytes/s, FLOP/s (OP/s for `TOPS`), seconds, tokens/s, $/h, fractions for percent.
The grammar's QUANTITY token lists the same units (tests/test_units.py keeps the two in step).
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

from lwdsl.ast import Quantity, QuantityKind
from lwdsl.errors import Span, fail


class Unit(NamedTuple):
    kind: QuantityKind
    factor: float
    integer: bool = False  # an integer-op rate (`TOPS`)


_SIZES = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
          "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30, "TiB": 2 ** 40}

UNITS: dict[str, Unit] = {
    **{name: Unit("size", factor) for name, factor in _SIZES.items()},
    **{f"{name}/s": Unit("bandwidth", factor) for name, factor in _SIZES.items()},
    "GFLOPS": Unit("compute", 1e9), "TFLOPS": Unit("compute", 1e12), "PFLOPS": Unit("compute", 1e15),
    "GFLOP/s": Unit("compute", 1e9), "TFLOP/s": Unit("compute", 1e12), "PFLOP/s": Unit("compute", 1e15),
    "GOPS": Unit("compute", 1e9, True), "TOPS": Unit("compute", 1e12, True),
    "POPS": Unit("compute", 1e15, True),
    "ns": Unit("time", 1e-9), "us": Unit("time", 1e-6), "ms": Unit("time", 1e-3), "s": Unit("time", 1.0),
    "min": Unit("time", 60.0), "h": Unit("time", 3600.0),
    "tok/s": Unit("token_rate", 1.0),
    "$/h": Unit("money", 1.0),
    "%": Unit("percent", 0.01),
}

# How each kind is named in messages, with an example of the way to write it.
KIND_WORDS: dict[str, str] = {
    "size": "a size such as `8 GiB`",
    "bandwidth": "a bandwidth such as `20 GB/s`",
    "compute": "a compute rate such as `100 GFLOPS`",
    "time": "a time such as `25 ms`",
    "token_rate": "a token rate such as `20 tok/s`",
    "money": "a price such as `2.5 $/h`",
    "percent": "a percentage such as `5%`",
    "number": "a plain number such as `0.05`",
}

_NUMBER = re.compile(r"[+-]?\d(_?\d)*(\.\d(_?\d)*)?([eE][+-]?\d+)?")


def units_of(kind: str) -> list[str]:
    return [name for name, unit in UNITS.items() if unit.kind == kind]


def quantity_from_text(text: str, span: Span | None = None) -> Quantity:
    """One QUANTITY or NUMBER token -> a normalised Quantity; E104 for a unit not in the table.

    `text` keeps the number as written and one space before the unit (`8GiB` -> `8 GiB`, `5 %` -> `5%`).
    """
    match = _NUMBER.match(text)
    if match is None:
        raise fail("E104", f"expected a number, found `{text}`", span)
    number_text = match.group(0)
    unit_text = text[match.end():].strip()
    number = float(number_text.replace("_", ""))
    span = span or Span()
    if not unit_text:
        return Quantity(value=number, kind="number", text=number_text, span=span,
                        relative=number_text.startswith("+"))
    unit = UNITS.get(unit_text)
    if unit is None:
        close = [name for name in UNITS if name.lower() == unit_text.lower()]
        hint = f"did you mean `{close[0]}`? Units are case-sensitive" if close else (
            "units: " + ", ".join(f"`{name}`" for name in UNITS))
        raise fail("E104", f"unknown unit `{unit_text}` in `{text}`", span, hint=hint)
    shown = f"{number_text}%" if unit_text == "%" else f"{number_text} {unit_text}"
    return Quantity(value=number * unit.factor, kind=unit.kind, text=shown, unit=unit_text, span=span,
                    relative=number_text.startswith("+") and unit.kind == "percent", integer=unit.integer)


def whole_number(quantity: Quantity) -> int | None:
    """The integer a count place holds, or None when it is not a plain whole number (`8 GiB`, `0.5`)."""
    if quantity.kind != "number" or quantity.relative or quantity.text.startswith("-"):
        return None
    if not math.isfinite(quantity.value) or quantity.value > 2 ** 62 or quantity.value != int(quantity.value):
        return None
    return int(quantity.value)

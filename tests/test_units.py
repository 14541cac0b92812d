"""Units: every unit of LANGUAGE.md converts to its base unit; the grammar's token knows the same units."""
from __future__ import annotations

import re

import pytest

from lwdsl.errors import LwdslError
from lwdsl.parse import grammar_path
from lwdsl.units import UNITS, quantity_from_text, whole_number


@pytest.mark.parametrize("text, kind, value", [
    ("8 GiB", "size", 8 * 2 ** 30), ("8GiB", "size", 8 * 2 ** 30), ("1 KB", "size", 1000), ("3 B", "size", 3),
    ("2 TB", "size", 2e12), ("1 TiB", "size", 2 ** 40), ("150 MiB", "size", 150 * 2 ** 20),
    ("20 GB/s", "bandwidth", 20e9), ("512 MiB/s", "bandwidth", 512 * 2 ** 20),
    ("100 GFLOPS", "compute", 100e9), ("1.5 TFLOP/s", "compute", 1.5e12), ("2 PFLOPS", "compute", 2e15),
    ("25 ms", "time", 0.025), ("800 ns", "time", 800e-9), ("3 us", "time", 3e-6), ("2 min", "time", 120),
    ("72 h", "time", 72 * 3600), ("1 s", "time", 1.0),
    ("20 tok/s", "token_rate", 20), ("2.5 $/h", "money", 2.5), ("25%", "percent", 0.25),
    ("1_000 MB", "size", 1e9), ("2e9 B", "size", 2e9), ("128", "number", 128),
])
def test_quantity_normalised_to_base_units(text, kind, value):
    quantity = quantity_from_text(text)
    assert quantity.kind == kind
    assert quantity.value == pytest.approx(value)


def test_relative_percent_and_integer_rates():
    assert quantity_from_text("+5%").relative and quantity_from_text("+5%").value == pytest.approx(0.05)
    assert not quantity_from_text("5%").relative
    tops = quantity_from_text("40 TOPS")
    assert tops.integer and tops.kind == "compute" and tops.value == 40e12


def test_text_keeps_number_and_one_space():
    assert quantity_from_text("8GiB").text == "8 GiB"
    assert quantity_from_text("1_000 MB").text == "1_000 MB"
    assert quantity_from_text("+5%").text == "+5%"


@pytest.mark.parametrize("text", ["8 gib", "8Gb", "3 mins", "1 tok"])
def test_unknown_unit_is_e104(text):
    with pytest.raises(LwdslError) as raised:
        quantity_from_text(text)
    assert raised.value.diagnostics[0].code == "E104"


def test_case_hint():
    with pytest.raises(LwdslError) as raised:
        quantity_from_text("8 gib")
    assert "GiB" in raised.value.diagnostics[0].hint


def test_whole_number():
    assert whole_number(quantity_from_text("2e9")) == 2_000_000_000
    assert whole_number(quantity_from_text("0.5")) is None
    assert whole_number(quantity_from_text("8 GiB")) is None
    assert whole_number(quantity_from_text("1e999")) is None


def test_grammar_lists_the_same_units():
    grammar = grammar_path().read_text()
    token = next(line for line in grammar.splitlines() if line.startswith("QUANTITY"))
    listed = {u.replace("\\", "") for u in re.search(r"\(KiB.*?\)\(\?!", token).group(0)[1:-4].split("|")}
    assert listed | {"%"} == set(UNITS)

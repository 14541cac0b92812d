"""The GPU cost model against published measurements (tests/data/published_gpu.json,
docs/GPU_VALIDATION.md): each configuration is built as a real plan and estimated; the bands are
those of issue 12 (decode ±20% for at least 80% and never off by 2x, TTFT ±30%, all fit)."""
from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = json.loads((ROOT / "tests" / "data" / "published_gpu.json").read_text())["configs"]
DECODE = ("decode_tok_s", "decode_ms", "request_tok_s")


@cache
def validation():
    spec = importlib.util.spec_from_file_location("gpu_validation", ROOT / "bench" / "gpu_validation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def table() -> tuple[dict, ...]:
    return tuple(validation().rows())


def test_the_collection_spans_what_the_issue_asks():
    models = {c["model"] for c in DATA}
    assert len(DATA) >= 12
    assert {"llama-2-7b", "llama-3.1-405b"} <= models  # 7B to 405B
    assert {c["tensor"] for c in DATA} >= {1, 2, 4, 8}
    assert min(c["batch"] for c in DATA) == 1 and max(c["batch"] for c in DATA) == 64
    assert {c["metric"] for c in DATA} >= {"decode_tok_s", "ttft_ms"}
    for c in DATA:  # every figure has its source, date and the words it was read from
        assert c["source"] and c["date"] and c["quote"] and c["engine"]
        quoted = c["published"] / c["tensor"] if "/GPU" in c["quote"] else c["published"]
        assert f"{quoted:g}" in c["quote"].replace(",", ""), c["id"]


def test_each_configuration_is_a_real_plan():
    from lwdsl.parse import parse_text

    config = next(c for c in DATA if c["tensor"] == 8)
    plan = parse_text(validation().plan_text(config))
    assert len(plan.target.devices) == 8 and len(plan.target.links) == 28
    assert plan.model.source == f"arch:{config['model']}"


def test_decode_predictions_stay_in_band():
    decode = [r for r in table() if r["metric"] in DECODE]
    inside = [r for r in decode if abs(r["ratio"] - 1) <= 0.20]
    assert len(inside) >= 0.8 * len(decode), [(r["id"], round(r["ratio"], 2)) for r in decode if r not in inside]
    worst = max(decode, key=lambda r: max(r["ratio"], 1 / r["ratio"]))
    assert 0.5 < worst["ratio"] < 2.0, (worst["id"], worst["ratio"])


def test_same_kind_engines_are_mostly_within_twenty_percent():
    same = [r for r in table() if r["kind"] == "same" and r["metric"] in DECODE]
    assert len(same) >= 12
    assert sum(abs(r["ratio"] - 1) <= 0.20 for r in same) >= 0.9 * len(same)


def test_time_to_first_token_within_thirty_percent():
    ttft = [r for r in table() if r["metric"] == "ttft_ms"]
    assert len(ttft) >= 4
    for r in ttft:
        assert abs(r["ratio"] - 1) <= 0.30, (r["id"], r["ratio"])


def test_nothing_published_running_is_predicted_not_to_fit():
    """Every configuration fits, except where lwdsl's own executor cannot hold it: its static cache
    rounds up to `cache_multiple` positions; such a row is marked with why, and the rounding must be
    the whole reason (the row fits by its exact cache)."""
    from lwdsl.cost import gpu, memory
    from lwdsl.hardware.catalog import hardware_entry
    from lwdsl.inventory.configs import arch_from_config

    archs = json.loads((ROOT / "lwdsl" / "data" / "architectures.json").read_text())
    for r in table():
        if r.get("lwdsl_fit_note"):
            assert not r["fits"], r["id"]
            arch = arch_from_config(archs[r["model"]]["config"])
            tokens = r["context"] + r["generate"]
            per_position = memory.kv_bytes_per_token(arch, gpu.held_format(memory_format(r)))
            rounding = r["batch"] * (gpu.cache_positions(tokens) - tokens) * per_position / r["tensor"]
            assert r["peak_gib"] * 2 ** 30 - rounding <= hardware_entry(r["gpu"])["memory_bytes"], r["id"]
        else:
            assert r["fits"], r["id"]


def memory_format(row: dict):
    from lwdsl.estimate import parse_format
    from lwdsl.solution import QuantFormat

    return parse_format(row["kv"]) if row.get("kv") else QuantFormat()


@pytest.mark.parametrize("metric", ["decode_tok_s", "ttft_ms"])
def test_a_prediction_moves_with_the_physics(metric):
    """A band that cannot fail is no test: halving the card's bandwidth must slow decode, halving
    its rate must slow a long prefill."""
    from lwdsl.hardware.catalog import hardware_entry

    config = next(c for c in DATA if c["metric"] == metric)
    base = validation().predict(config)["predicted"]
    entry = hardware_entry(config["gpu"])
    key, factor = ("bandwidth_Bps", 0.5) if metric == "decode_tok_s" else ("rates", 0.5)
    original = entry[key]
    try:
        entry[key] = original * factor if key == "bandwidth_Bps" else {k: v * factor for k, v in original.items()}
        slower = validation().predict(config)["predicted"]
    finally:
        entry[key] = original
    assert (slower < 0.7 * base) if metric == "decode_tok_s" else (slower > 1.4 * base)


def test_rows_not_used_to_set_a_parameter_hold_too():
    """The fitted rows (marked `fitted`) set the parameters; the rest are checks and must mostly hold."""
    fitted = [r for r in table() if r.get("fitted")]
    checks = [r for r in table() if not r.get("fitted")]
    assert len(fitted) <= 10 and len(checks) >= 2 * len(fitted)
    assert sum(r["in_band"] for r in checks) >= 0.75 * len(checks)

"""Device groups, switches and interchangeable separators (issue 17): golden valid plans load with
their groups written out as pinned (tests/golden/valid/expected.json); `fmt` keeps the group form,
prints `,` between list items and no `;`, and is stable."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lwdsl import ast
from lwdsl.fmt import format_text
from lwdsl.groups import resolve_ref
from lwdsl.parse import parse_text
from lwdsl.plans import load_plan

VALID = Path(__file__).resolve().parent / "golden" / "valid"
EXPECTED = json.loads((VALID / "expected.json").read_text())


def _summary(plan: ast.Plan) -> dict:
    offload = [d for t in plan.allow.techniques if isinstance(t, ast.Offload) for d in t.devices]
    return {"devices": [d.name for d in plan.target.devices], "links": len(plan.target.links),
            "switches": {s.name: list(s.devices) for s in plan.target.switches},
            "require": [f"{c.metric.name}:{c.metric.qualifier}" for c in plan.require], "offload": offload}


def test_every_valid_snippet_is_pinned():
    assert sorted(p.stem for p in VALID.glob("*.lwp")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_valid_snippet_expands_as_pinned(name):
    assert _summary(load_plan(VALID / f"{name}.lwp").plan) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fmt_keeps_groups_and_is_stable(name):
    text = (VALID / f"{name}.lwp").read_text()
    once = format_text(text)
    assert format_text(once) == once
    assert all(";" not in line for line in once.splitlines() if not line.strip().startswith("#"))
    assert "device gpu[" in once and "gpu0 " not in once  # the group form, never written out
    assert _summary(load_plan_text(once)) == EXPECTED[name]


def test_commas_and_semicolons_are_interchangeable():
    one = 'plan p { model "arch:gpt2" target { device c cpu { memory 2GiB, bandwidth 8GB/s, compute 1 TFLOPS } } }'
    two = 'plan p { model "arch:gpt2" target { device c cpu { memory 2GiB; bandwidth 8GB/s; compute 1 TFLOPS } } }'

    def shape(text):
        return [d.model_dump(exclude={"span", "memory", "bandwidth", "compute"}) | {
            "memory": d.memory.value, "bandwidth": d.bandwidth.value} for d in parse_text(text).target.devices]
    assert shape(one) == shape(two)


def test_fmt_prints_a_group_line_as_written():
    text = ('plan p {\n  model "arch:gpt2"\n  target {\n    device gpu[8] gpu "h100-sxm"\n'
            '    switch nv { gpu[*] } latency 2 us\n    link gpu[0..3] <-> gpu[4..7] 50 GB/s\n  }\n'
            '  require { memory gpu[*] <= 80 GB; latency token <= 5 ms }\n}\n')
    out = format_text(text)
    assert "device gpu[8] gpu \"h100-sxm\"" in out and "switch nv { gpu[*] } latency 2 us" in out
    assert "link gpu[0..3] <-> gpu[4..7] 50 GB/s" in out and "memory gpu[*] <= 80 GB" in out


def test_a_range_link_is_every_pair_once():
    plan = load_plan_text('plan p { model "arch:gpt2" target { device g[3] gpu "h100-sxm"\n'
                          ' link g[*] <-> g[*] 10 GB/s } }')
    assert sorted(tuple(sorted((l.a, l.b))) for l in plan.target.links) == [("g0", "g1"), ("g0", "g2"), ("g1", "g2")]


def test_resolve_ref():
    assert resolve_ref("gpu[2..3]", {"gpu": 8}) == ("gpu2", "gpu3")
    assert resolve_ref("gpu[*]", {"gpu": 2}) == ("gpu0", "gpu1")
    assert resolve_ref("gpu[3..2]", {"gpu": 8}) is None and resolve_ref("gpu[0..8]", {"gpu": 8}) is None
    assert resolve_ref("gpu", {"gpu": 8}) is None and resolve_ref("host", {"gpu": 8}) == ("host",)


def load_plan_text(text: str) -> ast.Plan:
    from lwdsl.plans import check_text

    return check_text(text, "<plan>", Path("."))

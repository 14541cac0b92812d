"""Honest explanations (issue 17): every "would have to be" value of an infeasible plan is one its
line can take — the plan's problem re-solved with that line moved to the printed value, the rest of
its conflict set held, is feasible — and a plan line appears once per set (a device-group line too)."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from lwdsl import ast
from lwdsl.hardware import resolve_target
from lwdsl.inventory import load_inventory
from lwdsl.plans import load_plan
from lwdsl.solve import build, readback, search
from lwdsl.solve.infeasible import _feasible_any, conflict_sets, line_groups, needed_values
from lwdsl.units import quantity_from_text

PLANS = Path(__file__).resolve().parent.parent / "plans"

GROUP_PLAN = """plan p {
  model "arch:llama-3.1-70b"
  target {
    device gpu[4] gpu "h100-sxm"
    switch nv { gpu[*] }
  }
  workload inference { batch 1, context 1024, generate 64 }
  require { memory gpu[*] <= 10 GB, latency token <= 1 ms, quality perplexity <= +1% }
  allow { quantize weights int8, int4 group 128; shard tensor up to 4 }
}
"""

CHAIN_PLAN = """plan chain {
  model "arch:llama-3.1-70b"
  target {
    device gpu[4] gpu "rtx-4090"
    device host cpu { memory 256 GiB, bandwidth 80 GB/s, compute 2 TFLOPS }
    link gpu0 <-> gpu1 25 GB/s
    link gpu1 <-> gpu2 25 GB/s
    link gpu2 <-> gpu3 25 GB/s
    link gpu[*] <-> host 25 GB/s
  }
  workload inference { batch 1, context 2048, generate 64 }
  require {
    memory gpu0 <= 12 GiB
    memory < 40 GiB
    latency token <= 20 ms
    quality perplexity <= +0.5%
  }
  allow { quantize weights int8, int4 group 128; shard tensor up to 4; offload host }
}
"""


def _scenarios(plan_file):
    plan = plan_file.plan
    inventory = load_inventory(plan.model, plan_file.base_dir)
    target = resolve_target(plan.target)
    return [problem for _, problem, _ in search.scenarios_of(plan, inventory, target, plan_file.text, None)]


def _moved_bound(plan, problem, line, text: str) -> int:
    """The printed value read back as the line's new integer bound, the way a plan line is read."""
    requirement = problem.requirements[line.requirement]
    value_text = re.split(r"<=|>=|<|>", text, maxsplit=1)[1] if requirement.kind == "require" else \
        text.split(" on ")[0].removeprefix("memory ")
    quantity = quantity_from_text(value_text.strip())
    if requirement.kind == "capacity":
        return int(quantity.value // build.SCALES["bytes"])
    constraint = next(c for c in plan.require if c.span.line == requirement.line and c.span.column == requirement.column)
    moved = constraint.model_copy(update={"value": quantity})
    return build.requirement_of(moved, plan.workload, requirement.text, None).bound


@pytest.mark.parametrize("source", ["group", "chain", "impossible"])
def test_every_printed_value_is_one_the_line_can_take(tmp_path, source):
    if source == "impossible":
        plan_file = load_plan(PLANS / "impossible.lwp")
    else:
        path = tmp_path / f"{source}.lwp"
        path.write_text(GROUP_PLAN if source == "group" else CHAIN_PLAN)
        plan_file = load_plan(path)
    problems = _scenarios(plan_file)
    sets = conflict_sets(problems)
    checked = 0
    for conflict in sets:
        lines = needed_values(problems, conflict)
        places = [(problems[0].requirements[l.requirement].line, problems[0].requirements[l.requirement].column,
                   problems[0].requirements[l.requirement].kind) for l in lines]
        assert len(places) == len(set(places)), "a plan line appears once per set"
        assert sorted(r for l in lines for r in l.members) == sorted(conflict)
        for line in lines:
            text = readback.needed_text(plan_file.plan, problems[0].requirements[line.requirement], line.needed,
                                        len(line.members))
            if text is None:
                continue
            bound = _moved_bound(plan_file.plan, problems[0], line, text)
            others = [r for r in conflict if r not in line.members]
            moved = [replace(problem, requirements=tuple(
                replace(req, bound=bound) if r in line.members else req for r, req in enumerate(problem.requirements)))
                for problem in problems]
            assert _feasible_any(moved, others + list(line.members), 10.0, 1), f"{text} is not feasible"
            number = float(re.findall(r"[-+]?\d[\d.e+-]*", text.split(" on ")[0])[-1])
            assert number == 0 or abs(number) >= 0.1, f"{text}: print a unit that fits"
            checked += 1
    assert checked >= 1


def test_a_group_line_is_one_line_of_the_conflict(tmp_path):
    path = tmp_path / "group.lwp"
    path.write_text(GROUP_PLAN)
    result = search.solve_plan(load_plan(path))
    assert result.solution.status == "INFEASIBLE"
    needed = [c.needed for c in result.solution.conflicts]
    assert "latency token <= 26.42 ms" in needed or any(n and n.startswith("latency token <=") for n in needed)
    memory = [n for n in needed if n and n.startswith("memory gpu[*] <=")]
    assert len(memory) == 1  # one line for the four devices, written as the plan writes it


def test_line_groups_keep_one_constraint_per_group():
    plan_file = load_plan(PLANS / "llama405b_8xh100.lwp")
    problem = _scenarios(plan_file)[0]
    groups = line_groups(problem)
    sizes = sorted(len(g) for g in groups)
    assert sizes.count(8) == 2  # `memory gpu[*] <= 80 GB` and the group's capacity line

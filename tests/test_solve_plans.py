"""`lwdsl solve` on the example plans and on small plans written here: solutions, conflicts, the
cost model's agreement, per-layer notes, determinism, JSON and --out."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lwdsl.cli import main
from lwdsl.plans import load_plan
from lwdsl.solution import Solution
from lwdsl.solve.model import compile_problem, solve_lexicographic
from lwdsl.solve.problem import evaluate as problem_values
from lwdsl.solve.search import solve_plan

ROOT = Path(__file__).resolve().parents[1]
PLANS = ROOT / "plans"


def run_json(capsys, *argv) -> tuple[int, dict]:
    code = main(["solve", *map(str, argv), "--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", ["laptop_8b", "llama70b_two_gpus", "cheapest_card", "training_8b"])
def test_example_plans_solve_to_a_proven_optimum(name, capsys):
    code, report = run_json(capsys, PLANS / f"{name}.lwp")
    assert code == 0 and report["status"] == "OPTIMAL"
    assert all(check["holds"] is not False for check in report["requirements"])
    assert report["conflicts"] == []


def test_the_impossible_plan_explains_itself(capsys):
    code, report = run_json(capsys, PLANS / "impossible.lwp")
    assert code == 1 and report["status"] == "INFEASIBLE"
    lines = {c["line"]: c for c in report["conflicts"]}
    text = (PLANS / "impossible.lwp").read_text().splitlines()
    for line, conflict in lines.items():
        assert conflict["text"] == text[line - 1].strip()
    latency = next(c for c in report["conflicts"] if c["text"].startswith("latency token"))
    assert latency["needed"].startswith("latency token <= ") and latency["needed"].endswith(" ms")
    assert float(latency["needed"].split()[3]) > 50


def test_model_figures_equal_the_cost_model():
    """What the solver optimises is what `estimate` predicts for the chosen layers."""
    result = solve_plan(load_plan(PLANS / "llama70b_two_gpus.lwp"), workers=1)
    predicted = result.solution.predicted
    assert all(check["holds"] for check in result.requirements)
    by_device = {n: m.total_bytes for n, m in predicted.memory.by_device.items()}
    assert by_device["gpu0"] <= 24 * 2 ** 30 and by_device["gpu1"] <= 24 * 2 ** 30
    assert predicted.latency.token_s <= 0.180


def test_internal_values_match_evaluate(tmp_path):
    from lwdsl.hardware import resolve_target
    from lwdsl.inventory import load_inventory
    from lwdsl.solve.search import scenarios_of

    plan_file = load_plan(PLANS / "llama70b_two_gpus.lwp")
    plan = plan_file.plan
    inventory, target = load_inventory(plan.model, plan_file.base_dir), resolve_target(plan.target)
    result = solve_plan(plan_file)
    settings, problem, _ = next(s for s in scenarios_of(plan, inventory, target, plan_file.text, None)
                                if s[0]["tensor_parallel"] == result.solution.tensor_parallel
                                and s[0]["kv_format"] == result.solution.kv_format)
    outcome = solve_lexicographic(compile_problem(problem))
    values = problem_values(problem, outcome.assignment)
    predicted = result.solution.predicted
    terms = len(problem.layers) * 80 + len(problem.units) * 80
    for device in predicted.memory.by_device:  # KiB, rounded up per term (the devices the plan uses)
        assert 0 <= values[f"memory:{device}"] * 1024 - predicted.memory.by_device[device].total_bytes <= terms * 1024
    # times and losses round up per term (1 us, 1e-6): the model is at most that much pessimistic
    assert 0 <= values["latency:token"] * 1e-6 - predicted.latency.token_s <= terms * 1e-6
    # perplexity ratios multiply: the model adds log1p of each layer's increase
    assert 0 <= values["quality:perplexity"] * 1e-6 - math.log1p(predicted.quality.perplexity_increase) <= terms * 1e-6


SMOL = """plan smol {{
  model "gguf:{model}"
  target {{ device cpu0 cpu {{ memory 8 GiB; bandwidth 20 GB/s; compute 100 GFLOPS }} }}
  workload inference {{ batch 1; context 128; generate 16 }}
  require {{ memory cpu0 <= {memory} }}
  allow {{ quantize weights int4 group 128, int8; keep lm_head, "model.embed_tokens" }}
  minimize memory
}}
"""


@pytest.mark.model
def test_group_128_fits_only_the_down_projections_of_smollm2(tmp_path, smollm2_gguf, capsys):
    plan = tmp_path / "smol.lwp"
    plan.write_text(SMOL.format(model=smollm2_gguf, memory="1 GiB"))
    code, report = run_json(capsys, plan)
    assert code == 0
    formats = {(layer["name"].split(".")[-1], layer["format"]) for layer in report["layers"] if layer["block"] is not None}
    assert {f for role, f in formats if role == "down_proj"} == {"int4 g128"}
    assert {f for role, f in formats if role != "down_proj"} == {"int8"}
    q_proj = next(l for l in report["layers"] if l["name"] == "model.layers.0.self_attn.q_proj")
    assert "group 128 does not divide the input dimension 576" in q_proj["note"]
    assert any("q_proj" in note and "group 128" in note for note in report["notes"])


@pytest.mark.model
def test_out_writes_what_apply_reads_and_bad_out_writes_nothing(tmp_path, smollm2_gguf, capsys):
    plan = tmp_path / "smol.lwp"
    plan.write_text(SMOL.format(model=smollm2_gguf, memory="1 GiB"))
    out = tmp_path / "solution.json"
    assert main(["solve", str(plan), "--out", str(out)]) == 0
    solution = Solution.model_validate_json(out.read_text())
    assert solution.status == "OPTIMAL" and solution.layers
    assert main(["solve", str(plan), "--out", str(tmp_path / "missing" / "s.json")]) == 2
    assert not (tmp_path / "missing").exists()
    assert not list(tmp_path.glob(".*partial"))


def test_same_solution_with_one_or_two_workers():
    plan_file = load_plan(PLANS / "llama70b_two_gpus.lwp")
    one = solve_plan(plan_file, workers=1).solution.model_dump_json()
    two = solve_plan(plan_file, workers=2).solution.model_dump_json()
    assert one == two


def test_pareto_frontier_trades_one_metric_for_the_other(tmp_path, capsys):
    image = tmp_path / "frontier.png"
    code = main(["solve", str(PLANS / "cheapest_card.lwp"), "--pareto", "cost,latency", "--plot", str(image), "--json"])
    report = json.loads(capsys.readouterr().out)
    points = report["pareto"]
    assert code == 0 and len(points) >= 2 and image.stat().st_size > 0
    costs = [p["cost"] for p in points]
    latencies = [p["latency:token"] for p in points]
    assert costs == sorted(costs, reverse=True) and len(set(costs)) == len(costs)
    assert latencies == sorted(latencies) and len(set(latencies)) == len(latencies)
    assert main(["solve", str(PLANS / "cheapest_card.lwp"), "--pareto", "cost"]) == 2

"""Pareto (issue 17): the frontier reads the same quality source as `solve` (the stored profile of the
plan), so no frontier point is dominated by `solve`'s answer under the same `require` lines; the plot
is in the plan's units with the requirement bounds drawn."""
from __future__ import annotations

from pathlib import Path

import pytest

from lwdsl.plans import load_plan
from lwdsl.profile.keys import plan_keys
from lwdsl.profile.store import save_profile
from lwdsl.solution import ProfileEntry, QualityProfile
from lwdsl.solve.pareto import axis_unit, frontier, plot
from lwdsl.solve.search import solve_plan

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def edge_plan(tmp_path, monkeypatch, smollm2_gguf):
    """plans/smollm2_edge.lwp with its target written out (the shipped plan measures this machine, whose
    figures move with its load) and a stored profile for its model, options and calibration text."""
    monkeypatch.setenv("LWDSL_CACHE", str(tmp_path / "cache"))
    text = (ROOT / "plans" / "smollm2_edge.lwp").read_text()
    text = text.replace('device cpu0 cpu "local"', "device cpu0 cpu { memory 8 GiB, bandwidth 20 GB/s, compute 100 GFLOPS }")
    text = text.replace("gguf:../models/SmolLM2-135M-Instruct.Q4_1.gguf", f"gguf:{smollm2_gguf}")
    path = tmp_path / "smollm2_edge.lwp"
    path.write_text(text)
    plan_file = load_plan(path)
    model_hash, option_hash, text_hash = plan_keys(plan_file)
    from lwdsl.inventory import load_inventory
    from lwdsl.profile.options import layer_options

    options = layer_options(plan_file.plan, load_inventory(plan_file.plan.model, plan_file.base_dir))
    entries = []  # a profile unlike the priors: int8 free, the int4 formats and prunes cost by depth
    for index, (layer, choices) in enumerate(sorted(options.items())):
        for fmt, prune in choices:
            loss = 0.0 if fmt.dtype == "int8" and prune.kind == "none" else \
                (0.0004 + 0.00001 * index) * (2 if fmt.symmetric else 1) + prune.fraction * 0.01
            entries.append(ProfileEntry(layer=layer, format=fmt, prune=prune, kld=loss, perplexity_increase=loss))
    save_profile(QualityProfile(model_hash=model_hash, text_hash=text_hash, baseline_perplexity=12.0,
                                entries=entries), option_hash)
    return plan_file


def test_no_frontier_point_is_dominated_by_solve(edge_plan, tmp_path, monkeypatch):
    # the frontier is the solver's own model (the profile's sums); solve's answer in the same terms, not
    # the mix measured jointly that `solve` reports (`lwdsl.profile.joint`)
    monkeypatch.setenv("LWDSL_JOINT", "0")
    result = solve_plan(edge_plan)
    assert result.solution.status == "OPTIMAL" and result.quality_source == "profile"
    solved = (result.solution.predicted.memory.total_bytes, result.solution.predicted.quality.perplexity_increase)
    points = frontier(edge_plan, ("memory", "quality:perplexity"), time_limit_s=60)
    assert len(points) >= 2
    for point in points:
        memory, quality = point["memory"], point["quality:perplexity"]
        better_or_equal = solved[0] <= memory * (1 + 1e-9) and solved[1] <= quality + 1e-12
        strictly = solved[0] < memory * (1 - 1e-9) or solved[1] < quality - 1e-9
        assert not (better_or_equal and strictly), f"{point} is dominated by solve's {solved}"
    # the best-quality end is solve's own answer (the plan minimises quality, then memory)
    assert points[0]["quality:perplexity"] == pytest.approx(solved[1], abs=1e-9)
    assert points[0]["memory"] == pytest.approx(solved[0], rel=1e-6)
    image = plot(points, ("memory", "quality:perplexity"), tmp_path / "frontier.png", edge_plan.plan)
    assert image.stat().st_size > 1000


def test_axes_in_the_plans_units(edge_plan):
    assert axis_unit("memory", [3e8], edge_plan.plan) == ("MiB", 2.0 ** 20)  # `memory cpu0 <= 400 MiB`
    assert axis_unit("quality:perplexity", [0.01], edge_plan.plan) == ("%", 0.01)
    assert axis_unit("latency:token", [0.02], edge_plan.plan)[0] == "ms"
    assert axis_unit("cost", [1.0], None) == ("$/h", 1.0)
    assert axis_unit("memory", [5e10], None) == ("GiB", 2.0 ** 30)

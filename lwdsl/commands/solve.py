"""`lwdsl solve PLAN [--json] [--out solution.json] [--pareto A,B] [--time-limit S] [--workers N]`."""
from __future__ import annotations

import argparse
import json

HELP = "Choose, layer by layer, the cheapest combination that meets every `require` line (CP-SAT)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", help="the .lwp plan file")
    parser.add_argument("--json", action="store_true", help="print the solve JSON (see README, \"solve JSON\")")
    parser.add_argument("--out", metavar="FILE", help="write the Solution (what `apply` consumes), atomically")
    parser.add_argument("--pareto", metavar="A,B", help="the frontier between two metrics, e.g. memory,quality")
    parser.add_argument("--plot", metavar="PNG", help="with --pareto: where the plot goes (default PLAN.pareto.png)")
    parser.add_argument("--time-limit", type=float, default=60.0, metavar="S", help="seconds for the whole solve")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="CP-SAT workers (same answer for 1 or 2)")
    parser.add_argument("--no-profile", action="store_true", help="use the quality priors even if a profile exists")


def run(args: argparse.Namespace) -> int:
    from lwdsl.errors import ExitCode, fail
    from lwdsl.plans import load_plan
    from lwdsl.solve.render import render_summary, to_json
    from lwdsl.solve.search import solve_plan
    from lwdsl.solve.write import write_solution

    if args.time_limit <= 0 or args.workers < 1:
        raise fail("E503", "--time-limit must be positive and --workers at least 1")
    plan_file = load_plan(args.plan)
    if args.pareto:
        from lwdsl.solve.pareto import frontier, parse_pair, plot, render_frontier

        pair = parse_pair(args.pareto)
        points = frontier(plan_file, pair, args.time_limit, args.workers)
        image = args.plot or str(plan_file.path.with_suffix(".pareto.png"))
        plot(points, pair, image, plan_file.plan)
        if args.json:
            print(json.dumps({"pareto": [p for p in points], "metrics": list(pair), "plot": image}, indent=2))
        else:
            render_frontier(points, pair, image)
        return ExitCode.OK if points else ExitCode.UNMET
    result = solve_plan(plan_file, args.time_limit, args.workers, use_profile=not args.no_profile)
    if args.out and result.solution.status in ("OPTIMAL", "FEASIBLE"):
        write_solution(result.solution, args.out)
    if args.json:
        print(json.dumps(to_json(result), indent=2))
    else:
        render_summary(result, plan_file)
    return ExitCode.OK if result.solution.status in ("OPTIMAL", "FEASIBLE") else ExitCode.UNMET

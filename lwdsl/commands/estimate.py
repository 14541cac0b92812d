"""`lwdsl estimate PLAN [--json] [--with KEY=VALUE ...]`: memory, time and training figures."""
from __future__ import annotations

import argparse
import json

HELP = "Estimate memory, latency and training figures of the plan's model (as it is, or --with settings)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", help="the .lwp plan file")
    parser.add_argument("--json", action="store_true", help="print the estimate JSON (see README)")
    parser.add_argument("--with", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help='e.g. "weights=int4 group 128", "kv=int8", "prune=channels 25%%", "tensor=2", '
                             '"zero=3", "checkpoint", "accumulate=4", "data=8", "offload_optimizer=cpu0"')


def run(args: argparse.Namespace) -> int:
    from lwdsl.errors import LwdslError
    from lwdsl.estimate import estimate, parse_settings
    from lwdsl.plans import load_plan

    plan_file = load_plan(args.plan)
    try:
        report = estimate(plan_file.plan, plan_file.base_dir, parse_settings(args.settings))
    except LwdslError as error:  # positioned in the plan: show its source line
        error.source = error.source or plan_file.text
        raise
    if args.json:
        print(json.dumps(report.model_dump(mode="json"), indent=2))
    else:
        from lwdsl.estimate_view import render

        render(report)
    return 0

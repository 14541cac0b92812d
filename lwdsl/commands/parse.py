"""`lwdsl parse PLAN [--json]`: the syntax tree of a plan as JSON (syntax and units only, no meaning checks)."""
from __future__ import annotations

import argparse

from lwdsl.errors import ExitCode

HELP = "Parse a plan and print its AST as JSON (syntax only; `validate` checks meaning)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", metavar="PLAN", help="a plan file (.lwp)")
    parser.add_argument("--json", action="store_true", help="print the AST as JSON (the default output)")
    parser.add_argument("--no-spans", action="store_true", help="leave out the source positions")


def run(args: argparse.Namespace) -> int:
    from lwdsl.parse import parse_text
    from lwdsl.plans import read_plan_text

    text, _ = read_plan_text(args.plan)
    plan = parse_text(text, args.plan)
    print(_without_spans(plan) if args.no_spans else plan.model_dump_json(indent=2))
    return ExitCode.OK


def _without_spans(plan) -> str:
    import json

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "span"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return json.dumps(strip(plan.model_dump(mode="json")), indent=2)

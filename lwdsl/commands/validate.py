"""`lwdsl validate PLAN... [--json]`: parse and check meaning; every problem of every plan, exit 0 or 2."""
from __future__ import annotations

import argparse
import json
import sys

from lwdsl.errors import ExitCode, LwdslError

HELP = "Parse and check plans: print every problem found (exit 0 when all are valid, 2 otherwise)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plans", nargs="+", metavar="PLAN", help="plan files (.lwp)")
    parser.add_argument("--json", action="store_true", help="print one JSON object: files and their diagnostics")


def run(args: argparse.Namespace) -> int:
    from lwdsl.plans import load_plan

    results = []
    for path in args.plans:
        try:
            load_plan(path)
            results.append((path, [], None))
        except LwdslError as problem:
            results.append((path, problem.diagnostics, problem.source))
    failed = any(diagnostics for _, diagnostics, _ in results)
    if args.json:
        print(json.dumps({"valid": not failed, "files": [
            {"file": path, "valid": not diagnostics,
             "diagnostics": [d.model_dump(mode="json") for d in diagnostics]} for path, diagnostics, _ in results]},
            indent=2))
    else:
        for path, diagnostics, source in results:
            if not diagnostics:
                print(f"{path}: ok")
            for diagnostic in diagnostics:
                print(diagnostic.render(source), file=sys.stderr)
        count = sum(len(d) for _, d, _ in results)
        if count:
            print(f"{count} error{'s' if count != 1 else ''} in {sum(1 for _, d, _ in results if d)} "
                  f"file{'s' if len(results) != 1 else ''}", file=sys.stderr)
    return ExitCode.BAD_INPUT if failed else ExitCode.OK

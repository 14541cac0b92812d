"""`lwdsl schema`: the JSON Schema of the plan AST (what `lwdsl parse PLAN --json` prints)."""
from __future__ import annotations

import argparse
import json

from lwdsl.errors import ExitCode

HELP = "Print the JSON Schema of the plan AST (the output of `parse --json`)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from lwdsl.ast import Plan

    print(json.dumps(Plan.model_json_schema(), indent=2))
    return ExitCode.OK

"""The `lwdsl` command: arguments in, one result out, a named exit code.

Each subcommand lives in `lwdsl/commands/<name>.py` with `HELP`, `add_arguments(parser)` and
`run(args) -> int`; this file only dispatches and turns the tool's own errors into messages and
exit codes. Any other exception is a bug and says so.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from lwdsl.errors import ExitCode, LwdslError

# In pipeline order; a module missing here is a subcommand not built yet.
COMMANDS = (
    "validate", "fmt", "parse", "schema",
    "estimate", "probe",
    "solve",
    "profile", "apply", "run", "check",
    "train",
    "cache",
    "export",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lwdsl", description="Plan, solve, apply and gate the lightweighting of a model.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"lwdsl.commands.{name}")
        except ModuleNotFoundError as missing:
            if missing.name == f"lwdsl.commands.{name}":
                continue
            raise
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: usage errors are bad input
        return ExitCode.OK if exit_.code == 0 else ExitCode.BAD_INPUT
    try:
        return int(args.handler(args))
    except LwdslError as error:
        for diagnostic in error.diagnostics:
            print(diagnostic.render(error.source), file=sys.stderr)
        return int(error.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lwdsl ... | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return int(ExitCode.OK)


if __name__ == "__main__":
    raise SystemExit(main())

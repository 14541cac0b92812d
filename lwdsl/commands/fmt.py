"""`lwdsl fmt PLAN... [--check] [--write]`: the canonical layout, comments kept."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from lwdsl.errors import ExitCode

HELP = "Print plans in the canonical layout (--check: exit 1 if a file would change; --write: rewrite it)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plans", nargs="+", metavar="PLAN", help="plan files (.lwp)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="change nothing; exit 1 when a file is not canonical")
    mode.add_argument("--write", action="store_true", help="rewrite the files in place (atomically)")


def write_atomically(path: Path, text: str) -> None:
    """Write next to the target, then rename over it: the file is either old or new, never half."""
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as out:
            out.write(text)
        os.chmod(temp, path.stat().st_mode & 0o7777)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def run(args: argparse.Namespace) -> int:
    from lwdsl.fmt import format_text
    from lwdsl.plans import read_plan_text

    formatted = []
    for name in args.plans:  # every file is read and formatted before any is written
        text, _ = read_plan_text(name)
        formatted.append((Path(name), text, format_text(text, name)))
    changed = [path for path, text, new in formatted if new != text]
    if args.check:
        for path in changed:
            print(f"would reformat {path}", file=sys.stderr)
        return ExitCode.UNMET if changed else ExitCode.OK
    if args.write:
        for path, text, new in formatted:
            if new != text:
                write_atomically(path, new)
                print(f"reformatted {path}", file=sys.stderr)
        return ExitCode.OK
    for _, _, new in formatted:
        sys.stdout.write(new)
    return ExitCode.OK

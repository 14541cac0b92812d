"""`lwdsl apply PLAN -o DIR [--solution solution.json]`: the solution applied with torch, as an artifact."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "apply the plan's solution to the model with torch and write a loadable artifact folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", help="the .lwp plan file")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="the artifact folder to write")
    parser.add_argument("--solution", metavar="FILE",
                        help="a solution.json from `lwdsl solve --json` (default: solve the plan now)")
    parser.add_argument("--time-limit", type=float, default=60.0, metavar="S", help="solver time limit (60 s)")
    parser.add_argument("--no-calibration", action="store_true",
                        help="score prunes by magnitude instead of on the plan's calibration text")


def read_solution(path: str):
    """A `Solution` from a JSON file: the bare solution, or `lwdsl solve --json` output holding one."""
    import json

    from pydantic import ValidationError

    from lwdsl.errors import fail
    from lwdsl.solution import Solution

    try:
        data = json.loads(Path(path).read_text())
    except OSError as error:
        raise fail("E644", f"cannot read the solution file {path}: {error.strerror}") from None
    except ValueError as error:
        raise fail("E644", f"{path} is not JSON: {error}") from None
    if isinstance(data, dict) and "solution" in data and "layers" not in data:
        data = data["solution"]
    try:
        return Solution.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        raise fail("E644", f"{path} is not a solution: {first['msg']} at "
                   f"{'.'.join(map(str, first['loc'])) or 'the top'}") from None


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lwdsl.apply.pipeline import apply_plan, resolve_solution
    from lwdsl.artifact import read_manifest
    from lwdsl.plans import load_plan

    plan_file = load_plan(args.plan)
    solution = read_solution(args.solution) if args.solution else None
    if solution is not None and solution.plan_hash != plan_file.sha256:
        print(f"note: {args.solution} was solved for another version of {args.plan}; applying it as it is",
              file=sys.stderr)
    solution = resolve_solution(plan_file, solution, args.time_limit)
    console = Console(stderr=True)
    streamed = any(c.device != c.compute_device for c in solution.layers)
    steps = 1 + len(solution.layers) + 2 + int(streamed)  # load, layers, weights (+ offload), rename
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("loading the model", total=steps)
        folder = apply_plan(plan_file, args.output, solution, calibrate=not args.no_calibration,
                            progress=lambda name: progress.update(task, advance=1, description=name))
    _summary(console, folder, solution, read_manifest(folder))
    return 0


def _summary(console, folder, solution, manifest) -> None:
    from collections import Counter

    mib = 1024 * 1024
    console.print(f"[bold]artifact[/bold] {folder}")
    kinds = Counter(f"{r.kind} {r.format.label()}" + (f" {r.prune.kind}" if r.prune.kind != "none" else "")
                    + (" (disk)" if r.storage == "disk" else "") for r in manifest.layers.values())
    for label, count in sorted(kinds.items()):
        console.print(f"  {count:4d} x {label}")
    predicted = sum(d.weights_bytes for d in solution.predicted.memory.by_device.values())
    console.print(f"  weights: {manifest.resident_bytes / mib:.1f} MiB resident, "
                  f"{manifest.offloaded_bytes / mib:.1f} MiB offloaded to disk "
                  f"(predicted {predicted / mib:.1f} MiB in all)")

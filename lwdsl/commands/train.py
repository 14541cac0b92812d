"""`lwdsl train PLAN [--steps N] [-o DIR] [--json]`: run a training plan with its solved settings."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "Train the plan's model with its solved ZeRO stage, checkpointing and accumulation (resumes from -o DIR)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", help="a .lwp plan with `workload training`")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps in all (default: the plan's tokens / (batch x sequence))")
    parser.add_argument("-o", "--out", default="out/train", help="checkpoint folder; a run resumes from it")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4, constant)")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="steps between checkpoints (default 10)")
    parser.add_argument("--with", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help='override a solved setting: "zero=3", "checkpoint", "accumulate=2", "data=2"')
    parser.add_argument("--json", action="store_true", help="print the lwdsl.train/1 JSON object")


def run(args: argparse.Namespace) -> int:
    from lwdsl.errors import LwdslError, fail
    from lwdsl.plans import load_plan
    from lwdsl.train import overrides_of, train_plan

    if args.steps is not None and args.steps < 1:
        raise fail("E807", f"--steps must be at least 1, not {args.steps}")
    plan_file = load_plan(args.plan)
    overrides = overrides_of(args.settings)
    try:
        if args.json:
            report = train_plan(plan_file, Path(args.out), args.steps, args.lr, args.checkpoint_every,
                                    overrides=overrides)
        else:
            from lwdsl.train.view import progress

            with progress() as on_step:
                report = train_plan(plan_file, Path(args.out), args.steps, args.lr, args.checkpoint_every, on_step,
                                    overrides=overrides)
    except LwdslError as error:
        error.source = error.source or plan_file.text
        raise
    if args.json:
        print(json.dumps(report.model_dump(mode="json"), indent=2))
    else:
        from lwdsl.train.view import render

        render(report)
    return 0

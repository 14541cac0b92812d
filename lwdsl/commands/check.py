"""`lwdsl check PLAN [--artifact DIR] [--json] [--junit FILE] [--markdown FILE]`: the deployment gate."""
from __future__ import annotations

import sys

from lwdsl.errors import ExitCode

HELP = "measure the applied plan on this machine and hold it to every `require` line (exit 1 if one fails)"


def add_arguments(parser) -> None:
    parser.add_argument("plan", help="the .lwp plan file")
    parser.add_argument("--artifact", metavar="DIR",
                        help="an artifact made by `lwdsl apply` (default: solve and apply now, temporarily)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (docs/CHECK.md)")
    parser.add_argument("--junit", metavar="FILE", help="also write a JUnit XML report (one case per require line)")
    parser.add_argument("--markdown", metavar="FILE", help="also write a Markdown report")
    parser.add_argument("--eval-tokens", type=int, metavar="N", help="evaluation tokens (default: the plan's)")
    parser.add_argument("--repeats", type=int, default=5, metavar="N", help="timed runs, median reported (5)")
    parser.add_argument("--generate", type=int, metavar="N", help="tokens generated per timed run "
                        "(default: the workload's)")
    parser.add_argument("--no-baseline-speed", action="store_true",
                        help="do not time the original model (its quality is always measured)")


def run(args) -> int:
    from lwdsl.errors import fail
    from lwdsl.verify.gate import CheckOptions, check
    from lwdsl.verify.report import print_report, to_json, to_junit, to_markdown, write_atomic

    for flag, value in (("--eval-tokens", args.eval_tokens), ("--repeats", args.repeats),
                        ("--generate", args.generate)):
        if value is not None and value < 1:
            raise fail("E715", f"{flag} must be at least 1, got {value}")
    options = CheckOptions(eval_tokens=args.eval_tokens, repeats=args.repeats, generate=args.generate,
                           baseline_speed=not args.no_baseline_speed)
    report = check(args.plan, args.artifact, options)
    if args.junit:
        write_atomic(args.junit, to_junit(report))
    if args.markdown:
        write_atomic(args.markdown, to_markdown(report))
    if args.json:
        sys.stdout.write(to_json(report))
    else:
        print_report(report)
    return ExitCode.OK if report.passed else ExitCode.UNMET

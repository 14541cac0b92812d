"""`lwdsl profile PLAN [--force] [--json]`: measure each allowed option's quality loss, layer by layer."""
from __future__ import annotations

import sys

HELP = "measure the quality loss of every allowed option on every layer (cached; `solve` uses it)"


def add_arguments(parser) -> None:
    parser.add_argument("plan", help="the .lwp plan file")
    parser.add_argument("--force", action="store_true", help="measure again even if a stored profile exists")
    parser.add_argument("--json", action="store_true", help="print the profile as JSON")
    parser.add_argument("--calibration-tokens", type=int, metavar="N",
                        help="calibration tokens (default: the plan's `calibrate ... tokens N`, else 1024)")


def run(args) -> int:
    from lwdsl.errors import ExitCode, fail
    from lwdsl.plans import load_plan
    from lwdsl.profile import profile

    if args.calibration_tokens is not None and args.calibration_tokens < 2:
        raise fail("E732", f"--calibration-tokens must be at least 2, got {args.calibration_tokens}")
    plan_file = load_plan(args.plan)
    result = profile(plan_file, force=args.force, progress=not args.json,
                     calibration_tokens=args.calibration_tokens)
    _recovery(plan_file, args)
    if args.json:
        sys.stdout.write(result.profile.model_dump_json(indent=2) + "\n")
        return ExitCode.OK
    _print_summary(result)
    return ExitCode.OK


def _recovery(plan_file, args) -> None:
    """`recover distill` in the plan: measure and fit its recovery curve too (`lwdsl.profile.recovery`)."""
    from lwdsl.solve.allowed import allowance

    if not allowance(plan_file.plan.allow.techniques).recover_up_to:
        return
    from lwdsl.profile.recovery import measure_curve

    say = None if args.json else (lambda text: print(text, file=sys.stderr))
    curve, path = measure_curve(plan_file, force=args.force, progress=say)
    if say:
        kld = curve.for_kld()
        say(f"recovery curve (held-out log-perplexity increase): r(s) = {curve.r_max:.3f} * "
            f"(1 - exp(-s / {curve.tau_steps:.1f})) fitted to {list(curve.points)}; KL: r(s) = "
            f"{kld.r_max:.3f} * (1 - exp(-s / {kld.tau_steps:.1f})); stored in {path}")


def _print_summary(result) -> None:
    import math
    from collections import defaultdict

    from rich.console import Console
    from rich.table import Table

    from lwdsl.profile.options import option_label

    console = Console()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for entry in result.profile.entries:
        row = totals[option_label((entry.format, entry.prune))]
        row[0] += entry.kld
        row[1] += math.log1p(entry.perplexity_increase)  # ratios multiply (`lwdsl.cost.evaluate`)
        row[2] += 1
    table = Table(title="quality loss by option on every layer it applies to, as the cost model composes it")
    for column in ("option", "layers", "KL (nats)", "perplexity"):
        table.add_column(column, justify="right")
    for label, (kld, ppl, layers) in sorted(totals.items(), key=lambda item: item[1][0]):
        table.add_row(label, str(layers), f"{kld:.4f}", f"{math.expm1(ppl):+.2%}")
    console.print(table)
    worst = sorted(result.profile.entries, key=lambda e: -e.kld)[:5]
    for entry in worst:
        console.print(f"  most sensitive: {entry.layer} {option_label((entry.format, entry.prune))}: "
                      f"KL {entry.kld:.4f}, perplexity {entry.perplexity_increase:+.2%}")
    how = "found in the store" if result.cached else "measured"
    console.print(f"{result.options} (layer, option) pairs {how} in {result.seconds:.1f} s; baseline "
                  f"perplexity {result.profile.baseline_perplexity:.3f} on the calibration text; saved {result.path}")

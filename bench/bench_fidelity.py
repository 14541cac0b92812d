"""Predicted vs measured across models and texts: three plans per model, each checked by `lwdsl check`.

    .venv/bin/python bench/bench_fidelity.py plans/qwen2_coder_edge.lwp [--texts python-docs,alice] [--only A,B]

For a shipped plan, three variants share its model, target, workload and `allow` (so one measured
profile serves all three) and differ in what they ask:

- A: the plan as shipped (its objective and requirements);
- B: `minimize quality then memory` under a memory bound halfway between A's and the model's;
- C: `minimize latency token then quality` (the plan's own bounds).

Each variant is written to a temporary folder (the model path made absolute), with the `eval` text
replaced by each of `--texts`, and run through `lwdsl check --json --no-baseline-speed` (solve, apply,
measure: the artifact alone in a fresh process). The profile is measured once first (`lwdsl profile`)
on the calibration mix (the plan's `calibrate` text and the other kind's built-in corpus, whatever
`eval` says), and each variant is planned with its `eval` text's own figures. Prints a Markdown table;
`--json FILE` keeps the reports.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lwdsl", *args], capture_output=True, text=True)


def variant_text(text: str, plan_dir: Path, variant: str, eval_text: str, memory_bound: str | None) -> str:
    text = re.sub(r'model "gguf:([^"]+)"', lambda m: f'model "gguf:{(plan_dir / m.group(1)).resolve()}"', text)
    text = re.sub(r'eval "text:[^"]+"', f'eval "text:{eval_text}"', text)
    if variant == "B" and memory_bound:
        text = re.sub(r"memory (\w+) <= [^\n]+", rf"memory \1 <= {memory_bound}", text, count=1)
        text = re.sub(r"\n  minimize [^\n]+", "\n  minimize quality then memory", text)
    if variant == "C":
        text = re.sub(r"\n  minimize [^\n]+", "\n  minimize latency token then quality", text)
    return re.sub(r"plan (\w+)", rf"plan \1_{variant}", text, count=1)


def _pair(entry: dict, key: str, scale: float, digits: int) -> str:
    p, m = entry.get(key, (None, None))
    if p is None or m is None:
        return "–"
    error = f" ({(m - p) / p:+.0%})" if p else ""
    return f"{p * scale:.{digits}f} / {m * scale:.{digits}f}{error}"


def summarise(report: dict) -> dict:
    found = {p["metric"]: (p["predicted"], p["measured"]) for p in report.get("predictions", [])}
    measured = report.get("measured") or {}
    return {"memory": found.get("memory") or found.get(next((k for k in found if k.startswith("memory")), ""), (None, None)),
            "prefill": found.get("latency prefill", (None, None)),
            "token": found.get("latency token", (None, None)),
            "quality": found.get("quality perplexity", (None, None)),
            "kld": found.get("quality kld", (None, None)),
            "failed": [r.get("metric") for r in report.get("requirements", []) if not r.get("passed")],
            "step": measured.get("decode_step", ""), "passed": report.get("passed")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", type=Path)
    parser.add_argument("--texts", default="python-docs,alice")
    parser.add_argument("--only", default="A,B,C")
    parser.add_argument("--repeats", default="3")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    plan = args.plan.resolve()
    text = plan.read_text()
    profiled = _run(["profile", str(plan)])
    if profiled.returncode != 0:
        print(profiled.stderr[-2000:])
        return 1
    rows, reports = [], []
    with tempfile.TemporaryDirectory(prefix="lwdsl-fidelity-") as tmp:
        solved = _run(["solve", str(plan), "--json"])
        chosen = json.loads(solved.stdout) if solved.returncode == 0 else {}
        shipped_memory = (chosen.get("predicted") or {}).get("memory", {}).get("total_bytes")
        estimate = _run(["estimate", str(plan), "--json"])
        whole = json.loads(estimate.stdout)["memory"]["total_bytes"] if estimate.returncode == 0 else None
        bound = f"{(shipped_memory + whole) / 2 / 2**20:.0f} MiB" if shipped_memory and whole else None
        for variant in [v for v in args.only.split(",") if v]:
            for eval_text in [t for t in args.texts.split(",") if t]:
                if variant != "A" and eval_text != args.texts.split(",")[0]:
                    continue  # the other texts for the shipped plan only
                path = Path(tmp) / f"{plan.stem}_{variant}_{eval_text}.lwp"
                path.write_text(variant_text(text, plan.parent, variant, eval_text, bound))
                done = _run(["check", str(path), "--json", "--no-baseline-speed", "--repeats", args.repeats])
                try:
                    report = json.loads(done.stdout)
                except json.JSONDecodeError:
                    print(f"{path.name}: check failed\n{done.stderr[-2000:]}")
                    continue
                reports.append(report)
                rows.append((variant, eval_text, summarise(report)))
                print(path.name, json.dumps(rows[-1][2]), flush=True)
    print(f"\n| plan | eval text | memory MiB pred / meas | TTFT s pred / meas | token ms pred / meas | "
          f"ppl change % pred / meas | KL pred / meas | decode step | gate |")
    print("|---|---|---|---|---|---|---|---|---|")
    for variant, eval_text, s in rows:
        gate = "pass" if s["passed"] else "FAIL: " + ", ".join(str(m) for m in s["failed"])
        print(f"| {plan.stem} {variant} | {eval_text} | {_pair(s, 'memory', 2**-20, 1)} | "
              f"{_pair(s, 'prefill', 1, 2)} | {_pair(s, 'token', 1e3, 1)} | {_pair(s, 'quality', 100, 2)} | "
              f"{_pair(s, 'kld', 1, 3)} | {s['step'][:40]} | {gate} |")
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

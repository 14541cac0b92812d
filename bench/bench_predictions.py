"""Predicted vs measured on SmolLM2, one plan per technique: how far is the cost model from the truth?

For each plan below: solve it (the cost model's prediction, quality from the measured profile of the
union of all options when it exists), apply it, and measure it with `lwdsl check`'s own machinery
(the artifact alone in a fresh process; perplexity against the original on held-out text). Prints
a Markdown table: peak memory (goal +-5%), time to first token (the prefill of the 256-token prompt:
goal +-15%, this shared machine's run-to-run noise), time per token (goal +-10%) and perplexity
increase (goal within 25% relative).

    .venv/bin/python bench/bench_predictions.py [--eval-tokens 2048] [--repeats 3] [--only int8,fp32]

Evaluation text: 2048 tokens (`check`'s default) at least. On 512 the measured perplexity change of a
small loss is mostly the text's noise: the channel-pruned plan's NLL change was 0.010 nats on
evaluation windows 0-1 and 0.046 on windows 2-7 (KL 0.10 and 0.09).

The offload plan's disk is `"local"`: `lwdsl probe --kind disk` measures the disk under $LWDSL_CACHE
the way the streamer reads it (past the page cache), so keep the cache folder on the disk that holds
the benchmark's temporary artifacts (both default to this machine's root file system here).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
KEEP = 'keep lm_head, "model.embed_tokens"'
PLANS = {  # name -> (allow lines, require lines)
    "fp32 (as loaded)": ("", ""),
    "int8": ("quantize weights int8\n" + KEEP, ""),
    "int4 g64": ("quantize weights int4 group 64\n" + KEEP, ""),
    "int4 g32 asym (the GGUF's own grid)": ("quantize weights int4 group 32 asymmetric\n" + KEEP, ""),
    "channels -25% in blocks 10-19": ('within "model.layers.1?.mlp.*" { prune channels up to 25% }\n' + KEEP, ""),
    "int8 + disk offload (cpu0 <= 300 MiB)": ("quantize weights int8\noffload ssd\n" + KEEP,
                                              "memory cpu0 <= 300 MiB"),
}
# The default plan's own allow list (plans/smollm2_edge.lwp): the same model, options and calibration
# text give the same profile key, so `bash scripts/demo.sh` and this benchmark share one profile.
UNION_ALLOW = ("quantize weights int8, int4 group 64, int4 group 32 asymmetric\n"
               "prune channels up to 25%\n" + KEEP)


def plan_text(name: str, allow: str, require: str, eval_tokens: int) -> str:
    return f"""plan bench {{
  model "gguf:{GGUF}" {{
    eval "text:python-docs" tokens {eval_tokens}
    calibrate "text:python-docs" tokens 1024
  }}
  target {{
    device cpu0 cpu "local"
    device ssd disk "local"
    link cpu0 <-> ssd 8 GB/s
  }}
  workload inference {{ batch 1; context 256; generate 32 }}
  require {{ {require} }}
  allow {{
{allow}
  }}
  minimize memory then latency token
}}
# {name}
"""


def _union_profile(folder: Path, eval_tokens: int):
    from lwdsl.plans import load_plan
    from lwdsl.profile import profile

    path = folder / "union.lwp"
    path.write_text(plan_text("union", UNION_ALLOW, "", eval_tokens))
    run = profile(load_plan(path), progress=True)
    print(f"union profile: {run.options} (layer, option) pairs, {'cached' if run.cached else 'measured'} "
          f"in {run.seconds:.0f} s", flush=True)
    return run.profile


def _at_run_rates(spec, disk_Bps: float | None, memory_Bps: float | None):
    """A device's figures at the rates the run itself saw: the disk's read rate, and the CPU's streaming
    read (every stream rate scaled by the ratio of the one seen to the probe's)."""
    if spec.kind == "disk" and disk_Bps:
        return spec.model_copy(update={"bandwidth_Bps": disk_Bps})
    if spec.kind == "cpu" and memory_Bps:
        ratio = memory_Bps / spec.bandwidth_Bps
        return spec.model_copy(update={
            "bandwidth_Bps": memory_Bps,
            "fused_stream": {family: tuple((width, rate * ratio) for width, rate in table)
                             for family, table in spec.fused_stream.items()},
            "prefill_elementwise": tuple((rows, rate * ratio) for rows, rate in spec.prefill_elementwise)})
    return spec


def _predicted_with(profile, plan_file, solution, disk_Bps: float | None = None, memory_Bps: float | None = None):
    """The solution's prediction, its quality taken from the union profile; with `disk_Bps` /
    `memory_Bps`, at the disk and memory rates the run itself saw instead of the probe's."""
    from lwdsl.cost.evaluate import evaluate
    from lwdsl.hardware import resolve_target
    from lwdsl.inventory import load_inventory

    plan = plan_file.plan
    target = resolve_target(plan.target)
    target = target.model_copy(update={"devices": {
        name: _at_run_rates(spec, disk_Bps, memory_Bps) for name, spec in target.devices.items()}})
    return evaluate(load_inventory(plan.model, plan_file.base_dir), target, plan.workload,
                    list(solution.layers), solution.kv_format, solution.tensor_parallel, quality_profile=profile)


def measure(name: str, allow: str, require: str, folder: Path, profile, options) -> dict:
    from lwdsl.plans import load_plan
    from lwdsl.solve.search import solve_plan
    from lwdsl.verify.gate import _measure_and_judge, apply_into

    path = folder / f"plan{abs(hash(name)) % 10**6}.lwp"
    path.write_text(plan_text(name, allow, require, options.eval_tokens or 1024))
    plan_file = load_plan(path)
    solution = solve_plan(plan_file, use_profile=False).solution
    if solution.status not in ("OPTIMAL", "FEASIBLE"):
        raise RuntimeError(f"{name}: {solution.status}")
    solution = solution.model_copy(update={"predicted": _predicted_with(profile, plan_file, solution)})
    started = time.perf_counter()
    artifact = apply_into(plan_file, solution, folder / f"artifact{abs(hash(name)) % 10**6}")
    from lwdsl.verify.gate import CheckOptions

    report = _measure_and_judge(plan_file, artifact, solution, CheckOptions(repeats=options.repeats,
                                baseline_speed=False), str(artifact))
    predictions = {p.metric: p for p in report.predictions}
    predicted = solution.predicted
    stream = report.measured.stream_read_Bps
    memory_now = report.machine.get("memory_read_Bps")
    at_run_rate = _predicted_with(profile, plan_file, solution, stream, memory_now).latency.token_s
    return {"name": name, "seconds": time.perf_counter() - started,
            "memory": (predicted.memory.by_device.get("cpu0").total_bytes if "cpu0" in predicted.memory.by_device
                       else None, report.measured.memory_bytes.get("cpu0")),
            "disk": (predicted.memory.by_device["ssd"].total_bytes if "ssd" in predicted.memory.by_device else None,
                     report.measured.memory_bytes.get("ssd")),
            "prefill": (predicted.latency.prefill_s, report.measured.prefill_s),
            "token": (predicted.latency.token_s, report.measured.token_s),
            "ppl": (predicted.quality.perplexity_increase, report.measured.perplexity_increase),
            "kld": (predicted.quality.kld, report.measured.kld),
            "source": predicted.quality.source, "errors": {k: v.error_relative for k, v in predictions.items()},
            "stream": (_probed_rate(plan_file, "disk"), stream, at_run_rate),
            "bandwidth": (_probed_rate(plan_file, "cpu"), memory_now)}


def _probed_rate(plan_file, kind: str) -> float | None:
    """The bandwidth the prediction took for the plan's first device of `kind`."""
    from lwdsl.hardware import resolve_target

    rates = [spec.bandwidth_Bps for spec in resolve_target(plan_file.plan.target).devices.values() if spec.kind == kind]
    return rates[0] if rates else None


def run_rate_table(rows: list[dict]) -> str:
    """Like for like: the token time the cost model gives at the rates the run itself saw (the CPU's
    streaming read around the timed runs, the disk's read rate during them) next to the probe's."""
    lines = ["| plan | memory read: probe | around the run | disk: probe | during the run | token pred "
             "(probe) | token pred (run's rates) | token meas | err (probe) | err (run's rates) |",
             "|" + "---|" * 10]
    for row in rows:
        probe_bw, run_bw = row["bandwidth"]
        probe_disk, run_disk, at_run = row["stream"]
        guess, real = row["token"]

        def rate(value):
            return f"{value / 1e9:.2f} GB/s" if value else "—"
        lines.append(f"| {row['name']} | {rate(probe_bw)} | {rate(run_bw)} | {rate(probe_disk if run_disk else None)} "
                     f"| {rate(run_disk)} | {guess * 1e3:.2f} ms | {at_run * 1e3:.2f} ms | {real * 1e3:.2f} ms "
                     f"| {(real - guess) / guess:+.0%} | {(real - at_run) / at_run:+.0%} |")
    return "\n".join(lines)


def _pair(pair, scale, unit, digits=1):
    guess, real = pair
    if guess is None or real is None:
        return "—", "—", "—"
    error = f"{(real - guess) / guess:+.0%}" if guess else "—"
    return f"{guess / scale:.{digits}f} {unit}", f"{real / scale:.{digits}f} {unit}", error


def table(rows: list[dict]) -> str:
    lines = ["| plan | memory pred | memory meas | err | prefill pred | prefill meas | err | token pred | "
             "token meas | err | ppl incr. pred | ppl incr. meas | err | KL pred | KL meas |", "|" + "---|" * 15]
    for row in rows:
        memory = _pair(row["memory"], 2**20, "MiB")
        prefill = _pair(row["prefill"], 1e-3, "ms", 1)
        token = _pair(row["token"], 1e-3, "ms", 2)
        ppl = _pair(row["ppl"], 0.01, "%", 2)
        kld = (f"{row['kld'][0]:.4f}", f"{row['kld'][1]:.4f}")
        lines.append(f"| {row['name']} | " + " | ".join(memory + prefill + token + ppl + kld) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", help="comma-separated substrings of plan names")
    options = parser.parse_args()
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = []
    with tempfile.TemporaryDirectory(prefix="lwdsl-bench-") as tmp:
        folder = Path(tmp)
        profile = _union_profile(folder, options.eval_tokens)
        for name, (allow, require) in PLANS.items():
            if options.only and not any(s in name for s in options.only.split(",")):
                continue
            row = measure(name, allow, require, folder, profile, options)
            rows.append(row)
            print(f"{name}: {row}", flush=True)
    print()
    print(table(rows))
    print()
    print(run_rate_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

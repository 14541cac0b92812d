"""`lwdsl check`: measure an applied plan on this machine and hold it to every `require` line.

The steps, each a stage of its own:
1. the plan, and the artifact to judge — given (`--artifact DIR`), or solved and applied now into a
   temporary folder that is removed afterwards;
2. quality: the original model and the artifact over the evaluation windows (perplexity, KL);
3. memory and time: the artifact alone in a fresh process (`memory.measure_isolated`), then the
   original in another, same prompt, same workload;
4. `compare`: every `require` line against measured and predicted figures.

    >>> report = check("plans/smollm2_edge.lwp")       # doctest: +SKIP
    >>> report.passed                                  # doctest: +SKIP
    True
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lwdsl.errors import ExitCode, LwdslError, fail
from lwdsl.placement import torch_devices
from lwdsl.solution import Predicted, Solution
from lwdsl.verify.compare import compare_predictions, compare_requirements
from lwdsl.verify.records import CheckReport, CheckSettings, Measurements, PredictionResult


@dataclass(frozen=True)
class CheckOptions:
    eval_tokens: int | None = None  # default: the plan's `eval ... tokens N`, else 2048
    repeats: int = 5  # timed runs of the workload (median reported)
    warmup: int = 1
    generate: int | None = None  # default: the workload's `generate`
    baseline_speed: bool = True  # also time the original model (for the report's baseline)


def _solution_from_artifact(artifact: Path) -> Solution | None:
    manifest = artifact / "manifest.json"
    if not manifest.is_file():
        raise fail("E710", f"{artifact} is not an lwdsl artifact (no manifest.json)",
                   hint="make one with `lwdsl apply PLAN -o DIR`")
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError) as error:
        raise fail("E711", f"cannot read {manifest}: {error}") from None
    solution = data.get("solution")
    return Solution.model_validate(solution) if solution else None


def _solve_and_apply(plan_file, folder: Path) -> Solution:
    """Solve the plan (its stored profile included) and apply the solution into `folder`."""
    from lwdsl.solve.search import solve_plan

    solution = solve_plan(plan_file).solution
    if solution.status not in ("OPTIMAL", "FEASIBLE"):
        raise fail("E712", f"the plan has no solution ({solution.status}): there is nothing to check",
                   hint="`lwdsl solve` explains which requirements conflict", exit_code=ExitCode.UNMET)
    apply_into(plan_file, solution, folder)
    return solution


def apply_into(plan_file, solution: Solution, folder: Path) -> Path:
    """`lwdsl apply`'s own pipeline (prunes scored on the calibration text) into `folder`."""
    from lwdsl.apply.pipeline import apply_plan

    return apply_plan(plan_file, folder, solution)


def _memory_by_device(plan, solution: Solution | None, peaks: dict[str, int],
                      artifact: Path | None) -> dict[str, int]:
    """Measured peaks named by the plan's devices: CPUs get the resident set, GPUs their allocator
    peak (`lwdsl.placement.torch_devices`: the first gpu device is cuda:0, as the artifact records its
    pipeline stages), disks the bytes offloaded to them."""
    by_device: dict[str, int] = {}
    torch_of = torch_devices({device.name: device.kind for device in plan.target.devices})
    for device in plan.target.devices:
        if device.name in torch_of:
            by_device[device.name] = peaks.get(torch_of[device.name], 0)
        elif device.kind == "disk" and artifact is not None:
            by_device[device.name] = _offloaded_bytes(artifact, device.name, solution)
    return by_device


def _offloaded_bytes(artifact: Path, device: str, solution: Solution | None) -> int:
    """Bytes of the artifact's offload file when weights live on `device` (a disk)."""
    from lwdsl.artifact import OFFLOAD_FILE

    if solution is None or not any(layer.device == device for layer in solution.layers):
        return 0
    path = artifact / OFFLOAD_FILE
    return path.stat().st_size if path.is_file() else 0


def _measurements(plan, solution, run: dict, quality: dict, artifact: Path | None,
                  predicted: Predicted | None) -> Measurements:
    latency = run["latency"]
    by_device = _memory_by_device(plan, solution, run["memory"], artifact)
    computing = {d.name for d in plan.target.devices if d.kind != "disk"}
    return Measurements(
        memory_bytes=by_device,
        memory_total_bytes=sum(v for k, v in by_device.items() if k in computing),
        resident_after_load_bytes=run.get("loaded_bytes"),
        prefill_s=latency["prefill_s"], token_s=latency["token_s"], request_s=latency["request_s"],
        throughput_tok_s=latency["throughput_tok_s"], decode_step=latency.get("decode_step"),
        stream_read_Bps=run.get("stream_read_Bps"),
        token_read_Bps=latency.get("read_Bps"),
        perplexity=quality.get("perplexity"), perplexity_increase=quality.get("perplexity_increase"),
        kld=quality.get("kld"),
        cost_per_h=predicted.cost_per_h if predicted else None,
    )


def _stream_notes(target, solution: Solution | None, measured: Measurements) -> list[str]:
    """Offloaded blocks: the read rate the run saw against the one the prediction took (the disk's
    bandwidth, capped by its link): a disk shared with others moves, and the token time with it."""
    if measured.stream_read_Bps is None or solution is None:
        return []
    from lwdsl.cost.terms import stream_link

    rates = {}
    for layer in solution.layers:
        if layer.device != layer.compute_device and (layer.device, layer.compute_device) not in rates:
            link = stream_link(target, layer.device, layer.compute_device)
            rates[layer.device, layer.compute_device] = link.rate_Bps if link else None
    assumed = ", ".join(f"{store} -> {compute} {rate / 1e9:.2f} GB/s" for (store, compute), rate in rates.items() if rate)
    return [f"offloaded blocks were read at {measured.stream_read_Bps / 1e9:.2f} GB/s during the timed runs; "
            f"the prediction streams them at {assumed or 'no rate'}"]


def _cpu_read(plan) -> float | None:
    """This machine's streaming read now, when the plan has a CPU device (`probe.cpu_read_Bps`)."""
    if not any(device.kind == "cpu" for device in plan.target.devices):
        return None
    from lwdsl.hardware.probe import cpu_read_Bps

    return cpu_read_Bps()


def _bandwidth_notes(target, read_around: tuple[float, float] | None) -> list[str]:
    """The memory bandwidth seen around the timed runs against the one the predictions took, when they
    differ by more than 10%: decode steps stream their weights, so their time moves with it."""
    if not read_around:
        return []
    now = sum(read_around) / 2
    notes = []
    for spec in target.devices.values():
        if spec.kind == "cpu" and spec.bandwidth_Bps > 0 and abs(now / spec.bandwidth_Bps - 1) > 0.10:
            notes.append(f"memory streamed at {now / 1e9:.1f} GB/s around the timed runs (before "
                         f"{read_around[0] / 1e9:.1f}, after {read_around[1] / 1e9:.1f}); the predictions took "
                         f"{spec.bandwidth_Bps / 1e9:.1f} GB/s for {spec.name} ({spec.source}): a decode step's "
                         f"time moves about inversely with it")
    return notes


def _cached_target(plan):
    """The plan's target as the predictions saw it, from the probe cache alone (None: not resolvable)."""
    from lwdsl.hardware.resolve import resolve_target

    try:
        return resolve_target(plan.target, run_probe=False)
    except LwdslError:
        return None


def _rate_notes(target, solution: Solution | None, measured: Measurements,
                read_around: tuple[float, float] | None) -> list[str]:
    """What the run's disk and memory rates say next to the ones the predictions took."""
    if target is None:
        return []
    if measured.token_read_Bps:  # sampled beside each timed run: the closer figure
        read_around = (measured.token_read_Bps, measured.token_read_Bps)
    return _stream_notes(target, solution, measured) + _bandwidth_notes(target, read_around)


def _at_measured_bandwidth(target, predicted: Predicted | None, measured: Measurements) -> list[PredictionResult]:
    """The token prediction at the memory bandwidth the timed runs saw: on one CPU (no GPU), a decode
    step streams its weights, so its predicted time scales by the probe's read rate over the run's.
    A shared host's memory bandwidth moves by tens of percent within seconds; this row says whether
    the cost model or the machine's moment is off. Reported beside the plain comparison, never in
    place of it, and no requirement is judged by it."""
    if target is None or predicted is None or not measured.token_read_Bps or not measured.token_s:
        return []
    computing = [spec for spec in target.devices.values() if spec.computes]
    if len(computing) != 1 or computing[0].kind != "cpu" or computing[0].bandwidth_Bps <= 0:
        return []
    guess = predicted.latency.token_s * computing[0].bandwidth_Bps / measured.token_read_Bps
    if guess <= 0:
        return []
    return [PredictionResult(metric="latency token at the run's bandwidth", predicted=guess,
                             measured=measured.token_s, error_relative=(measured.token_s - guess) / guess)]


def _machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def check(plan_path: str | Path, artifact: str | Path | None = None,
          options: CheckOptions = CheckOptions()) -> CheckReport:
    """Measure the artifact of `plan_path` (applied now when `artifact` is None) and judge it."""
    from lwdsl.plans import load_plan

    plan_file = load_plan(plan_path)
    plan = plan_file.plan
    if plan.workload.type != "inference":
        from lwdsl.verify.train_gate import check_training

        return check_training(plan_file)
    if plan.model.scheme in ("arch", "config"):
        raise fail("E714", f"model {plan.model.source!r} has no weights: there is nothing to measure",
                   plan.model.span, hint="`solve` works without weights; `check` needs them")
    temporary = None
    if artifact is None:
        temporary = Path(tempfile.mkdtemp(prefix="lwdsl-check-"))
        folder = temporary / "artifact"
    else:
        folder = Path(artifact)
        if not folder.is_dir():
            raise fail("E710", f"artifact folder not found: {folder}")
    try:
        solution = _solve_and_apply(plan_file, folder) if temporary else _solution_from_artifact(folder)
        return _measure_and_judge(plan_file, folder, solution, options,
                                  None if temporary else str(folder))
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def _measure_and_judge(plan_file, folder: Path, solution: Solution | None, options: CheckOptions,
                       artifact_label: str | None) -> CheckReport:
    import torch

    import lwdsl.artifact
    from lwdsl.models.load import load_model
    from lwdsl.verify.memory import measure_isolated
    from lwdsl.verify.quality import compare_quality
    from lwdsl.verify.text import plan_texts, prompt_ids, read_text

    plan, base_dir = plan_file.plan, Path(plan_file.base_dir)
    workload = plan.workload
    original, tokenizer = load_model(plan.model, base_dir)
    texts = plan_texts(plan, base_dir, tokenizer, eval_tokens=options.eval_tokens)
    loaded = lwdsl.artifact.load(folder)
    candidate = loaded[0] if isinstance(loaded, tuple) else loaded
    quality = compare_quality(original, candidate, texts.evaluation.ids)
    del candidate, loaded, original
    eval_source = plan.model.eval.source if plan.model.eval else texts.evaluation.source
    prompt = prompt_ids(read_text(eval_source, base_dir), tokenizer, workload.batch, workload.context)
    generate = options.generate or workload.generate
    torch.set_num_threads(torch.get_num_threads())

    read_before = _cpu_read(plan)
    artifact_run = measure_isolated({"kind": "artifact", "path": str(folder)}, prompt.tolist(), generate,
                                    options.repeats, options.warmup)
    read_around = (read_before, _cpu_read(plan)) if read_before else None
    if options.baseline_speed:
        baseline_spec = {"kind": "model", "block": plan.model.model_dump(mode="json"),
                         "base_dir": str(base_dir)}
        baseline_run = measure_isolated(baseline_spec, prompt.tolist(), generate, options.repeats,
                                        options.warmup)
    else:
        baseline_run = {"memory": {}, "latency": dict.fromkeys(
            ("prefill_s", "token_s", "request_s", "throughput_tok_s"))}
    predicted = solution.predicted if solution else None
    measured = _measurements(plan, solution, artifact_run,
                             {"perplexity": quality.perplexity, "perplexity_increase": quality.perplexity_increase,
                              "kld": quality.kld}, folder, predicted)
    baseline = _measurements(plan, None, baseline_run,
                             {"perplexity": quality.baseline_perplexity, "perplexity_increase": 0.0,
                              "kld": 0.0}, None, None)
    requirements = compare_requirements(plan, plan_file.text, measured, predicted,
                                        quality.baseline_perplexity)
    notes = []
    if solution is None:
        notes.append("the artifact carries no solution: predictions are not compared")
    elif solution.plan_hash and solution.plan_hash != plan_file.sha256:
        notes.append("the artifact was made from a different version of this plan (plan hash differs)")
    target = _cached_target(plan)
    notes += _rate_notes(target, solution, measured, read_around)
    machine = _machine()
    if read_around:
        machine["memory_read_Bps"] = sum(read_around) / 2
    return CheckReport(
        plan=plan.name,
        plan_file=str(plan_file.path),
        plan_hash=plan_file.sha256,
        artifact=artifact_label,
        solution_status=solution.status if solution else None,
        passed=all(r.passed for r in requirements),
        requirements=requirements,
        predictions=compare_predictions(predicted, measured) + _at_measured_bandwidth(target, predicted, measured),
        measured=measured,
        baseline=baseline,
        settings=CheckSettings(eval_tokens=quality.tokens, eval_source=texts.evaluation.source,
                               batch=workload.batch, context=workload.context, generate=generate,
                               repeats=options.repeats, warmup=options.warmup),
        machine=machine,
        notes=notes,
    )

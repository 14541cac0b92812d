"""The train stage: a `workload training` plan run for real with its solved settings.

    solve (ZeRO stage, checkpointing, accumulation, ranks) ─▶ RunConfig ─▶ ranks (gloo / NCCL) ─▶ TrainReport
                                                                └─ cost.training.step_figures: predicted

    records.py     RunConfig (what every rank is told), TrainReport (lwdsl.train/1)
    data.py        fixed windows of the plan's calibrate text, in an order the step alone fixes
    zero.py        ZeRO stage -> DDP / ZeroRedundancyOptimizer / FSDP2 (a registry)
    checkpoint.py  atomic safetensors checkpoints, `latest.json`, resume
    worker.py      one rank: load, wrap, train, measure peak memory and step time, checkpoint
    launch.py      spawn the ranks with torchrun's environment (or run as one under torchrun)

    >>> report = train_plan(load_plan("plans/smollm2_train.lwp"), out_dir=Path("out/train"), steps=50)  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lwdsl import ast
from lwdsl.errors import ExitCode, fail
from lwdsl.train.records import Measured, PredictedStep, RunConfig, TrainReport

_TEXT_CHARS = 4_000_000  # read at most this much of the text (about a million tokens)


_OVERRIDES = {"zero": "zero_stage", "checkpoint": "checkpoint_activations", "accumulate": "accumulate",
              "data": "data_parallel", "offload_optimizer": "optimizer_offload"}


def overrides_of(pairs: list[str]) -> dict:
    """`--with` settings (`zero=3`, `checkpoint`, `accumulate=2`, `data=2`) as solved-settings keys."""
    from lwdsl.estimate import parse_settings

    parsed = parse_settings(pairs)
    return {_OVERRIDES[k]: getattr(parsed, k) for k in parsed.model_fields_set if k in _OVERRIDES}


def _settings(plan_file, solution) -> dict:
    if solution is None:
        from lwdsl.solve.search import solve_plan

        solution = solve_plan(plan_file).solution
    if solution.status not in ("OPTIMAL", "FEASIBLE") or solution.predicted is None or \
            solution.predicted.training is None:
        raise fail("E804", f"the plan has no training settings that meet its requirements ({solution.status})",
                   hint="`lwdsl solve PLAN` names the conflicting lines", exit_code=ExitCode.UNMET)
    return solution.predicted.training.model_dump()


def _tokens(plan: ast.Plan, base_dir: Path, model_dir: Path, needed: int) -> tuple[list[int], str]:
    from transformers import AutoTokenizer

    from lwdsl.verify.text import PYTHON_DOCS, read_text

    node = plan.model.calibrate or plan.model.eval
    source = node.source if node else f"text:{PYTHON_DOCS}"
    text = read_text(source, base_dir, node.span if node else plan.model.span)
    limit = node.tokens if node and node.tokens else None
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer(text[:_TEXT_CHARS], add_special_tokens=False)["input_ids"]
    ids = ids[:limit] if limit else ids
    if len(ids) < needed:
        raise fail("E805", f"the training text {source} has {len(ids)} tokens; one step needs {needed}",
                   node.span if node else plan.model.span, hint="a longer text, or a smaller batch or sequence")
    digest = hashlib.sha256(" ".join(map(str, ids)).encode()).hexdigest()[:16]
    return ids, digest


def _device_kind(plan: ast.Plan, target) -> str:
    kinds = {target.device(n).kind for n in target.compute_devices()}
    if kinds == {"gpu"}:
        import torch

        if not torch.cuda.is_available():
            raise fail("E803", "the plan trains on gpu devices; torch sees no CUDA GPU on this machine",
                       plan.target.span, hint="run it where the GPUs are, or declare cpu devices")
        return "cuda"
    return "cpu"


def run_config(plan_file, out_dir: Path, steps: int | None = None, lr: float = 1e-4, checkpoint_every: int = 10,
               solution=None, overrides: dict | None = None) -> tuple[RunConfig, list[int], dict]:
    """The RunConfig, the token stream and the solved settings of a training plan."""
    from lwdsl.hardware import resolve_target
    from lwdsl.models.load import cached_hf_folder

    plan = plan_file.plan
    if not isinstance(plan.workload, ast.TrainingWorkload):
        raise fail("E801", "`lwdsl train` runs training plans; this plan's workload is inference",
                   plan.workload.span if plan.workload else plan.span,
                   hint="write `workload training { batch N; sequence N; tokens N; ... }`")
    workload = plan.workload
    settings = {**_settings(plan_file, solution), **(overrides or {})}
    target = resolve_target(plan.target)
    if settings["data_parallel"] > len(target.compute_devices()):
        raise fail("E808", f"data={settings['data_parallel']} needs that many compute devices; the target has "
                           f"{len(target.compute_devices())}", plan.target.span)
    ranks, accumulate = settings["data_parallel"], settings["accumulate"]
    micro_batch = max(1, -(-workload.batch // (ranks * accumulate)))
    if steps is None:
        steps = max(1, workload.tokens // (micro_batch * ranks * accumulate * workload.sequence))
    model_dir = cached_hf_folder(plan.model, plan_file.base_dir)
    tokens, text_hash = _tokens(plan, plan_file.base_dir, model_dir, micro_batch * workload.sequence)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    config = RunConfig(model_dir=str(model_dir), ranks=ranks, zero_stage=settings["zero_stage"],
                       checkpoint_activations=settings["checkpoint_activations"], accumulate=accumulate,
                       micro_batch=micro_batch, sequence=workload.sequence, precision=workload.precision,
                       optimizer=workload.optimizer, offload_optimizer=settings["optimizer_offload"] is not None,
                       steps=steps, lr=lr, out_dir=str(out_dir), checkpoint_every=max(1, checkpoint_every),
                       text_hash=text_hash, device=_device_kind(plan, target), threads=max(1, cpus // ranks))
    return config, tokens, settings


def _check_resume(config: RunConfig) -> None:
    import json

    from lwdsl.train import checkpoint

    folder = checkpoint.latest(Path(config.out_dir))
    if folder is None:
        return
    state = json.loads((folder / "state.json").read_text())
    if state.get("fingerprint") != config.fingerprint():
        raise fail("E806", f"{folder} is from a different run (model, text, batch or sequence differ)",
                   hint="name a new output folder with -o, or remove this one")


def predicted_step(plan_file, settings: dict, config: RunConfig) -> PredictedStep:
    from lwdsl.cost.training import step_figures
    from lwdsl.hardware import resolve_target
    from lwdsl.inventory import load_inventory

    plan = plan_file.plan
    inventory = load_inventory(plan.model, plan_file.base_dir)
    target = resolve_target(plan.target)
    if config.ranks > 1 and config.device == "cpu":
        from lwdsl.hardware.probe_collective import ranks_local, with_local_collectives

        if ranks_local(target, config.ranks):  # measured before the ranks start, never beside them
            target = with_local_collectives(target, [config.ranks], span=plan.target.span)
    figures = step_figures(inventory, target, plan.workload, zero_stage=config.zero_stage,
                           data_parallel=config.ranks, checkpoint=config.checkpoint_activations,
                           accumulate=config.accumulate, offload_optimizer=settings["optimizer_offload"])
    return PredictedStep(peak_memory_bytes=figures.peak_bytes, step_s=figures.step_s,
                         tokens_per_s=figures.tokens_per_s, compute_s=figures.compute_s,
                         optimizer_s=figures.optimizer_s, collective_s=figures.collective_s)


def train_plan(plan_file, out_dir: Path, steps: int | None = None, lr: float = 1e-4, checkpoint_every: int = 10,
               on_step=None, solution=None, overrides: dict | None = None) -> TrainReport:
    """Train the plan's model with its solved settings; resumes from `out_dir`'s last checkpoint."""
    from lwdsl.train.launch import launch

    config, tokens, settings = run_config(plan_file, out_dir, steps, lr, checkpoint_every, solution, overrides)
    _check_resume(config)
    predicted = predicted_step(plan_file, settings, config)
    result = launch(config, tokens, on_step)
    tokens_per_step = config.global_batch * config.sequence
    step_s = result.get("step_s", 0.0)
    measured = Measured(peak_memory_bytes=max(result.get("peaks") or [0]),
                        peak_memory_by_rank=list(result.get("peaks") or []), step_s=step_s,
                        tokens_per_s=tokens_per_step / step_s if step_s > 0 else 0.0)
    notes = []
    if settings["optimizer_offload"] and config.device == "cpu":
        notes.append(f"optimizer offload to {settings['optimizer_offload']}: the ranks compute on the CPU, "
                     "whose memory already holds the optimizer states (nothing to move)")
    return TrainReport(plan=plan_file.plan.name, steps=len(result.get("losses", [])), ranks=config.ranks,
                       zero_stage=config.zero_stage, checkpoint_activations=config.checkpoint_activations,
                       accumulate=config.accumulate, micro_batch=config.micro_batch, sequence=config.sequence,
                       precision=config.precision, optimizer_offload=settings["optimizer_offload"],
                       resumed_from=result.get("start_step", 0), loss=result.get("losses", []),
                       measured=measured, predicted=predicted, checkpoint=result.get("checkpoint"), notes=notes)

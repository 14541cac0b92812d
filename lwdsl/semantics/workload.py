"""The workload and the rest agree: no decode latency or throughput in a training plan, no training
`time` or training techniques in an inference plan, no `time` without a dataset size (E230-E232)."""
from __future__ import annotations

from lwdsl import ast
from lwdsl.errors import Diagnostic
from lwdsl.semantics.context import Context, error, metrics, walk_techniques

INFERENCE_ONLY = {"latency": "a training run has no decode latency", "throughput": "a training run generates no tokens"}
TRAINING_ONLY_METRICS = {"time": "`time` is the wall time of a training run"}
TRAINING_ONLY_TECHNIQUES = {ast.Zero: "zero", ast.Checkpoint: "checkpoint activations",
                            ast.Accumulate: "accumulate", ast.OffloadOptimizer: "offload optimizer"}


def check(plan: ast.Plan, context: Context) -> list[Diagnostic]:
    found: list[Diagnostic] = []
    training = plan.workload.type == "training"
    for metric in metrics(plan):
        if training and metric.name in INFERENCE_ONLY:
            found.append(error("E230", f"`{metric.name}` means nothing in a training plan", metric.span,
                               INFERENCE_ONLY[metric.name] + "; use `time` or `memory`"))
        if not training and metric.name in TRAINING_ONLY_METRICS:
            found.append(error("E230", f"`{metric.name}` means nothing in an inference plan", metric.span,
                               TRAINING_ONLY_METRICS[metric.name] + "; use `latency request` for one request"))
    if training and plan.workload.tokens == 0 and any(m.name == "time" for m in metrics(plan)):
        found.append(error("E232", "`time` needs the dataset size, and the training workload has no `tokens`",
                           plan.workload.span, "add `tokens N` (the number of training tokens) to the workload"))
    for technique, _ in walk_techniques(plan.allow.techniques):
        name = TRAINING_ONLY_TECHNIQUES.get(type(technique))
        if name is None and isinstance(technique, ast.Shard) and technique.kind == "data":
            name = "shard data"
        if name is not None and not training:
            found.append(error("E231", f"`{name}` is a training technique, and this plan's workload is inference",
                               technique.span, "use `workload training { ... }` or remove it"))
    return found

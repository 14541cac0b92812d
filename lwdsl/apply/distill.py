"""`recover distill`: win back quality after compression by distilling from the original model.

The compressed model is the student, the original the teacher; the loss is the KL divergence of the
student's next-token distribution from the teacher's, KL(teacher ‖ student), averaged over the
tokens of windows of the plan's calibrate text (one window of `sequence` tokens a step, cycling).
What trains: every floating-point parameter of the student (norms, embeddings, float and pruned
linears) and, through the quantizer, every packed quantized layer (`lwdsl.apply.straight_through`: a
float master weight fake-quantized in the forward, the identity as its gradient, re-packed in the
layer's format at the end). Training through the quantizer recovered more per step than training only
the float parameters around frozen codes (bench/bench_straight_through.py, docs/BENCHMARKS.md), so it
is the default; `through_quantizer=False` keeps the codes frozen. AdamW, constant learning rate, fp32.

    distill(student, teacher, windows, steps=300)   # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Callable

DEFAULT_LR = 5e-5


def trainable_parameters(model) -> list:
    """The student's floating-point parameters (packed integer weights are buffers, not parameters)."""
    return [p for p in model.parameters() if p.is_floating_point()]


def distill(student, teacher, windows, steps: int, sequence: int = 128, lr: float = DEFAULT_LR,
            on_step: Callable[[int, float], None] | None = None, start_step: int = 0,
            optimizer=None, through_quantizer: bool = True, keep_training: bool = False) -> list[float]:
    """Run `steps` distillation steps on `student` in place; the KL of each step (nats a token).
    `start_step` continues the window order of an earlier call. `keep_training`: leave quantized layers
    in their straight-through training form (a run in several calls, evaluated in between: the forward
    is the quantized one either way); the last call packs them back."""
    import torch
    import torch.nn.functional as F

    from lwdsl.apply.straight_through import unwrap_quantized, wrap_quantized

    if steps <= 0:
        return []
    if through_quantizer:
        wrap_quantized(student)
    params = trainable_parameters(student)
    for p in params:
        p.requires_grad_(True)
    optimizer = optimizer or _optimizer(student, params, lr)
    rows = windows.reshape(-1)
    count = max(1, rows.numel() // sequence)
    teacher.eval()
    student.train()
    losses = []
    for step in range(start_step, start_step + steps):
        ids = rows[(step % count) * sequence:(step % count + 1) * sequence].unsqueeze(0)
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=ids).logits.float(), dim=-1)
        logits = student(input_ids=ids).logits.float()
        loss = F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True, reduction="none").sum(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1 - start_step, losses[-1])
    student.eval()
    for p in params:
        p.requires_grad_(False)
    if not keep_training:
        unwrap_quantized(student)
    return losses


def _optimizer(student, params, lr: float):
    """One AdamW per student, kept on it, so a distillation run in several calls is one run."""
    import torch

    existing = getattr(student, "_lwdsl_distill_optimizer", None)
    if existing is None:
        existing = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        student._lwdsl_distill_optimizer = existing
    return existing


def held_out_kl(student, teacher, windows) -> float:
    """Mean KL(teacher ‖ student) a token over `windows` ([n, length] ids), no gradients."""
    import torch
    import torch.nn.functional as F

    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in windows:
            ids = row.unsqueeze(0)
            t = F.log_softmax(teacher(input_ids=ids).logits.float(), dim=-1)
            s = F.log_softmax(student(input_ids=ids).logits.float(), dim=-1)
            total += float(F.kl_div(s, t, log_target=True, reduction="none").sum(-1).sum())
            tokens += ids.numel()
    return total / max(1, tokens)

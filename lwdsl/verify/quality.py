"""Perplexity and KL divergence to the original model over evaluation windows.

Both models see the same windows; each window's next-token distributions are compared position by
position (the last position has no next token and is dropped). KL is KL(original || candidate),
averaged per token, in nats — the quantity `quality kld` in a plan means.

    >>> result = compare_quality(original, candidate, windows.ids)    # doctest: +SKIP
    >>> result.perplexity_increase                                     # doctest: +SKIP
    0.031
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BATCH_WINDOWS = 4  # windows per forward: bounds the logits buffer (4 x 256 x 49152 floats)


@dataclass(frozen=True)
class QualityResult:
    tokens: int  # predicted positions that were scored
    baseline_perplexity: float
    perplexity: float
    kld: float  # mean KL(original || candidate) per token, nats

    @property
    def perplexity_increase(self) -> float:
        return self.perplexity / self.baseline_perplexity - 1.0


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, whether it returns a tensor or an output object with `.logits`."""
    parameters = getattr(model, "parameters", None)  # a model on a GPU gets its inputs there, logits back here
    device = next(parameters()).device if parameters is not None else input_ids.device
    output = model(input_ids.to(device))
    logits = output if isinstance(output, torch.Tensor) else output.logits
    return logits.float().to(input_ids.device)


def _score(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum()


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch_windows: int = BATCH_WINDOWS) -> float:
    """exp(mean next-token negative log-likelihood) of `model` over `windows` (n, length)."""
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_windows):
        ids = windows[start:start + batch_windows]
        log_probs = torch.log_softmax(logits_of(model, ids)[:, :-1], dim=-1)
        total += float(_score(log_probs, ids[:, 1:]))
        count += ids[:, 1:].numel()
    return math.exp(total / count)


@torch.inference_mode()
def compare_quality(original, candidate, windows: torch.Tensor,
                    batch_windows: int = BATCH_WINDOWS) -> QualityResult:
    """Perplexity of both models and mean per-token KL(original || candidate) over `windows`."""
    nll_original = nll_candidate = kld_sum = 0.0
    count = 0
    for start in range(0, windows.shape[0], batch_windows):
        ids = windows[start:start + batch_windows]
        targets = ids[:, 1:]
        reference = torch.log_softmax(logits_of(original, ids)[:, :-1], dim=-1)
        nll_original += float(_score(reference, targets))
        measured = torch.log_softmax(logits_of(candidate, ids)[:, :-1], dim=-1)
        nll_candidate += float(_score(measured, targets))
        kld_sum += float((reference.exp() * (reference - measured)).sum())
        count += targets.numel()
        del reference, measured
    return QualityResult(
        tokens=count,
        baseline_perplexity=math.exp(nll_original / count),
        perplexity=math.exp(nll_candidate / count),
        kld=max(0.0, kld_sum / count),
    )

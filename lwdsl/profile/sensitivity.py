"""How much one weight perturbation on one layer costs in quality — for every layer and option at once.

The exact measure (swap one layer, run the whole model, compare next-token distributions) costs one
forward pass per (layer, option): about 800 passes for SmolLM2 with five options, far too slow.
This module uses the second-order expansion of the KL divergence instead, which is exact in the
limit of small perturbations and needs only a handful of passes in all:

    KL(p || p') ~= 1/2 * E_{y ~ p} [ (d log p(y) / d out_L  .  delta out_L)^2 ]

where `out_L` is the output of layer L and `delta out_L = x_L @ (W'_L - W_L)^T` the change one option
makes to it. The expectation over tokens drawn from the model's own distribution is the Fisher
information (the Hessian of the KL at zero perturbation); a few sampled labels per position
estimate it without bias. One backward pass per sample gives the gradient at *every* layer, and the
change of every option at every layer is then one matrix product, so the cost is
`1 + samples + 1` passes plus one forward's worth of matrix products per option — not one pass
per (layer, option). Positions are treated one at a time (the square is taken per position):
the cross terms between different positions' changes through attention are left out.

The negative log-likelihood of the real next tokens moves, to second order, by the first-order term
`-d log p(y_true) / d out_L . delta out_L` plus the same KL term (the Hessian of the cross-entropy
in the logits does not depend on the label), hence the perplexity estimate.

`exact_loss` runs the slow exact measure for one (layer, weight); tests use it to hold the shortcut
to account.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from lwdsl.verify.quality import compare_quality


@dataclass(frozen=True)
class LayerLoss:
    kld: float  # estimated mean KL(original || perturbed) per token, nats
    nll_change: float  # estimated change of the mean negative log-likelihood per token, nats

    @property
    def perplexity_increase(self) -> float:
        return math.exp(self.nll_change) - 1.0


# A weight delta for (layer name, its weight) -> W' - W, or None when the option does not apply.
DeltaFn = Callable[[str, torch.Tensor], torch.Tensor | None]


class _Recorder:
    """Hooks on the profiled linears: their inputs and output gradients, one entry per backward.

    For a value projection (`...self_attn.v_proj`) it also keeps the attention probabilities and the
    output projection's gradients: a change of V reaches the attention output only as the
    attention-weighted average of the changed values, so its effect is taken there (see
    `_value_change`), where it is position-local again.
    """

    def __init__(self, model, layers: dict[str, torch.nn.Module]):
        self.inputs: dict[str, torch.Tensor] = {}
        self.grads: dict[str, list[torch.Tensor]] = {}
        self.attention: dict[str, torch.Tensor] = {}
        self.handles = [model.get_input_embeddings().register_forward_hook(self._track)]
        watched = dict(layers)
        for name in layers:
            if name.endswith("self_attn.v_proj"):
                parent = name.rsplit(".", 1)[0]
                watched.setdefault(f"{parent}.o_proj", model.get_submodule(f"{parent}.o_proj"))
                self.handles.append(model.get_submodule(parent).register_forward_hook(
                    self._attention_hook(parent)))
        for name, module in watched.items():
            self.grads[name] = []
            self.handles.append(module.register_forward_hook(self._hook_for(name)))

    @staticmethod
    def _track(module, args, output):
        return output.detach().requires_grad_(True)

    def _hook_for(self, name: str):
        def hook(module, args, output):
            self.inputs[name] = args[0].detach()
            output.register_hook(lambda grad: self.grads[name].append(grad.detach()))
        return hook

    def _attention_hook(self, parent: str):
        def hook(module, args, output):
            self.attention[parent] = output[1].detach()  # (batch, heads, queries, keys)
        return hook

    def clear(self):
        self.inputs.clear()
        self.attention.clear()
        for grads in self.grads.values():
            grads.clear()

    def close(self):
        for handle in self.handles:
            handle.remove()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    output = model(ids)
    return (output if isinstance(output, torch.Tensor) else output.logits).float()


@dataclass(frozen=True)
class _Site:
    """Where a layer's change is dotted with gradients: the input of `apply` and the gradients."""

    averaged_inputs: torch.Tensor | None  # value projections: (batch, heads, length, in)
    inputs: torch.Tensor
    grads: list[torch.Tensor]  # true-label gradient first, then one per sample


def _site(name: str, recorder: _Recorder, model) -> _Site:
    if name.endswith("self_attn.v_proj") and name.rsplit(".", 1)[0] in recorder.attention:
        parent = name.rsplit(".", 1)[0]
        probabilities = recorder.attention[parent]
        inputs = recorder.inputs[name]
        averaged = probabilities @ inputs.unsqueeze(1)  # each head's attention-weighted inputs
        out_weight = model.get_submodule(f"{parent}.o_proj").weight
        grads = [grad @ out_weight for grad in recorder.grads[f"{parent}.o_proj"]]  # at o_proj's input
        return _Site(averaged, inputs, grads)
    return _Site(None, recorder.inputs[name], recorder.grads[name])


def _change(site: _Site, delta: torch.Tensor) -> torch.Tensor:
    """How much the option moves the activations the site's gradients are taken at."""
    if site.averaged_inputs is None:
        return site.inputs @ delta.T
    batch, heads, length, _ = site.averaged_inputs.shape
    kv_heads = delta.shape[0] // (site.grads[0].shape[-1] // heads)
    per_kv_head = delta.reshape(kv_heads, -1, delta.shape[1])  # (kv_heads, head_dim, in)
    per_head = per_kv_head.repeat_interleave(heads // kv_heads, dim=0)  # grouped-query sharing
    change = site.averaged_inputs @ per_head.transpose(1, 2).unsqueeze(0)  # (batch, heads, length, head_dim)
    return change.transpose(1, 2).reshape(batch, length, -1)


def estimate_losses(model, layers: dict[str, torch.nn.Module],
                    deltas: dict[str, dict[str, torch.Tensor]], windows: torch.Tensor,
                    samples: int = 2, batch_windows: int = 1, seed: int = 0,
                    on_batch: Callable[[int], None] | None = None) -> dict[str, dict[str, LayerLoss]]:
    """`loss[layer][option]` for every weight delta in `deltas[layer][option]`, on `windows`.

    `layers` maps names to the linear modules of `model` (left unchanged); each delta has the
    weight's shape. `samples` labels are drawn per position from the model's own distribution
    with a fixed seed, so the result is deterministic for a given machine.
    """
    generator = torch.Generator().manual_seed(seed)
    first_order = {n: dict.fromkeys(opts, 0.0) for n, opts in deltas.items()}
    fisher = {n: dict.fromkeys(opts, 0.0) for n, opts in deltas.items()}
    positions = 0
    flags = [p.requires_grad for p in model.parameters()]
    implementation = model.config._attn_implementation
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if any(name.endswith("self_attn.v_proj") for name in deltas):
        model.set_attn_implementation("eager")  # attention probabilities are needed
    recorder = _Recorder(model, {n: layers[n] for n in deltas})
    try:
        for start in range(0, windows.shape[0], batch_windows):
            ids = windows[start:start + batch_windows]
            with torch.enable_grad():
                output = model(ids)
                log_probs = torch.log_softmax(output.logits[:, :-1].float(), dim=-1)
                del output
                true_ll = log_probs.gather(-1, ids[:, 1:].unsqueeze(-1)).sum()
                true_ll.backward(retain_graph=True)
                probs = log_probs.detach().exp().reshape(-1, log_probs.shape[-1])
                for sample in range(samples):
                    drawn = torch.multinomial(probs, 1, generator=generator).reshape(ids[:, 1:].shape)
                    sampled_ll = log_probs.gather(-1, drawn.unsqueeze(-1)).sum()
                    sampled_ll.backward(retain_graph=sample + 1 < samples)
            del log_probs, probs
            with torch.no_grad():
                for name, options in deltas.items():
                    site = _site(name, recorder, model)
                    true_grad, sampled = site.grads[0], torch.stack(site.grads[1:])
                    for option, delta in options.items():
                        change = _change(site, delta)  # (batch, length, features)
                        first_order[name][option] += float((true_grad * change).sum())
                        per_position = (sampled * change).sum(-1)  # (samples, batch, length)
                        fisher[name][option] += float((per_position ** 2).sum()) / samples
            positions += ids[:, 1:].numel()
            recorder.clear()
            if on_batch:
                on_batch(ids.shape[0])
    finally:
        recorder.close()
        model.set_attn_implementation(implementation)
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)
    result: dict[str, dict[str, LayerLoss]] = {}
    for name, options in deltas.items():
        result[name] = {}
        for option in options:
            kld = 0.5 * fisher[name][option] / positions
            result[name][option] = LayerLoss(kld=kld, nll_change=kld - first_order[name][option] / positions)
    return result


@torch.no_grad()
def exact_loss(model, layer: torch.nn.Module, new_weight: torch.Tensor, windows: torch.Tensor) -> LayerLoss:
    """The slow exact measure: `layer.weight` swapped for `new_weight`, the whole model run, restored."""
    import copy

    candidate = copy.deepcopy(model)
    name = next(n for n, m in model.named_modules() if m is layer)
    candidate.get_submodule(name).weight.copy_(new_weight)
    result = compare_quality(model, candidate, windows)
    nll_change = math.log(result.perplexity) - math.log(result.baseline_perplexity)
    return LayerLoss(kld=result.kld, nll_change=nll_change)


def linear_layers(model, names: Iterable[str]) -> dict[str, torch.nn.Module]:
    return {name: model.get_submodule(name) for name in names}

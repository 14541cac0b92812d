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
from collections.abc import Callable
from dataclasses import dataclass

import torch



@dataclass(frozen=True)
class LayerLoss:
    kld: float  # estimated mean KL(original || perturbed) per token, nats
    nll_change: float  # estimated change of the mean negative log-likelihood per token, nats

    @property
    def perplexity_increase(self) -> float:
        return math.exp(self.nll_change) - 1.0


@dataclass(frozen=True)
class Derived:
    """An option's change expressed through another option of the same layer (`base`, or the
    unchanged weight when `base` is None): its outputs `zero_rows` set back to the original, and/or
    its inputs `drop_columns` removed. Costs a fraction of a matrix product instead of a whole one."""

    base: object | None = None
    zero_rows: torch.Tensor | None = None
    drop_columns: torch.Tensor | None = None


# The weight change an option makes to a layer: (layer name, option) -> W' - W, or a `Derived`.
DeltaFn = Callable[[str, object], "torch.Tensor | Derived"]


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


@dataclass(frozen=True)
class Estimate:
    losses: dict[str, dict]  # losses[layer][option] -> LayerLoss
    baseline_perplexity: float  # of the unchanged model on the same windows
    tokens: int  # predicted positions scored
    reference: torch.Tensor  # the unchanged model's log-probabilities, (windows, length - 1, vocab)


def _option_change(site: _Site, option, spec, dense: dict, changes: dict, weight: torch.Tensor):
    """The option's change at the site; dense deltas and changes are kept per layer for `Derived`."""
    if isinstance(spec, torch.Tensor):
        dense[option], changes[option] = spec, _change(site, spec)
        return changes[option]
    if site.averaged_inputs is not None:
        raise ValueError("derived changes apply to position-local sites only")
    if spec.base is None:
        change, base_weight = torch.zeros(*site.inputs.shape[:-1], weight.shape[0]), weight
    else:
        change, base_weight = changes[spec.base], weight + dense[spec.base]
    if spec.zero_rows is not None:
        change = change.clone()
        change[..., spec.zero_rows] = 0.0
    if spec.drop_columns is not None:
        columns = spec.drop_columns
        change = change - site.inputs[..., columns] @ base_weight[:, columns].T
    changes[option] = change
    return change


def _draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per row of `probs` (rows, vocab), drawn by inverting the cumulative distribution:
    `torch.multinomial` took 1.1 s for 1020 x 49152 here, this 0.08 s."""
    cumulative = torch.cumsum(probs, dim=-1)
    point = torch.rand(probs.shape[0], 1, generator=generator) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, point, right=True).clamp_(max=probs.shape[-1] - 1)


def _terms(true_grad, sampled, change, dtype=None) -> tuple[float, float]:
    """(first-order term, summed squares of the per-position Fisher products) of one option's change."""
    if dtype is not None:
        true_grad = None if true_grad is None else true_grad.to(dtype)
        sampled, change = sampled.to(dtype), change.to(dtype)
    linear = float((true_grad * change).sum()) if true_grad is not None else 0.0
    per_position = (sampled * change).sum(-1)  # (samples, batch, length)
    return linear, float((per_position ** 2).sum())


def estimate_losses(model, options: dict[str, list], delta: DeltaFn, windows: torch.Tensor,
                    samples: int = 2, batch_windows: int = 2, seed: int = 0,
                    on_layer: Callable[[str], None] | None = None, first_order: bool = True) -> Estimate:
    """`loss[layer][option]` for every option of every layer in `options`, on `windows`.

    `delta(layer, option)` gives the option's weight change `W' - W` (the weight's shape); it is
    called once per batch of windows, so deltas are never all held at once. `samples` labels are
    drawn per position from the model's own distribution with a fixed seed (deterministic).
    `first_order=False` skips the real tokens' gradient (one backward pass fewer per batch);
    `nll_change` is then the KL term alone. The model is left unchanged.
    """
    layers = {name: model.get_submodule(name) for name in options}
    generator = torch.Generator().manual_seed(seed)
    linear_term = {n: dict.fromkeys(opts, 0.0) for n, opts in options.items()}
    fisher = {n: dict.fromkeys(opts, 0.0) for n, opts in options.items()}
    positions, true_nll = 0, 0.0
    reference = []  # kept for the exact runs after: one forward pass of the original fewer
    flags = [p.requires_grad for p in model.parameters()]
    implementation = model.config._attn_implementation
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if any(name.endswith("self_attn.v_proj") for name in options):
        model.set_attn_implementation("eager")  # attention probabilities are needed
    recorder = _Recorder(model, layers)
    try:
        for start in range(0, windows.shape[0], batch_windows):
            ids = windows[start:start + batch_windows]
            with torch.enable_grad():
                output = model(ids)
                log_probs = torch.log_softmax(output.logits[:, :-1].float(), dim=-1)
                del output
                true_ll = log_probs.gather(-1, ids[:, 1:].unsqueeze(-1)).sum()
                if first_order:
                    true_ll.backward(retain_graph=True)
                true_nll -= float(true_ll.detach())
                reference.append(log_probs.detach())
                probs = reference[-1].exp().reshape(-1, log_probs.shape[-1])
                for sample in range(samples):
                    drawn = _draw(probs, generator).reshape(ids[:, 1:].shape)
                    sampled_ll = log_probs.gather(-1, drawn.unsqueeze(-1)).sum()
                    sampled_ll.backward(retain_graph=sample + 1 < samples)
            del log_probs, probs
            if on_layer:
                on_layer("")  # the passes themselves
            with torch.no_grad():
                for name, layer_options in options.items():
                    site = _site(name, recorder, model)
                    true_grad = site.grads[0] if first_order else None
                    sampled = torch.stack(site.grads[1:] if first_order else site.grads)
                    dense: dict = {}
                    changes: dict = {}
                    for option in layer_options:
                        change = _option_change(site, option, delta(name, option), dense, changes,
                                                layers[name].weight)  # (batch, length, features)
                        linear, square = _terms(true_grad, sampled, change)
                        if not (math.isfinite(linear) and math.isfinite(square)):
                            # float32 overflows on outlier activations (Qwen2.5's down_proj inputs
                            # reach ~1e4): the same sums in float64
                            linear, square = _terms(true_grad, sampled, change, torch.float64)
                        linear_term[name][option] += linear
                        fisher[name][option] += square / samples
                    if on_layer:
                        on_layer(name)
            positions += ids[:, 1:].numel()
            recorder.clear()
    finally:
        recorder.close()
        model.set_attn_implementation(implementation)
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)
    result: dict[str, dict] = {}
    for name, layer_options in options.items():
        result[name] = {}
        for option in layer_options:
            kld = 0.5 * fisher[name][option] / positions
            result[name][option] = LayerLoss(kld=kld, nll_change=kld - linear_term[name][option] / positions)
    return Estimate(result, math.exp(true_nll / positions), positions, torch.cat(reference))


@torch.no_grad()
def reference_log_probs(model, windows: torch.Tensor, batch_windows: int = 4) -> torch.Tensor:
    """The unchanged model's next-token log-probabilities on `windows`, (windows, length - 1, vocab)."""
    return torch.cat([torch.log_softmax(_logits(model, windows[i:i + batch_windows])[:, :-1], dim=-1)
                      for i in range(0, windows.shape[0], batch_windows)])


@torch.no_grad()
def joint_losses(model, groups: list[list[tuple[str, torch.Tensor]]], windows: torch.Tensor,
                 batch_windows: int = 4, reference: torch.Tensor | None = None) -> list[LayerLoss]:
    """The slow exact measure, one full forward over `windows` per group: every swap of the group
    applied at once (layer `name`'s weight replaced by `weight + delta`; `delta` may be a function
    giving it, called when the group runs, so that no more than one group's deltas are held), the
    model compared with the original, the weights restored. The original's distributions are
    computed once (or given: `reference_log_probs` of these windows)."""
    starts = range(0, windows.shape[0], batch_windows)
    batches = [windows[i:i + batch_windows] for i in starts]
    full = reference if reference is not None else reference_log_probs(model, windows, batch_windows)
    reference = [full[i:i + batch_windows] for i in starts]
    base_nll = -sum(float(r.gather(-1, ids[:, 1:, None]).sum()) for r, ids in zip(reference, batches))
    count = windows[:, 1:].numel()
    results = []
    for group in groups:
        weights = [model.get_submodule(name).weight for name, _delta in group]
        originals = [weight.detach().clone() for weight in weights]
        try:
            for weight, original, (_name, delta) in zip(weights, originals, group):
                weight.data.copy_(original + (delta() if callable(delta) else delta))
            kld = nll = 0.0
            for ref, ids in zip(reference, batches):
                log_probs = torch.log_softmax(_logits(model, ids)[:, :-1], dim=-1)
                nll -= float(log_probs.gather(-1, ids[:, 1:, None]).sum())
                kld += float((ref.exp() * (ref - log_probs)).sum())
                del log_probs
        finally:
            for weight, original in zip(weights, originals):
                weight.data.copy_(original)
        results.append(LayerLoss(kld=max(0.0, kld / count), nll_change=(nll - base_nll) / count))
    return results


def exact_losses(model, swaps: list[tuple[str, torch.Tensor]], windows: torch.Tensor,
                 together: bool = False) -> list[LayerLoss]:
    """`joint_losses` for each swap alone, or (`together`) for all of them at once (one result)."""
    return joint_losses(model, [swaps] if together else [[swap] for swap in swaps], windows)


def exact_loss(model, layer: torch.nn.Module, new_weight: torch.Tensor, windows: torch.Tensor) -> LayerLoss:
    """`exact_losses` for one layer given its new weight."""
    name = next(n for n, m in model.named_modules() if m is layer)
    return exact_losses(model, [(name, new_weight - layer.weight.detach())], windows)[0]

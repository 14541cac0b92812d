"""The probe's figures of an eager decode step: a layout the fused step does not compute (GPT-2;
Gemma 3 until its block joined the fused step) runs the Hugging Face forward once a step
(`lwdsl.runtime.generate.HFStep`), and what that costs
besides reading the weights (Python, dispatch, its norms, rotations, masks and cache appends) is
measured, not counted: a tiny model of the layout (hidden 64, int8 linears as `apply` stores them) is
decoded at two depths by the executor's own loop, so the difference is what a block costs and the rest
what a step costs around the blocks.

Counted ops priced at a tiny Llama's seconds per op said 5.8 ms for Gemma-3-270M's 18 blocks on a
Xeon VM; the tiny Gemma 3 measured 6.1-6.6 ms there. It stays short of the real model's step: there,
with its weights' reads priced at the fused step's measured rates, the blocks ran 13.5-14.8 ms a step
where 11 were priced (ops meeting caches the weights' stream evicted, measured only in part: a tiny
model behind a 67 MB head read cost 387-460 us a block against 349, one behind 134 MB 333-349)."""
from __future__ import annotations

import statistics
from typing import Any

DEPTHS = (2, 8)  # blocks of the two tiny models (8: a Gemma 3's sixth layer is a global one)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
            vocab_size=256, max_position_embeddings=4096)
PROMPT, GENERATE, RUNS = 64, 24, 5


def _tiny_model(torch, model_type: str, blocks: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    from lwdsl.apply.quantize import quantize_linears
    from lwdsl.solution import QuantFormat

    config = AutoConfig.for_model(model_type, num_hidden_layers=blocks, **TINY)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    quantize_linears(model, QuantFormat(dtype="int8"), skip=("lm_head",))  # the native row kernels' calls
    return model


def _step_s(torch, model) -> float:
    """The median decode step of the executor's loop (median of each run's median step)."""
    from lwdsl.runtime.generate import decode

    prompt = torch.randint(1, TINY["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        decode(model, prompt, 8, stop_at_eos=False)
        runs = [statistics.median(decode(model, prompt, GENERATE, stop_at_eos=False).token_s) for _ in range(RUNS)]
    return statistics.median(runs)


def eager_step(torch, model_type: str) -> dict[str, float] | None:
    """`{"block_s", "step_s"}` of `model_type`'s eager decode step on this CPU, or None where
    transformers cannot build the layout (then the cost model counts ops, `cost.terms.EAGER_OPS`)."""
    try:
        shallow, deep = (_step_s(torch, _tiny_model(torch, model_type, blocks)) for blocks in DEPTHS)
    except Exception:  # noqa: BLE001 - any layout transformers cannot build tiny is simply not measured
        return None
    block_s = max(0.0, (deep - shallow) / (DEPTHS[1] - DEPTHS[0]))
    return {"block_s": block_s, "step_s": max(0.0, shallow - DEPTHS[0] * block_s)}


def eager_figures(torch) -> dict[str, Any]:
    """The eager step of every layout lwdsl decodes eagerly (`generate.UNFUSED_LAYOUTS`), by model type."""
    from lwdsl.runtime.generate import UNFUSED_LAYOUTS

    found = {}
    for model_type in UNFUSED_LAYOUTS:
        figures = eager_step(torch, model_type)
        if figures is not None:
            found[model_type] = figures
    return found

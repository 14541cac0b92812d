"""The serving executor: what a model placed on a GPU decodes with (beside the CPU's fused step).

Chosen by `serves(model)`: a Llama-layout model (llama, mistral, qwen2) whose modules sit on one CUDA
device (a pipeline over several devices, or a model with offloaded blocks streaming in, decodes op
by op as before), or any Llama-layout model when
`LWDSL_EXECUTOR=serve` asks for it (the CPU runs the same code eagerly: the tests and
`bench/gpu_check.py --cpu-dry-run` do). `runner(model, batch, tokens, kv_format)` returns the model's
executor for that cache shape, built once and kept on the model, so repeated runs reuse the cache and
the captured decode graph.

    from lwdsl.runtime import serve
    if serve.serves(model):
        step = serve.runner(model, batch=1, tokens=4096 + 512, kv_format=QuantFormat(dtype="bf16"))
        logits = step.forward(prompt_ids, 0)
"""
from __future__ import annotations

import os

from lwdsl.runtime.serve.chunk import cache_tokens, prefill_chunk_tokens
from lwdsl.runtime.serve.executor import Serve, model_device
from lwdsl.solution import QuantFormat

SERVE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})

__all__ = ["Serve", "cache_tokens", "prefill_chunk_tokens", "runner", "serves"]


def serves(model) -> bool:
    """Whether the serving executor runs `model` (see the module text)."""
    if getattr(model.config, "model_type", "") not in SERVE_MODEL_TYPES or not hasattr(model, "model"):
        return False
    if "lwdsl_streamer" in model.__dict__:  # offloaded blocks stream per step: the lean loop runs them
        return False
    if os.environ.get("LWDSL_EXECUTOR") == "serve":
        return True
    placement = model.__dict__.get("lwdsl_placement")
    if placement is not None and placement.pipelined:
        return False
    return model_device(model).type == "cuda"


def runner(model, batch: int, tokens: int, kv_format: QuantFormat | None = None) -> Serve:
    """The model's executor for `batch` sequences of up to `tokens` positions (kept and reused while
    the batch, the KV format and the cache's rounded length stay the same)."""
    key = (batch, cache_tokens(tokens), kv_format)
    kept = model.__dict__.get("lwdsl_serve")
    if kept is not None and kept[0] == key:
        return kept[1]
    model.__dict__.pop("lwdsl_serve", None)  # the old cache and graph go before the new ones come
    built = Serve(model, batch, tokens, kv_format)
    model.__dict__["lwdsl_serve"] = (key, built)
    return built

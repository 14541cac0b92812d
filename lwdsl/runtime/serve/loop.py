"""A batch of sequences through the serving executor, greedy, timed per phase (what `lwdsl check`
measures at batch > 1 on a GPU; batch 1 goes through `lwdsl.runtime.generate.decode`).

    prefill_s, step_s, step = decode_batch(model, prompt_ids, generate=64, kv_format=None)
"""
from __future__ import annotations

import time

import torch

from lwdsl.solution import QuantFormat


def decode_batch(model, prompt_ids: torch.Tensor, generate: int,
                 kv_format: QuantFormat | None = None) -> tuple[float, list[float], str]:
    """(time to the first tokens, each later step's seconds, how steps ran) for prompts `[batch, n]`."""
    from lwdsl.runtime.serve import runner

    batch, length = prompt_ids.shape
    with torch.inference_mode():
        executor = runner(model, batch, length + generate, kv_format)
        started = time.perf_counter()
        tokens = executor.forward(prompt_ids, 0).argmax(-1, keepdim=True).cpu()  # .cpu() waits for the device
        prefill_s = time.perf_counter() - started
        steps = []
        for position in range(length, length + generate - 1):
            started = time.perf_counter()
            tokens = executor.forward(tokens, position).argmax(-1, keepdim=True).cpu()
            steps.append(time.perf_counter() - started)
    return prefill_s, steps, executor.step

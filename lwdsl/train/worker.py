"""One data-parallel rank: load the model, wrap it for its ZeRO stage, train, checkpoint.

Run by `lwdsl.train.launch` (spawned ranks with torchrun's environment) or directly under `torchrun`.
Peak memory is measured as `lwdsl check` measures it: the kernel's high-water mark of resident bytes
(`VmHWM`) above the rank's floor, the interpreter with torch imported, taken when the rank starts.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from lwdsl.train import checkpoint as ckpt
from lwdsl.train.data import batch, sample_ids
from lwdsl.train.records import RunConfig

_AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}


def _load_model(config: RunConfig):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(config.model_dir, dtype=torch.float32)
    model.config.use_cache = False
    if config.checkpoint_activations:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model.to(config.device)


def _autocast(config: RunConfig):
    import contextlib

    import torch

    if config.precision in _AUTOCAST:
        return torch.autocast(config.device, dtype=getattr(torch, _AUTOCAST[config.precision]))
    return contextlib.nullcontext()


def run_rank(rank: int, config: RunConfig, tokens: list[int], events=None) -> dict | None:
    """Train on this rank; rank 0 returns the run's figures (others None). `events`: a queue the
    launcher reads progress from (None under torchrun: rank 0 prints)."""
    import torch
    import torch.distributed as dist

    from lwdsl.train.zero import wrap
    from lwdsl.verify.memory import peak_resident_bytes, reset_peak, resident_bytes

    floor = resident_bytes()
    torch.set_num_threads(config.threads)
    if not dist.is_initialized():
        dist.init_process_group("gloo" if config.device == "cpu" else "nccl", rank=rank, world_size=config.ranks)
    if config.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    out_dir = Path(config.out_dir)
    engine = wrap(_load_model(config), config)
    start_step, losses = 0, []
    resume = ckpt.latest(out_dir)
    if resume is not None:
        model_sd, optim_sd, state = ckpt.load(resume)
        if engine.inner.config.tie_word_embeddings and "lm_head.weight" not in model_sd:
            model_sd["lm_head.weight"] = model_sd["model.embed_tokens.weight"]
        engine.load_full_state(model_sd, optim_sd)
        del model_sd, optim_sd
        start_step, losses = state["step"], list(state["losses"])
        rng = state["rng"]
        torch.set_rng_state(ckpt.decode_rng(rng[rank % len(rng)]))
    dist.barrier()
    reset_peak()
    durations, written, peak = [], None, 0
    for step in range(start_step, config.steps):
        began = time.perf_counter()
        total = torch.zeros(())
        for micro in range(config.accumulate):
            ids = sample_ids(step, micro, rank, config.ranks, config.accumulate, config.micro_batch)
            inputs = batch(tokens, config.sequence, ids).to(config.device)
            with engine.sync(micro == config.accumulate - 1):
                with _autocast(config):
                    loss = engine.model(input_ids=inputs, labels=inputs).loss / config.accumulate
                loss.backward()
            total += loss.detach().float().cpu()
        engine.optimizer.step()
        engine.optimizer.zero_grad(set_to_none=True)
        elapsed = torch.tensor([time.perf_counter() - began])
        dist.all_reduce(total)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        losses.append(float(total) / config.ranks)
        durations.append(float(elapsed))
        done = step + 1
        if rank == 0 and events is not None:
            events.put(("step", done, losses[-1], durations[-1]))
        if done % config.checkpoint_every == 0 or done == config.steps:
            # the checkpoint's gathered copy is not the training's memory: the peak is taken before it
            peak = max(peak, peak_resident_bytes())
            written = _checkpoint(engine, config, done, losses, rank) or written
            reset_peak()
    peaks = [None] * config.ranks
    dist.all_gather_object(peaks, max(0, peak - floor) if peak else 0)
    dist.barrier()
    if rank != 0:
        return None
    timed = durations[1:] or durations
    return {"losses": losses, "start_step": start_step, "step_s": statistics.median(timed) if timed else 0.0,
            "peaks": peaks, "checkpoint": str(written) if written else None}


def _checkpoint(engine, config: RunConfig, step: int, losses: list[float], rank: int):
    import torch
    import torch.distributed as dist

    model_sd, optim_sd = engine.full_state()
    rngs = [None] * config.ranks
    dist.all_gather_object(rngs, ckpt.encode_rng(torch.get_rng_state()))
    folder = None
    if rank == 0:
        state = {"losses": losses, "rng": rngs, "data_position": step * config.global_batch,
                 "fingerprint": config.fingerprint()}
        folder = ckpt.save(Path(config.out_dir), step, model_sd, optim_sd, state)
    del model_sd, optim_sd
    dist.barrier()
    return folder

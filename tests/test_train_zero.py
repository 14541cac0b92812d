"""The ZeRO mapping, checked by measuring what each of two gloo ranks holds: bytes of parameters
(at rest and gathered during the forward), of gradients after the backward, and of optimizer states
after a step, for every stage `lwdsl.train.zero` wraps."""
from __future__ import annotations

import os
import socket

import pytest


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def _rank(rank: int, port: int, results) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from lwdsl.train.records import RunConfig
    from lwdsl.train.zero import wrap

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for stage in range(4):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
        run = RunConfig(model_dir="-", ranks=2, zero_stage=stage, checkpoint_activations=False, accumulate=1,
                        micro_batch=1, sequence=16, precision="fp32", optimizer="adamw", steps=1, out_dir="-")
        engine = wrap(model, run)
        block = model.model.layers[0]
        seen = {}

        def gathered(module, args, output):  # what the block holds while it computes
            seen.setdefault("gathered", _local_bytes([p.data for p in module.parameters()]))

        hook = block.register_forward_hook(gathered)
        ids = torch.randint(0, 256, (1, 16))
        engine.model(input_ids=ids, labels=ids).loss.backward()
        hook.remove()
        grads = _local_bytes([p.grad for p in model.parameters()])
        engine.optimizer.step()
        inner_optimizer = getattr(engine.optimizer, "optim", engine.optimizer)
        states = _local_bytes([v for s in inner_optimizer.state.values() for k, v in s.items() if k != "step"])
        whole = sum(p.numel() for p in LlamaForCausalLM(config).parameters()) * 4
        block_whole = sum(p.numel() for p in LlamaForCausalLM(config).model.layers[0].parameters()) * 4
        if rank == 0:
            results[stage] = {"params": _local_bytes([p.data for p in model.parameters()]) / whole,
                              "gathered": seen["gathered"] / block_whole, "grads": grads / whole,
                              "states": states / (2 * whole)}
        dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_each_stage_shards_what_zero_says():
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(_rank, args=(port, results), nprocs=2, start_method="spawn")
    got = dict(results)
    approx = lambda x: pytest.approx(x, abs=0.02)  # noqa: E731 (uneven shards of odd sizes)
    # stage 0: everything whole on each rank
    assert got[0] == {"params": approx(1.0), "gathered": approx(1.0), "grads": approx(1.0), "states": approx(1.0)}
    # stage 1: optimizer states halved, parameters and gradients whole
    assert got[1]["params"] == approx(1.0) and got[1]["grads"] == approx(1.0) and got[1]["states"] == approx(0.5)
    # stage 2: gradients and states halved; the parameters at rest halved, gathered whole to compute
    assert got[2]["grads"] == approx(0.5) and got[2]["states"] == approx(0.5) and got[2]["gathered"] == approx(1.0)
    # stage 3: all three halved at rest, a block gathered only while it computes
    assert got[3]["params"] == approx(0.5) and got[3]["grads"] == approx(0.5) and got[3]["states"] == approx(0.5)

"""ZeRO stages as what torch really runs, one wrapper per stage (a registry, not an if-chain).

| stage | what is sharded over the data-parallel ranks | torch |
|---|---|---|
| 0 | nothing: parameters, gradients and optimizer states replicated | `DistributedDataParallel` |
| 1 | optimizer states | `DistributedDataParallel` + `ZeroRedundancyOptimizer` (FSDP2 cannot shard the states alone: its gradients are sharded whenever its states are) |
| 2 | gradients and optimizer states (parameters gathered whole for forward and backward) | FSDP2 `fully_shard(reshard_after_forward=False)` |
| 3 | parameters, gradients and optimizer states | FSDP2 `fully_shard(reshard_after_forward=True)`, one unit per decoder block plus the root |

Every engine exposes the same small surface: `model` (what runs the forward), `optimizer`, `sync(last)`
(gradient synchronisation only on an accumulation's last micro-step where the engine allows it),
`full_state()` (rank 0: the whole model and optimizer state, fully-qualified names) and
`load_full_state(model_sd, optim_sd)` on every rank. `tests/test_train_zero.py` checks the mapping
by measuring each rank's bytes of parameters, gradients and optimizer states.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Engine:
    model: Any
    inner: Any  # the Hugging Face model (names of parameters)
    optimizer: Any
    stage: int
    full_state: Callable[[], tuple[dict, dict]]
    load_full_state: Callable[[dict, dict], None]
    sync: Callable[[bool], Any]


def _optimizer_class(name: str):
    import torch

    return {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]


def _optimizer_kwargs(name: str, lr: float) -> dict:
    # fused: one pass over params, grads and states per step (what the cost model prices)
    return {"adamw": {"lr": lr, "fused": True, "weight_decay": 0.0},
            "sgd": {"lr": lr, "momentum": 0.9, "fused": True}}[name]


def _names(inner) -> list[str]:
    return [name for name, _ in inner.named_parameters()]


def _by_index_to_names(state: dict, names: list[str]) -> dict:
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def _names_to_by_index(state: dict, names: list[str]) -> dict:
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def _ddp(inner, config):
    import torch
    from torch.nn.parallel import DistributedDataParallel

    # gradients as views into the all-reduce buckets: one copy of the gradients, as ZeRO counts them
    return DistributedDataParallel(inner, device_ids=None if config.device == "cpu" else [torch.cuda.current_device()],
                                   gradient_as_bucket_view=True)


def _stage0(inner, config) -> Engine:
    model = _ddp(inner, config)
    optimizer = _optimizer_class(config.optimizer)(inner.parameters(), **_optimizer_kwargs(config.optimizer, config.lr))
    names = _names(inner)

    def full_state():
        return inner.state_dict(), _by_index_to_names(optimizer.state_dict(), names)

    def load(model_sd, optim_sd):
        inner.load_state_dict(model_sd)
        optimizer.load_state_dict(_names_to_by_index(optim_sd, names))

    return Engine(model, inner, optimizer, 0, full_state, load,
                  lambda last: contextlib.nullcontext() if last else model.no_sync())


def _stage1(inner, config) -> Engine:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = _ddp(inner, config)
    optimizer = ZeroRedundancyOptimizer(inner.parameters(), optimizer_class=_optimizer_class(config.optimizer),
                                        **_optimizer_kwargs(config.optimizer, config.lr))
    names = _names(inner)

    def full_state():
        optimizer.consolidate_state_dict(to=0)
        import torch.distributed as dist

        return inner.state_dict(), (_by_index_to_names(optimizer.state_dict(), names) if dist.get_rank() == 0 else {})

    def load(model_sd, optim_sd):
        inner.load_state_dict(model_sd)
        optimizer.load_state_dict(_names_to_by_index(optim_sd, names))

    return Engine(model, inner, optimizer, 1, full_state, load,
                  lambda last: contextlib.nullcontext() if last else model.no_sync())


def _fsdp(reshard_after_forward: bool, stage: int):
    def wrap(inner, config) -> Engine:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        mesh = init_device_mesh(config.device, (config.ranks,))
        extra = {"offload_policy": CPUOffloadPolicy()} if config.offload_optimizer and config.device != "cpu" else {}
        for block in inner.model.layers:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, **extra)
        fully_shard(inner, mesh=mesh, reshard_after_forward=reshard_after_forward, **extra)
        optimizer = _optimizer_class(config.optimizer)(inner.parameters(),
                                                       **_optimizer_kwargs(config.optimizer, config.lr))
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)

        def full_state():
            return get_model_state_dict(inner, options=full), get_optimizer_state_dict(inner, optimizer, options=full)

        def load(model_sd, optim_sd):
            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(inner, model_sd, options=options)
            set_optimizer_state_dict(inner, optimizer, optim_state_dict=optim_sd, options=options)

        # FSDP2 reduce-scatters every micro-step (gradients stay sharded: the stage's memory)
        return Engine(inner, inner, optimizer, stage, full_state, load, lambda last: contextlib.nullcontext())

    return wrap


WRAPPERS: dict[int, Callable] = {0: _stage0, 1: _stage1, 2: _fsdp(False, 2), 3: _fsdp(True, 3)}


def wrap(inner, config) -> Engine:
    """The engine for `config.zero_stage` around a Hugging Face causal LM (already on its device)."""
    return WRAPPERS[config.zero_stage](inner, config)

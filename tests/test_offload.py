"""Disk offload on the real SmolLM2: streamed blocks compute exactly what resident ones do, at most two
blocks are in memory at once, and the measured peak resident memory drops by the cost model's
predicted saving (±10%), each run in a fresh process of its own."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lwdsl.apply import DriverContext, apply_solution
from lwdsl.apply.offload import DIRECT_ALIGN, BufferPool, TensorFile, unit_tensors, units_by_block
from lwdsl.artifact import OFFLOAD_FILE, load, read_manifest, save_artifact
from lwdsl.cost import evaluate
from lwdsl.solution import LayerChoice, Solution

pytestmark = pytest.mark.model
ROOT = Path(__file__).resolve().parents[1]
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PLAN = """plan offload_test {{
  model "gguf:{gguf}"
  target {{ device cpu0 cpu {{ memory 8 GiB; bandwidth 20 GB/s; compute 100 GFLOPS }}
           device ssd disk {{ memory 256 GiB; bandwidth 2 GB/s }}
           link cpu0 <-> ssd 2 GB/s }}
  workload inference {{ batch 1; context 16; generate 4 }}
}}"""


def solution(device: str, blocks: int = 30) -> Solution:
    layers = [LayerChoice(name=f"model.layers.{b}.{n}", block=b, device=device, compute_device="cpu0")
              for b in range(blocks) for n in LINEARS]
    return Solution(plan_name="offload_test", plan_hash="0" * 64, status="OPTIMAL", layers=layers)


@pytest.fixture(scope="module")
def artifacts(smollm2_model, tmp_path_factory):
    model, tokenizer = smollm2_model
    root = tmp_path_factory.mktemp("offload")
    resident = save_artifact(model, tokenizer, root / "resident", solution=solution("cpu0"))
    streamed_model = apply_solution(copy.deepcopy(model), solution("ssd"), DriverContext(device_kinds={"ssd": "disk"}))
    streamed = save_artifact(streamed_model, tokenizer, root / "streamed", solution=solution("ssd"))
    del streamed_model
    return resident, streamed


@pytest.mark.parametrize("direct", [False, True])
def test_tensor_file_reads_what_safetensors_reads(artifacts, direct):
    from safetensors.torch import load_file

    _, streamed = artifacts
    file = TensorFile(streamed / OFFLOAD_FILE, direct=direct, pool=BufferPool())
    reference = load_file(str(streamed / OFFLOAD_FILE))
    for key in list(reference)[:20]:
        assert torch.equal(file.read(key), reference[key])
    assert len(file.keys()) == 30 * 7
    block = [f"model.layers.7.{name}" for name in LINEARS]
    tensors = unit_tensors(file, block)
    for name in block:
        assert torch.equal(tensors[name]["weight"], reference[f"{name}.weight"])
        assert tensors[name]["weight"].data_ptr() % 64 == 0  # aligned in the file: no copy was needed
    file.close()


def test_offload_file_keeps_each_block_together_and_aligned(artifacts):
    _, streamed = artifacts
    file = TensorFile(streamed / OFFLOAD_FILE)
    assert file.data_start % DIRECT_ALIGN == 0
    spans = sorted((*file.entries[key]["data_offsets"], int(key.split(".")[2])) for key in file.keys())
    assert [block for _, _, block in spans] == sorted(block for _, _, block in spans)  # one run per block
    assert all(start % 64 == 0 for start, _, _ in spans)
    file.close()


def test_buffer_pool_reuses_only_buffers_nothing_uses():
    pool = BufferPool(keep=2)
    first = pool.take(10000)
    address = first.data_ptr()
    view = first[100:200]
    del first
    assert pool.take(10000).data_ptr() != address  # a view of it is alive: not handed out again
    del view
    again = pool.take(8000)
    assert again.data_ptr() == address and again.data_ptr() % DIRECT_ALIGN == 0


def test_streamed_blocks_compute_the_same_and_prefetch(artifacts, smollm2_model):
    model, tokenizer = smollm2_model
    _, streamed = artifacts
    assert read_manifest(streamed).offloaded_bytes == 30 * 3538944 * 4
    loaded = load(streamed)
    streamer = loaded.lwdsl_streamer
    assert len(streamer.units) == 30 and units_by_block(["model.layers.3.mlp.up_proj"]) == [["model.layers.3.mlp.up_proj"]]
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # one pass read every block once, and the next pass's first block is already on its way
    assert streamer.loads == 31 and streamer.current == 29 and streamer.pending[0] == 0


PEAK = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from lwdsl.artifact import load, load_tokenizer
    from lwdsl.runtime.generate import decode
    model = load(sys.argv[1])
    ids = load_tokenizer(sys.argv[1])("The capital of France is a city that", return_tensors="pt").input_ids
    tokens = decode(model, ids, max_new_tokens=4).token_ids
    # VmHWM: this process image's own high-water mark (ru_maxrss would carry the parent's across exec)
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"peak": int(hwm.split()[1]) * 1024, "tokens": tokens}))
""")


def _peaks(*folders: Path) -> list[dict]:
    """Each folder's run in a fresh process of its own (started together: peaks are per process)."""
    runs = [subprocess.Popen([sys.executable, "-c", PEAK, str(folder)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}) for folder in folders]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_disk_offload_lowers_peak_memory_by_the_predicted_amount(artifacts, smollm2_gguf):
    from lwdsl.hardware.resolve import resolve_target
    from lwdsl.inventory import load_inventory
    from lwdsl.parse import parse_text

    plan = parse_text(PLAN.format(gguf=smollm2_gguf))
    target, inventory = resolve_target(plan.target, run_probe=False), load_inventory(plan.model, ROOT)
    before = evaluate(inventory, target, plan.workload, solution("cpu0").layers).memory.by_device["cpu0"]
    after = evaluate(inventory, target, plan.workload, solution("ssd").layers).memory.by_device["cpu0"]
    predicted = before.total_bytes - after.total_bytes
    resident, streamed = artifacts
    measured_resident, measured_streamed = _peaks(resident, streamed)
    assert measured_resident["tokens"] == measured_streamed["tokens"]
    saving = measured_resident["peak"] - measured_streamed["peak"]
    # The prediction counts every offloaded byte as gone; streaming holds at most two blocks (the
    # current one and the prefetched next, 2 x 14.2 MB of 425 MB here), so the measured saving may sit
    # up to ~7% below it (measured here: 416.1 MB saved of 424.7 MB predicted, -2%).
    assert abs(saving - predicted) <= 0.10 * predicted, (saving, predicted)


def test_streamer_re_points_kept_modules_without_touching_the_callers_tensors():
    """A module whose state is exactly the tensors it was built from is built once and re-pointed at
    each read; tensors handed in again (a host store hands the same ones every time) stay intact."""
    from torch import nn

    from lwdsl.apply.offload import Streamer

    class Holder(nn.Module):
        def __init__(self, tensors):
            super().__init__()
            self.register_buffer("w", tensors["w"])

        def forward(self, x):
            return x + self.w.sum()

    store = {"a": {"w": torch.ones(4)}, "b": {"w": torch.full((4,), 2.0)}}
    builds = []

    def build(name, tensors):
        builds.append(name)
        return Holder(tensors)

    streamer = Streamer([["a"], ["b"]], lambda names: {n: store[n] for n in names}, build)
    for _ in range(3):
        assert streamer.acquire(0)["a"](torch.zeros(1)).item() == 4.0
        assert streamer.acquire(1)["b"](torch.zeros(1)).item() == 8.0
    assert builds == ["a", "b"]  # built once each, re-pointed after
    assert torch.equal(store["a"]["w"], torch.ones(4)) and torch.equal(store["b"]["w"], torch.full((4,), 2.0))
    streamer.release()
    assert streamer.rebound["a"][1]["w"].numel() == 0  # released: holds no storage

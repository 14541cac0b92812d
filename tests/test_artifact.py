"""The artifact on the real SmolLM2: bytes equal the cost model's, load gives back the same model,
generation stays coherent, bad input fails loudly, and a killed write leaves nothing behind."""
from __future__ import annotations

import copy
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lwdsl.apply import DriverContext, apply_solution, role_of
from lwdsl.artifact import MANIFEST_FILE, WEIGHTS_FILE, load, read_manifest, save_artifact
from lwdsl.cost import evaluate
from lwdsl.cost.formats import weight_bytes
from lwdsl.errors import LwdslError
from lwdsl.solution import LayerChoice, PruneChoice, QuantFormat, Solution

pytestmark = pytest.mark.model
ROOT = Path(__file__).resolve().parents[1]
PLAN = """plan artifact_test {{
  model "gguf:{gguf}"
  target {{ device cpu0 cpu {{ memory 8 GiB; bandwidth 20 GB/s; compute 100 GFLOPS }}
           device ssd disk {{ memory 256 GiB; bandwidth 2 GB/s }}
           link cpu0 <-> ssd 2 GB/s }}
  workload inference {{ batch 1; context 16; generate 8 }}
}}"""

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def choice(name, fmt=QuantFormat(), prune=PruneChoice(), device="cpu0"):
    return LayerChoice(name=name, block=int(name.split(".")[2]), format=fmt, prune=prune, device=device,
                       compute_device="cpu0")


def mixed_solution() -> Solution:
    """One block per technique, the rest as loaded: int8 attention, channel-pruned int8 MLP, pruned
    heads, a 2:4 down projection, an unstructured mask, an int4 g32 asymmetric gate."""
    int8, heads = QuantFormat(dtype="int8"), PruneChoice(kind="heads", fraction=1 / 3)
    layers = [choice(f"model.layers.0.self_attn.{n}", int8) for n in ATTN]
    layers += [choice(f"model.layers.1.mlp.{n}", int8, PruneChoice(kind="channels", fraction=0.25)) for n in MLP]
    layers += [choice(f"model.layers.2.self_attn.{n}", prune=heads) for n in ATTN]
    layers += [choice("model.layers.3.mlp.down_proj", prune=PruneChoice(kind="2:4", fraction=0.5)),
               choice("model.layers.4.mlp.up_proj", prune=PruneChoice(kind="unstructured", fraction=0.5)),
               choice("model.layers.5.mlp.gate_proj", QuantFormat(dtype="int4", group=32, symmetric=False))]
    return Solution(plan_name="artifact_test", plan_hash="0" * 64, status="OPTIMAL", layers=layers)


@pytest.fixture(scope="module")
def plan_parts(smollm2_gguf):
    from lwdsl.hardware.resolve import resolve_target
    from lwdsl.inventory import load_inventory
    from lwdsl.parse import parse_text

    plan = parse_text(PLAN.format(gguf=smollm2_gguf))
    return plan, resolve_target(plan.target, run_probe=False), load_inventory(plan.model, ROOT)


@pytest.fixture(scope="module")
def applied(smollm2_model, tmp_path_factory):
    model, tokenizer = smollm2_model
    solution = mixed_solution()
    ids = tokenizer("The capital of France is Paris. Water boils at one hundred degrees.", return_tensors="pt").input_ids
    result = apply_solution(copy.deepcopy(model), solution, DriverContext(calibration_ids=ids))
    folder = save_artifact(result, tokenizer, tmp_path_factory.mktemp("art") / "mixed", solution=solution,
                           plan_hash=solution.plan_hash, source_model="gguf:SmolLM2")
    return result, folder, solution


def test_every_layer_is_recorded_as_what_it_became(applied):
    model, folder, solution = applied
    manifest = read_manifest(folder)
    assert set(manifest.layers) == {c.name for c in solution.layers}
    assert manifest.layers["model.layers.1.mlp.gate_proj"].shape == (1152, 576)
    assert manifest.layers["model.layers.2.self_attn.k_proj"].shape == (128, 576)
    assert manifest.layers["model.layers.3.mlp.down_proj"].kind == "sparse24"
    assert "no bytes saved" in manifest.layers["model.layers.4.mlp.up_proj"].note
    assert manifest.layers["model.layers.5.mlp.gate_proj"].format.symmetric is False
    assert manifest.versions["torch"] == torch.__version__ and manifest.solution == solution


def test_bytes_equal_the_cost_model(applied, plan_parts):
    from safetensors.torch import load_file

    model, folder, solution = applied
    plan, target, inventory = plan_parts
    manifest = read_manifest(folder)
    stored = {key: t.numel() * t.element_size() for key, t in load_file(str(folder / WEIGHTS_FILE)).items()}
    for name, record in manifest.layers.items():
        c = next(c for c in solution.layers if c.name == name)
        expected = weight_bytes(record.original_shape, c.format, c.prune, role_of(name), 64)
        in_file = sum(n for k, n in stored.items() if k.startswith(name + ".") and not k.endswith(".bias"))
        assert record.stored_bytes == expected == in_file, name
    predicted = evaluate(inventory, target, plan.workload, solution.layers)
    assert manifest.resident_bytes == sum(stored.values()) == predicted.memory.by_device["cpu0"].weights_bytes


def test_load_rebuilds_the_same_model_and_it_generates(applied, smollm2_model):
    model, folder, _ = applied
    _, tokenizer = smollm2_model
    loaded = load(folder)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        text = tokenizer.decode(loaded.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:])
    assert "Paris" in text


def test_a_layer_that_cannot_be_transformed_fails_loudly(smollm2_model):
    model, _ = smollm2_model
    block = copy.deepcopy(model.model.layers[0])
    wrapper = torch.nn.Module()
    wrapper.config = model.config
    wrapper.model = torch.nn.Module()
    wrapper.model.layers = torch.nn.ModuleList([block])
    for name, fmt in (("model.layers.0.self_attn.q_proj", QuantFormat(dtype="int4", group=128)),
                      ("model.layers.0.self_attn.nowhere", QuantFormat(dtype="int8"))):
        bad = Solution(plan_name="x", plan_hash="x", status="OPTIMAL", layers=[choice(name, fmt)])
        with pytest.raises(LwdslError) as caught:
            apply_solution(wrapper, bad)
        assert caught.value.diagnostics[0].code in ("E603", "E620")
    wrapper.model.embed_tokens = copy.deepcopy(model.model.embed_tokens)
    offloaded = LayerChoice(name="model.embed_tokens", device="ssd", compute_device="cpu0")
    with pytest.raises(LwdslError) as caught:
        apply_solution(wrapper, Solution(plan_name="x", plan_hash="x", status="OPTIMAL", layers=[offloaded]),
                       DriverContext(device_kinds={"ssd": "disk"}))
    assert caught.value.diagnostics[0].code == "E631"


def test_bad_folders_are_refused(tmp_path, smollm2_model):
    with pytest.raises(LwdslError) as caught:
        load(tmp_path)
    assert caught.value.diagnostics[0].code == "E641"
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(LwdslError) as caught:
        save_artifact(smollm2_model[0], None, precious)
    assert caught.value.diagnostics[0].code == "E640" and (precious / "notes.txt").read_text() == "mine"


KILLED_WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from lwdsl import ast
    from lwdsl.artifact import save_artifact
    from lwdsl.models.load import load_model
    gguf = Path(sys.argv[1])
    model, tokenizer = load_model(ast.ModelBlock(source=f"gguf:{gguf}", scheme="gguf", location=str(gguf)), gguf.parent)
    save_artifact(model, tokenizer, sys.argv[2])
""")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_write_killed_midway_leaves_no_artifact_and_the_source_untouched(tmp_path, smollm2_gguf, applied):
    from lwdsl.models.load import cache_key, cache_root

    cache = cache_root() / cache_key(smollm2_gguf)
    before = (_digest(smollm2_gguf), {p.name: p.stat().st_mtime_ns for p in cache.iterdir()})
    target = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(smollm2_gguf), str(target)], env=env)
    deadline, killed = time.monotonic() + 120, False
    while time.monotonic() < deadline and writer.poll() is None:
        partial = [p for p in tmp_path.glob(".killed.partial-*") if (p / WEIGHTS_FILE).exists()
                   and (p / WEIGHTS_FILE).stat().st_size > 0]
        if partial:
            writer.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.005)
    writer.wait()
    assert killed, "the writer finished before it could be killed"
    assert not target.exists()
    assert (_digest(smollm2_gguf), {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}) == before
    # the next write into the same place clears the dead writer's temporary folder
    model, folder, solution = applied
    save_artifact(model, None, target, solution=solution)
    assert (target / MANIFEST_FILE).is_file() and not list(tmp_path.glob(".killed.partial-*"))

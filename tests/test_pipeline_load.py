"""Pipeline placement, solved to loaded, on the real SmolLM2: a two-card plan is solved and applied,
the manifest records each stage's torch device, and `load` places the blocks as the solver chose —
or says which device this machine lacks (E647, exit 2 from the CLI), or puts everything on the
device the caller names. This machine has no GPU: the placement itself runs over `cpu` and `cpu:0`
(two devices to the placement, one memory to torch), so the real hooks run and the output is checked."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lwdsl.artifact import MANIFEST_FILE, load, read_manifest
from lwdsl.cli import main
from lwdsl.errors import LwdslError
from lwdsl.placement import torch_devices

pytestmark = pytest.mark.model
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"

# The shipped two-card plan (a host CPU first, two cards too small for the model alone): the fastest
# plan pipelines the blocks over both cards, which are cuda:0 and cuda:1 whatever their names.
PLAN = ROOT / "plans" / "smollm2_two_gpus.lwp"


@pytest.fixture(scope="module")
def applied(smollm2_gguf, tmp_path_factory):
    """(plan path, solution, artifact folder): the two-card plan solved, then applied."""
    from lwdsl.apply.pipeline import apply_plan
    from lwdsl.plans import load_plan
    from lwdsl.solve.search import solve_plan

    folder = tmp_path_factory.mktemp("pipeline")
    solution = solve_plan(load_plan(PLAN)).solution
    return PLAN, solution, apply_plan(PLAN, folder / "artifact", solution)


@pytest.fixture(scope="module")
def original(smollm2_model):
    """The source model's logits for PROMPT and its greedy tokens."""
    from lwdsl.runtime.generate import decode

    model, tokenizer = smollm2_model
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0]
    return ids, logits, decode(model, ids, max_new_tokens=6).token_ids


def variant(folder, tmp_path, **changes):
    """The artifact with its manifest changed (weights linked, not copied)."""
    copy = tmp_path / "variant"
    copy.mkdir()
    for item in folder.iterdir():
        if item.name != MANIFEST_FILE:
            (copy / item.name).symlink_to(item)
    manifest = read_manifest(folder).model_copy(update=changes)
    (copy / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
    return copy


def _hooked(model) -> bool:
    return any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_plan_devices_map_to_torch_devices_in_declaration_order():
    kinds = {"host": "cpu", "left": "gpu", "ssd": "disk", "right": "gpu", "spare": "cpu"}
    assert torch_devices(kinds) == {"host": "cpu", "left": "cuda:0", "right": "cuda:1", "spare": "cpu"}


def test_the_gate_reads_peaks_by_the_same_mapping(smollm2_gguf):
    from lwdsl.parse import parse_text
    from lwdsl.verify.gate import _memory_by_device

    plan = parse_text(PLAN.read_text())
    peaks = {"cpu": 5, "cuda:0": 7, "cuda:1": 9}
    assert _memory_by_device(plan, None, peaks, None) == {"host": 5, "left": 7, "right": 9}


def test_manifest_records_the_stages_the_solver_chose(applied):
    _, solution, folder = applied
    manifest = read_manifest(folder)
    stages = solution.pipeline_stages
    assert len(set(stages)) == 2 and len(stages) == 30  # the plan is only useful if both cards are used
    embedding = next(c for c in solution.layers if c.name == "model.embed_tokens")
    assert manifest.pipeline_stages == stages and manifest.pipeline_io == embedding.compute_device
    expected = {"left": "cuda:0", "right": "cuda:1"}
    assert manifest.stage_devices == {name: expected[name] for name in {*stages, embedding.compute_device}}


def test_loading_without_the_cards_fails_clearly(applied, capsys):
    _, _, folder = applied
    code = main(["run", str(folder), "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "E647" in err and "cuda:0 (plan device left)" in err and "Traceback" not in err
    assert "load it on a machine with those devices" in err


def test_the_missing_stage_device_is_named(applied, tmp_path):
    _, _, folder = applied
    manifest = read_manifest(folder)
    devices = {name: "cpu" if torch_device == "cuda:0" else "cuda:1"
               for name, torch_device in manifest.stage_devices.items()}
    with pytest.raises(LwdslError) as error:
        load(variant(folder, tmp_path, stage_devices=devices))
    diagnostic = error.value.diagnostics[0]
    assert diagnostic.code == "E647" and "cuda:1 (plan device right)" in diagnostic.message
    assert "cuda:0" not in diagnostic.message
    assert "solve and apply the plan again" in diagnostic.hint


def test_run_on_a_chosen_device(applied, capsys):
    """`lwdsl run --device cpu` runs the two-card artifact here; a device this machine lacks, or no
    device at all, is a positioned E649 with exit 2."""
    _, _, folder = applied
    assert main(["run", str(folder), "--prompt", "The capital of France is", "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip()
    for device in ("cuda:3", "warp-drive"):
        code = main(["run", str(folder), "--prompt", "x", "--device", device])
        err = capsys.readouterr().err
        assert code == 2 and "E649" in err and device in err and "Traceback" not in err


def test_device_override_puts_everything_there(applied, original):
    _, _, folder = applied
    ids, logits, _ = original
    model = load(folder, device="cpu")
    assert model.lwdsl_placement.note.startswith("overridden by device=cpu (the manifest places cuda:0 block")
    assert all(p.device.type == "cpu" for p in model.parameters()) and not _hooked(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits[0], logits)


def test_recorded_stages_place_the_blocks(applied, original, tmp_path):
    """The manifest's two cards stood in for by `cpu` and `cpu:0`: placed by block as solved, the hooks
    keep the logits and the greedy tokens, and the lean loop says why it is not fused."""
    from lwdsl.runtime.generate import decode

    _, solution, folder = applied
    ids, logits, tokens = original
    manifest = read_manifest(folder)
    stand_in = {"cuda:0": "cpu", "cuda:1": "cpu:0"}
    model = load(variant(folder, tmp_path, stage_devices={n: stand_in[d] for n, d in manifest.stage_devices.items()}))
    placement = model.lwdsl_placement
    assert list(placement.blocks) == [stand_in[manifest.stage_devices[s]] for s in solution.pipeline_stages]
    assert placement.io == stand_in[manifest.stage_devices[manifest.pipeline_io]] and placement.pipelined
    with torch.no_grad():
        assert torch.equal(model(ids).logits[0], logits)
    run = decode(model, ids, max_new_tokens=6)
    assert run.token_ids == tokens and run.step.startswith(f"eager: pipelined over {', '.join(placement.devices)}")


def test_one_torch_device_means_no_hooks(applied, original, tmp_path):
    """Two plan devices that are both the host: nothing to place, nothing hooked, as before."""
    _, _, folder = applied
    ids, logits, _ = original
    manifest = read_manifest(folder)
    model = load(variant(folder, tmp_path, stage_devices=dict.fromkeys(manifest.stage_devices, "cpu")))
    assert not _hooked(model) and "lwdsl_placement" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(ids).logits[0], logits)

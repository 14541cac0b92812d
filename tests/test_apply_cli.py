"""`lwdsl apply` and `lwdsl run` as a user runs them, on the real SmolLM2; bad input exits 2 with a
message and writes nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lwdsl.cli import main
from lwdsl.solution import LayerChoice, PruneChoice, QuantFormat, Solution

PLAN = """plan cli_test {{
  model "gguf:{gguf}"
  target {{ device cpu0 cpu {{ memory 8 GiB; bandwidth 20 GB/s; compute 100 GFLOPS }}
           device ssd disk {{ memory 256 GiB; bandwidth 2 GB/s }}
           link cpu0 <-> ssd 2 GB/s }}
  workload inference {{ batch 1; context 16; generate 8 }}
  allow {{ quantize weights int8; prune channels up to 25%; offload ssd }}
}}
"""


def _solution(status: str = "OPTIMAL") -> Solution:
    layers = [LayerChoice(name=f"model.layers.0.self_attn.{n}", block=0, format=QuantFormat(dtype="int8"),
                          device="cpu0", compute_device="cpu0") for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    layers += [LayerChoice(name=f"model.layers.1.mlp.{n}", block=1, prune=PruneChoice(kind="channels", fraction=0.25),
                           device="cpu0", compute_device="cpu0") for n in ("gate_proj", "up_proj", "down_proj")]
    layers += [LayerChoice(name=f"model.layers.29.mlp.{n}", block=29, device="ssd", compute_device="cpu0")
               for n in ("gate_proj", "up_proj", "down_proj")]
    return Solution(plan_name="cli_test", plan_hash="0" * 64, status=status, layers=layers)


@pytest.fixture()
def plan(tmp_path, smollm2_gguf) -> Path:
    path = tmp_path / "cli_test.lwp"
    path.write_text(PLAN.format(gguf=smollm2_gguf))
    return path


@pytest.mark.model
def test_apply_then_run_from_the_command_line(plan, tmp_path, capsys):
    solution_file = tmp_path / "solution.json"
    solution_file.write_text(_solution().model_dump_json())
    out = tmp_path / "artifact"
    code = main(["apply", str(plan), "-o", str(out), "--solution", str(solution_file)])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert "MiB offloaded to disk" in err and "channels" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layers"]["model.layers.1.mlp.down_proj"]["shape"] == [576, 1152]
    assert manifest["offloaded_bytes"] == 3 * 1536 * 576 * 4 and manifest["source_hash"]
    code = main(["run", str(out), "--prompt", "The capital of France is", "--max-new-tokens", "6"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "Paris" in captured.out


def _bad(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def test_bad_input_exits_2_and_writes_nothing(plan, tmp_path, capsys):
    out = tmp_path / "never"
    code, err = _bad(capsys, "apply", str(tmp_path / "missing.lwp"), "-o", str(out))
    assert code == 2 and "E110" in err
    (tmp_path / "broken.json").write_text("{not json")
    code, err = _bad(capsys, "apply", str(plan), "-o", str(out), "--solution", str(tmp_path / "broken.json"))
    assert code == 2 and "E644" in err
    (tmp_path / "wrong.json").write_text(json.dumps({"layers": "none"}))
    code, err = _bad(capsys, "apply", str(plan), "-o", str(out), "--solution", str(tmp_path / "wrong.json"))
    assert code == 2 and "E644" in err and "Traceback" not in err
    code, err = _bad(capsys, "run", str(tmp_path), "--prompt", "hi")
    assert code == 2 and "E641" in err
    assert not out.exists()


def test_an_infeasible_solution_is_not_applied(plan, tmp_path, capsys):
    solution_file = tmp_path / "infeasible.json"
    solution_file.write_text(_solution("INFEASIBLE").model_dump_json())
    code, err = _bad(capsys, "apply", str(plan), "-o", str(tmp_path / "out"), "--solution", str(solution_file))
    assert code == 1 and "E645" in err and not (tmp_path / "out").exists()

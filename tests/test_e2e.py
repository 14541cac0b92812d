"""End to end on the real SmolLM2: plan -> solve -> apply -> check, through the CLI, exit codes and
the JUnit file included. Small workload and evaluation text so the whole file stays near a minute."""
from __future__ import annotations

import json
from xml.etree import ElementTree

import pytest

from lwdsl.cli import main

PLAN = """plan {name} {{
  model "gguf:{gguf}" {{
    eval "text:python-docs" tokens 256
  }}
  target {{ device cpu0 cpu {{ memory 8 GiB; bandwidth 20 GB/s; compute 100 GFLOPS }} }}
  workload inference {{ batch 1; context 32; generate 8 }}
  require {{
    memory cpu0 <= 2 GiB
    {latency}
    quality perplexity <= +50%
  }}
  allow {{
    quantize weights int8
    keep lm_head, "model.embed_tokens"
  }}
  minimize memory
}}
"""
FAST = ["--repeats", "2", "--generate", "8", "--no-baseline-speed"]


@pytest.fixture(scope="module")
def plans(tmp_path_factory, smollm2_gguf):
    folder = tmp_path_factory.mktemp("e2e")
    meetable = folder / "meetable.lwp"
    meetable.write_text(PLAN.format(name="meetable", gguf=smollm2_gguf, latency="latency token <= 2 s"))
    unmeetable = folder / "unmeetable.lwp"
    unmeetable.write_text(PLAN.format(name="unmeetable", gguf=smollm2_gguf, latency="latency token <= 1 us"))
    return folder, meetable, unmeetable


@pytest.mark.model
def test_meetable_plan_passes_and_unmeetable_fails_naming_its_line(plans, capsys):
    from lwdsl.plans import load_plan
    from lwdsl.solution import Solution
    from lwdsl.verify.gate import apply_into

    folder, meetable, unmeetable = plans
    solution_file = folder / "solution.json"
    assert main(["solve", str(meetable), "--out", str(solution_file)]) == 0
    solution = Solution.model_validate_json(solution_file.read_text())
    artifact = apply_into(load_plan(meetable), solution, folder / "artifact")
    capsys.readouterr()

    junit = folder / "pass.xml"
    assert main(["check", str(meetable), "--artifact", str(artifact), "--json", "--junit", str(junit)] + FAST) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is True
    assert [r["line"] for r in report["requirements"]] == [8, 9, 10]
    quality = report["requirements"][2]
    assert abs(quality["measured"]) < 0.5 and quality["predicted"] is not None
    memory = report["requirements"][0]
    assert 0 < memory["measured"] < 2 * 2**30  # the artifact alone: int8 weights, not the checker
    assert report["baseline"]["perplexity"] > 1 and report["measured"]["kld"] >= 0
    assert ElementTree.parse(junit).getroot().get("failures") == "0"

    junit = folder / "fail.xml"
    assert main(["check", str(unmeetable), "--artifact", str(artifact), "--junit", str(junit)] + FAST) == 1
    suite = ElementTree.parse(junit).getroot()
    failing = [c for c in suite.iter("testcase") if c.find("failure") is not None]
    assert [c.get("line") for c in failing] == ["9"]
    assert failing[0].get("name").endswith(":9 latency token <= 1 us")
    assert "FAILED" in capsys.readouterr().out


def test_bad_input_exits_2_without_traceback(tmp_path, capsys):
    assert main(["check", str(tmp_path / "missing.lwp")]) == 2
    plan = tmp_path / "p.lwp"
    plan.write_text('plan p { model "arch:smollm2-135m"\n target { device c cpu "local" } }\n')
    assert main(["check", str(plan), "--artifact", str(tmp_path / "nowhere")]) == 2
    assert main(["check", str(plan), "--repeats", "0"]) == 2
    assert "Traceback" not in capsys.readouterr().err


OFFLOAD_PLAN = """plan offload_e2e {{
  model "gguf:{gguf}" {{ eval "text:python-docs" tokens 256 }}
  target {{
    device cpu0 cpu {{ memory 8 GiB; bandwidth 20 GB/s; compute 100 GFLOPS }}
    device ssd disk "local"
    link cpu0 <-> ssd 8 GB/s
  }}
  workload inference {{ batch 1; context 32; generate 8 }}
  require {{ memory cpu0 <= 300 MiB }}
  allow {{
    quantize weights int8
    offload ssd
    keep lm_head, "model.embed_tokens"
  }}
  minimize memory
}}
"""


@pytest.mark.model
def test_disk_offload_plan_streams_from_the_measured_disk_and_passes(tmp_path, monkeypatch, capsys, smollm2_gguf):
    """The local disk is probed (under $LWDSL_CACHE), the solver streams every block from it, and
    `check` measures the artifact with its blocks read past the page cache: the requirement holds, the
    disk holds the offload file, and the report gives the rate the reads ran at."""
    from lwdsl.hardware import disk

    monkeypatch.setenv("LWDSL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(disk, "FILE_BYTES", 32 << 20)
    plan = tmp_path / "offload.lwp"
    plan.write_text(OFFLOAD_PLAN.format(gguf=smollm2_gguf))
    assert main(["check", str(plan), "--json"] + FAST) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is True
    assert report["measured"]["memory_bytes"]["ssd"] > 100 * 2**20  # the 30 blocks' int8 weights
    assert report["measured"]["stream_read_Bps"] > 1e7
    assert any(note.startswith("offloaded blocks were read at") for note in report["notes"])
    # resident: the runtime (~150 MiB, not in a written cpu's figures), the fp32 embedding, two blocks
    assert report["measured"]["memory_bytes"]["cpu0"] < 300 * 2**20

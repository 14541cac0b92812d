"""A one-GPU plan, solved and applied here: its artifact records the card (cuda:0), so `lwdsl run` and
`lwdsl.load` put it there and decode with the serving executor. This machine has no CUDA device: the
load says so before reading anything (E647, exit 2 from the CLI), and `--device cpu` still runs it."""
from __future__ import annotations

from pathlib import Path

import pytest

from lwdsl.artifact import load, read_manifest
from lwdsl.cli import main
from lwdsl.errors import LwdslError

pytestmark = pytest.mark.model
ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "plans" / "smollm2_gpu.lwp"


@pytest.fixture(scope="module")
def artifact(smollm2_gguf, tmp_path_factory):
    from lwdsl.apply.pipeline import apply_plan
    from lwdsl.plans import load_plan
    from lwdsl.solve.search import solve_plan

    solution = solve_plan(load_plan(PLAN)).solution
    return apply_plan(PLAN, tmp_path_factory.mktemp("gpu") / "artifact", solution)


def test_the_manifest_names_the_card(artifact):
    manifest = read_manifest(artifact)
    assert set(manifest.pipeline_stages) == {"gpu0"} and manifest.stage_devices == {"gpu0": "cuda:0"}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has the card")
def test_without_the_card_load_and_run_say_so(artifact, capsys):
    with pytest.raises(LwdslError) as error:
        load(artifact)
    diagnostic = error.value.diagnostics[0]
    assert diagnostic.code == "E647" and "computes on cuda:0 (plan device gpu0)" in diagnostic.message
    code = main(["run", str(artifact), "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "E647" in err and "Traceback" not in err
    assert main(["run", str(artifact), "--prompt", "The capital of France is", "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip()
    code = main(["check", str(PLAN), "--artifact", str(artifact), "--repeats", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "E647" in err and "Traceback" not in err

"""The language commands: validate, fmt (see test_fmt), parse, schema; exit codes 0 / 2; JSON outputs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lwdsl import ast
from lwdsl.cli import main

ROOT = Path(__file__).resolve().parents[1]
GOOD = ROOT / "plans" / "laptop_8b.lwp"
BAD = ROOT / "tests" / "golden" / "invalid" / "many_at_once.lwp"


def test_validate_ok_and_errors(capsys):
    assert main(["validate", str(GOOD)]) == 0
    assert capsys.readouterr().out.strip() == f"{GOOD}: ok"
    assert main(["validate", str(GOOD), str(BAD)]) == 2
    err = capsys.readouterr().err
    assert err.count("error E") == 4 and "4 errors in 1 file" in err
    assert "expected a size such as `8 GiB` for `memory` of device `c`, found `8 ms`" in err
    assert "    |" in err and "^" in err


def test_validate_json(capsys):
    assert main(["validate", "--json", str(GOOD), str(BAD), str(ROOT / "nothing.lwp")]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is False
    assert [f["valid"] for f in report["files"]] == [True, False, False]
    assert [d["code"] for d in report["files"][1]["diagnostics"]] == ["E220", "E210", "E220", "E210"]
    assert report["files"][2]["diagnostics"][0]["code"] == "E110"
    assert report["files"][1]["diagnostics"][0]["span"]["line"] == 4


def test_parse_json_is_the_ast(capsys):
    assert main(["parse", str(GOOD), "--json"]) == 0
    plan = ast.Plan.model_validate_json(capsys.readouterr().out)
    assert plan.name == "laptop_8b" and plan.model.location == "llama-3.1-8b"
    assert main(["parse", str(GOOD), "--no-spans"]) == 0
    assert '"span"' not in capsys.readouterr().out


def test_parse_syntax_error_exit_2(tmp_path, capsys):
    path = tmp_path / "x.lwp"
    path.write_text("plan p { model }")
    assert main(["parse", str(path)]) == 2
    assert "E102" in capsys.readouterr().err


def test_schema_is_the_json_schema_of_plan(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema == ast.Plan.model_json_schema()
    assert {"model", "target"} <= set(schema["required"])


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "lwdsl", "validate", str(BAD)], capture_output=True, text=True,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "E220" in done.stderr

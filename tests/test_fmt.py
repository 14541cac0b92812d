"""fmt: canonical layout, comments kept, idempotent, same AST (spans aside) after re-parsing."""
from __future__ import annotations

from pathlib import Path

import pytest

from lwdsl.cli import main
from lwdsl.fmt import format_text
from lwdsl.parse import parse_text

ROOT = Path(__file__).resolve().parents[1]
PLANS = sorted((ROOT / "plans").glob("*.lwp"))


def without_spans(value):
    if isinstance(value, dict):
        return {k: without_spans(v) for k, v in value.items() if k not in ("span", "comments")}
    if isinstance(value, (list, tuple)):
        return [without_spans(v) for v in value]
    return value


def same_meaning(a: str, b: str) -> bool:
    return without_spans(parse_text(a).model_dump()) == without_spans(parse_text(b).model_dump())


MESSY = """# top comment
plan p { # header
  # before model
  model "arch:gpt2" { eval "text:python-docs" tokens 100; calibrate "text:a.txt" }
  target t { device c cpu { memory 8GiB; bandwidth 20 GB/s # bw
      compute 1 TFLOPS } # after device
    # before link
    link c <-> d 10 GB/s latency 5 us
    device d disk { bandwidth 2 GB/s; memory 1 TB }
    # end of target
  }
  allow { quantize weights int8, int4 group 32 symmetric, int4 group 32 asymmetric # formats
    within "model.layers.*" { prune heads up to 10% keep lm_head # a
    # inside within
    } zero 0..2 }
  require { memory <= 2 GiB; latency token <= 1 s } # two
  minimize latency token then maximize throughput then memory c
}
# trailing
"""


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.name)
def test_plans_are_canonical(path):
    text = path.read_text()
    assert format_text(text) == text


def test_messy_plan_canonical_idempotent_and_same_meaning():
    once = format_text(MESSY)
    assert format_text(once) == once
    assert same_meaning(MESSY, once)
    assert ";" not in once
    for line in once.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0


def test_comments_survive_in_place():
    once = format_text(MESSY)
    comments = [c.text for c in parse_text(MESSY).comments]
    assert [c.text for c in parse_text(once).comments] == comments
    lines = once.splitlines()
    assert lines[0] == "# top comment" and lines[-1] == "# trailing"
    assert "      bandwidth 20 GB/s # bw" in lines
    assert "    } # after device" in lines
    assert lines[lines.index("    # before link") + 1].startswith("    link c <-> d")
    assert lines[lines.index("      # inside within") + 1] == "    }"


def test_layout_of_a_compact_plan():
    text = 'plan p { model "arch:gpt2"; target { device c cpu "local" } workload inference { batch 2 } }'
    assert format_text(text) == (
        'plan p {\n  model "arch:gpt2"\n\n  target {\n    device c cpu "local"\n  }\n\n'
        "  workload inference {\n    batch 2\n    context 512\n    generate 128\n  }\n}\n")


def test_fmt_check_write_and_print(tmp_path, capsys):
    path = tmp_path / "p.lwp"
    path.write_text(MESSY)
    assert main(["fmt", "--check", str(path)]) == 1
    assert path.read_text() == MESSY
    assert main(["fmt", str(path)]) == 0
    assert capsys.readouterr().out == format_text(MESSY)
    assert main(["fmt", "--write", str(path)]) == 0
    assert path.read_text() == format_text(MESSY)
    assert main(["fmt", "--check", str(path)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["p.lwp"]  # no temporary left behind


def test_fmt_write_leaves_a_broken_file_alone(tmp_path):
    good, bad = tmp_path / "good.lwp", tmp_path / "bad.lwp"
    good.write_text(MESSY)
    bad.write_text("plan p {")
    assert main(["fmt", "--write", str(good), str(bad)]) == 2
    assert good.read_text() == MESSY and bad.read_text() == "plan p {"


def test_comments_inside_require_stay_inside():
    text = ('plan p {\n  model "arch:gpt2"\n  target { device c cpu "local" }\n  require {\n    # first\n'
            "    memory <= 1 GiB\n    # last\n  } # end\n  allow {\n    # only a comment\n  }\n}\n")
    once = format_text(text)
    assert "  require {\n    # first\n    memory <= 1 GiB\n    # last\n  } # end\n" in once
    assert "  allow {\n    # only a comment\n  }\n" in once
    assert format_text(once) == once


def test_empty_blocks_written_stay_written():
    text = 'plan p { model "arch:gpt2" target { device c cpu "local" } require { } allow { } }'
    once = format_text(text)
    assert "  require {\n  }\n" in once and "  allow {\n  }\n" in once
    assert same_meaning(text, once) and format_text(once) == once


def test_an_empty_catalog_id_is_kept():
    """`device c cpu ""` is a (wrong) catalog id, for `validate` to report: fmt must not drop it, or the
    formatted plan would mean something else (found by the mutation property test)."""
    text = 'plan p {\n  model "arch:smollm2-135m"\n  target { device c cpu "" { bandwidth 8 GB/s } }\n}\n'
    assert parse_text(format_text(text)).target.devices[0].catalog == ""

"""Parsing: every construct of LANGUAGE.md lands in the AST it means; spans point at the source."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import lwdsl
from lwdsl import ast
from lwdsl.errors import LwdslError, Span
from lwdsl.parse import parse_text

ROOT = Path(__file__).resolve().parents[1]
LANGUAGE = ROOT.parent / "shared" / "spec" / "LANGUAGE.md"

MINIMAL = 'plan p { model "arch:gpt2" target { device c cpu "local" } }'


def fenced_blocks(markdown: str) -> list[str]:
    return re.findall(r"```\n(.*?)```", markdown, flags=re.S)


@pytest.mark.skipif(not LANGUAGE.exists(), reason="the spec is not next to this checkout")
def test_every_language_md_plan_parses():
    plans = [block for block in fenced_blocks(LANGUAGE.read_text()) if block.lstrip("# \n").startswith("plan") or "\nplan " in block]
    assert plans, "LANGUAGE.md has a complete example"
    for block in plans:
        plan = parse_text(block, "LANGUAGE.md")
        assert plan.name == "smollm2_edge"
        assert plan.model.eval.tokens == 4096
        assert plan.require[2].value.relative


def test_complete_example_shapes():
    plan = parse_text((ROOT / "plans" / "every_construct.lwp").read_text())
    assert plan.model.scheme == "config" and plan.model.calibrate.tokens == 512
    gpu = plan.target.devices[0]
    assert (gpu.name, gpu.kind, gpu.catalog) == ("gpu0", "gpu", "rtx-3090")
    assert gpu.memory.value == 20 * 2 ** 30 and gpu.price.value == 0.3
    assert plan.target.devices[1].compute.integer
    assert plan.target.links[0].latency.value == pytest.approx(800e-9)
    assert plan.workload == ast.InferenceWorkload(batch=4, context=512, generate=64, span=plan.workload.span)
    metrics = [(c.metric.name, c.metric.qualifier, c.op) for c in plan.require]
    assert ("memory", None, "<") in metrics and ("throughput", None, ">=") in metrics
    assert ("quality", "kld", "<=") in metrics and ("cost", None, "<") in metrics
    kinds = [t.technique for t in plan.allow.techniques]
    assert kinds.count("within") == 2 and "prune" in kinds and "keep" in kinds
    weights = plan.allow.techniques[0]
    assert [f.dtype for f in weights.formats] == ["fp16", "bf16", "fp8", "int8", "int4", "nf4", "int2"]
    assert weights.formats[4].group == 64 and not weights.formats[4].symmetric
    keep = next(t for t in plan.allow.techniques if t.technique == "keep")
    assert [(s.pattern, s.quoted) for s in keep.selectors] == [("lm_head", False), ("model.embed_tokens", False)]
    terms = [(t.direction, t.metric.name) for t in plan.objective.terms]
    assert terms == [("minimize", "latency"), ("maximize", "throughput"), ("minimize", "memory")]


def test_training_workload_and_techniques():
    plan = parse_text((ROOT / "plans" / "training_8b.lwp").read_text())
    assert plan.workload.type == "training" and plan.workload.tokens == 2_000_000_000
    assert plan.workload.optimizer == "adamw" and plan.workload.precision == "bf16"
    techniques = {t.technique: t for t in plan.allow.techniques}
    assert (techniques["zero"].low, techniques["zero"].high) == (0, 3)
    assert techniques["accumulate"].up_to == 16 and techniques["shard"].kind == "data"
    assert techniques["offload_optimizer"].device == "host"


def test_defaults_when_blocks_absent():
    plan = parse_text(MINIMAL)
    assert plan.workload.batch == 1 and plan.workload.context == 512 and plan.workload.generate == 128
    assert plan.require == () and plan.allow.techniques == () and plan.objective is None


def test_separators_optional_and_keywords_are_names_elsewhere():
    plan = parse_text('plan p { model "arch:gpt2"; target { device cpu cpu "local"; device memory disk '
                      '{ memory 1 TB bandwidth 1 GB/s } } require { memory memory <= 1 TB; memory cpu < 2 GiB } '
                      'allow { offload memory quantize weights int8 int4 group 32; keep lm_head "x.*" } }')
    assert [d.name for d in plan.target.devices] == ["cpu", "memory"]
    assert plan.require[0].metric.qualifier == "memory"
    assert plan.allow.techniques[0].devices == ("memory",)
    assert len(plan.allow.techniques[1].formats) == 2


def test_strings_escapes_and_comments():
    plan = parse_text('# top\nplan p { # a "quoted # not a comment"\n model "arch:gp\\"t2" # trailing\n'
                      ' target { device c cpu "local" } }')
    assert plan.model.source == 'arch:gp"t2'
    assert [c.text for c in plan.comments] == [" top", ' a "quoted # not a comment"', " trailing"]
    assert plan.comments[2].span.line == 3


def test_spans_are_one_based_with_file():
    plan = parse_text(MINIMAL, "x.lwp")
    assert str(plan.model.span) == "x.lwp:1:10"
    assert plan.target.devices[0].span.column == 37


def test_zero_single_stage_means_up_to():
    plan = parse_text('plan p { model "arch:gpt2" target { device c cpu "local" } workload training { tokens 1 } '
                      'allow { zero 2 } }')
    assert (plan.allow.techniques[0].low, plan.allow.techniques[0].high) == (0, 2)


def test_ast_has_no_parser_objects():
    text = (ROOT / "plans" / "every_construct.lwp").read_text()
    plan = parse_text(text)

    def walk(value):
        if isinstance(value, (ast.Node, Span)):
            for field in type(value).model_fields:
                walk(getattr(value, field))
        elif isinstance(value, tuple):
            for item in value:
                walk(item)
        else:
            assert type(value) in (str, int, float, bool, type(None)), repr(value)  # a lark Token is a str subclass

    walk(plan)
    assert ast.Plan.model_validate_json(plan.model_dump_json()) == plan


def test_facade_parse_text_and_path(tmp_path):
    path = tmp_path / "p.lwp"
    path.write_text(MINIMAL)
    assert lwdsl.parse(MINIMAL).name == "p"
    assert lwdsl.parse(path).model.location == "gpt2"
    assert lwdsl.parse(str(path)).span.file == str(path)


def test_facade_validate(tmp_path):
    assert lwdsl.validate(MINIMAL) == []
    codes = [d.code for d in lwdsl.validate(MINIMAL.replace("gpt2", "gpt3").replace('"local"', '"rtx-9090"'))]
    assert codes == ["E252", "E241"]
    assert [d.code for d in lwdsl.validate(tmp_path / "none.lwp")] == ["E110"]


def test_error_carries_source_and_renders_caret():
    with pytest.raises(LwdslError) as raised:
        parse_text('plan p {\n  model "arch:gpt2"\n  target { device c cpux }\n}\n', "t.lwp")
    error = raised.value
    assert error.source is not None and error.exit_code == 2
    rendered = error.diagnostics[0].render(error.source)
    assert rendered.splitlines()[0] == "t.lwp:3:21: error E102: expected `cpu`, `disk` or `gpu`, found `cpux`"
    assert rendered.splitlines()[2].endswith("^^^^")


def test_build_ships_the_grammar_inside_the_package(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    shipped = tmp_path / "lwdsl" / "grammar" / "lwp.lark"
    assert shipped.read_text() == (ROOT / "grammar" / "lwp.lark").read_text()
    assert (tmp_path / "lwdsl" / "data" / "hardware.json").exists()
    probe = "import lwdsl.parse as p; print(p.grammar_path())"
    found = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                           env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert found.stdout.strip() == str(shipped), found.stderr[-2000:]


def test_syntax_error_lists_only_what_can_follow_and_suggests_a_keyword():
    text = 'plan p { model "arch:gpt2" target { device c cpu "local" } allow { quantize weights int4 group 32 asymetric } }'
    with pytest.raises(LwdslError) as raised:
        parse_text(text)
    (diagnostic,) = raised.value.diagnostics
    assert diagnostic.code == "E102" and diagnostic.hint == "did you mean `asymmetric`?"
    assert "`asymmetric`" in diagnostic.message and "`batch`" not in diagnostic.message

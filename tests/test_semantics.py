"""Meaning checks: each check on its own, all problems reported at once, and the example plans valid."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from lwdsl.errors import LwdslError
from lwdsl.parse import parse_text
from lwdsl.plans import PlanFile, load_plan
from lwdsl.semantics import CHECKS, check_plan

ROOT = Path(__file__).resolve().parents[1]
BASE = 'plan p {{\n  model "{model}"\n  target {{\n    device c cpu "local"\n    device ssd disk {{ memory 1 TB; bandwidth 2 GB/s }}\n  }}\n{rest}}}\n'


def codes(rest: str = "", model: str = "arch:smollm2-135m", base_dir: Path = ROOT) -> list[str]:
    return [d.code for d in check_plan(parse_text(BASE.format(model=model, rest=rest)), base_dir)]


def test_checks_are_a_tuple_of_functions():
    assert isinstance(CHECKS, tuple) and all(callable(c) for c in CHECKS)


def test_valid_plan_has_no_diagnostics():
    assert codes("  allow { keep lm_head; offload ssd }\n") == []


@pytest.mark.parametrize("rest, expected", [
    ("  allow { offload nvme }\n", ["E210"]),
    ("  require { memory gpu <= 1 GiB }\n", ["E210"]),
    ("  require { memory c <= 20 ms }\n", ["E220"]),
    ("  require { quality kld <= 5% }\n", ["E220"]),
    ("  require { quality kld <= 0.05; quality perplexity <= 5% }\n", []),
    ("  require { throughput >= 10 tok/s; cost <= 0 $/h; latency request <= 2 min }\n", []),
    ("  allow { prune channels up to 0% }\n", ["E221"]),
    ("  allow { quantize weights int4 group 0 }\n", ["E221"]),
    ("  allow { shard tensor up to 0 }\n", ["E221"]),
    ("  workload training { tokens 10 }\n  allow { accumulate up to 0 }\n", ["E221"]),
    ("  workload training { tokens 10 }\n  minimize latency token\n", ["E230"]),
    ("  minimize time\n", ["E230"]),
    ("  allow { checkpoint activations; shard data up to 2; offload optimizer ssd }\n", ["E231", "E231", "E231"]),
    ("  minimize latency\n", ["E270"]),
    ("  minimize quality then memory then latency token\n", []),
    ("  allow { within \"model.layers.*\" { zero 0..1 } }\n  workload training { tokens 1 }\n", ["E280"]),
    ("  allow { keep \"model.layers.*.mlp.down_proj\", model.norm, \"model.layers.[0-3].self_attn\" }\n", []),
    ("  allow { keep \"model.layers.*.mlp.dwn_proj\" }\n", ["E260"]),
    ("  allow { within lm_head { quantize weights int8 } within \"nothing.*\" { prune 2:4 } }\n", ["E260"]),
])
def test_single_checks(rest, expected):
    assert codes(rest) == expected


def test_selector_hint_lists_close_names():
    plan = parse_text(BASE.format(model="arch:smollm2-135m", rest="  allow { keep \"model.layers.*.mlp.dwn_proj\" }\n"))
    (diagnostic,) = check_plan(plan, ROOT)
    assert "model.layers" in diagnostic.hint and "down_proj" in diagnostic.hint


def test_all_problems_at_once_sorted_by_place():
    rest = ("  require {\n    memory x <= 1 GiB\n    latency token <= 1 GiB\n  }\n"
            "  allow { offload y; prune heads up to 200%; keep nothing_here }\n")
    found = check_plan(parse_text(BASE.format(model="arch:smollm2-135m", rest=rest)), ROOT)
    assert [d.code for d in found] == ["E210", "E220", "E210", "E221", "E260"]
    assert [d.span.line for d in found] == sorted(d.span.line for d in found)


def test_model_files_resolve_against_base_dir(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "t.txt").write_text("hello")
    assert codes(model="gguf:m/x.gguf", base_dir=tmp_path) == ["E250"]
    assert codes(model="gguf:m", base_dir=tmp_path) == ["E251"]
    assert codes(model="hf:t.txt", base_dir=tmp_path) == ["E251"]
    assert codes(model="hf:nowhere", base_dir=tmp_path) == ["E250"]
    assert codes(model="config:cfg.json", base_dir=tmp_path) == ["E250"]
    plan = BASE.format(model="arch:gpt2", rest="").replace('"arch:gpt2"', '"arch:gpt2" { eval "text:t.txt" }')
    assert check_plan(parse_text(plan), tmp_path) == []
    assert [d.code for d in check_plan(parse_text(plan.replace("t.txt", "u.txt")), tmp_path)] == ["E253"]


def test_unreadable_config_is_reported_not_raised(tmp_path):
    (tmp_path / "cfg.json").write_text("{not json")
    found = codes(model="config:cfg.json", base_dir=tmp_path)
    assert len(found) == 1 and found[0].startswith("E3")


PLANS = [pytest.param(p, id=p.name, marks=[pytest.mark.model] if "gguf:" in p.read_text() else [])
         for p in sorted((ROOT / "plans").glob("*.lwp"))]


@pytest.mark.parametrize("path", PLANS)
def test_every_plan_validates(path, request):
    if "gguf:" in path.read_text():
        request.getfixturevalue("smollm2_gguf")
        from lwdsl.models.fetch import fetch_chunked, source_for_file

        for name in re.findall(r'gguf:[^"]*?([^/"]+\.gguf)"', path.read_text()):
            source = source_for_file(name)
            if source is not None:  # a plan for another real model: fetched (hash-checked) like SmolLM2
                fetch_chunked(source, ROOT / "models")
    plan_file = load_plan(path)
    assert isinstance(plan_file, PlanFile)
    assert plan_file.base_dir == path.parent.resolve() and len(plan_file.sha256) == 64
    assert plan_file.text == path.read_text()


@pytest.mark.model
def test_default_plan_selectors_match_the_real_model(smollm2_gguf):
    plan_file = load_plan(ROOT / "plans" / "smollm2_edge.lwp")
    assert plan_file.plan.model.scheme == "gguf"
    text = plan_file.text.replace('keep lm_head, "model.embed_tokens"', 'keep lm_head, "model.layers.*.mlp.up_prj"')
    with pytest.raises(LwdslError) as raised:
        from lwdsl.plans import check_text

        check_text(text, str(ROOT / "plans" / "smollm2_edge.lwp"), plan_file.base_dir)  # same span: inventory cached
    assert [d.code for d in raised.value.diagnostics] == ["E260"]


def test_load_plan_file_problems(tmp_path):
    for setup, code in ((lambda p: None, "E110"), (lambda p: p.mkdir(), "E111"),
                        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00"), "E100"),
                        (lambda p: p.write_bytes("plan p { # café\n".encode("latin-1")), "E100")):
        path = tmp_path / f"{code}-{len(list(tmp_path.iterdir()))}.lwp"
        setup(path)
        with pytest.raises(LwdslError) as raised:
            load_plan(path)
        assert raised.value.diagnostics[0].code == code and raised.value.exit_code == 2
        assert raised.value.diagnostics[0].span.file == str(path)


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.lwp"
    path.write_bytes(b"\xef\xbb\xbf" + BASE.format(model="arch:gpt2", rest="").encode())
    assert load_plan(path).plan.name == "p"


@pytest.fixture
def tiny_hf_folder(tmp_path):
    """A two-layer Llama as a Hugging Face folder: config.json + safetensors (zeros; only names and shapes matter)."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
        "tie_word_embeddings": False}))
    shapes = {"model.embed_tokens.weight": (100, 64), "model.norm.weight": (64,), "lm_head.weight": (100, 64)}
    for i in range(2):
        layer = f"model.layers.{i}."
        shapes.update({layer + "self_attn.q_proj.weight": (64, 64), layer + "self_attn.k_proj.weight": (32, 64),
                       layer + "self_attn.v_proj.weight": (32, 64), layer + "self_attn.o_proj.weight": (64, 64),
                       layer + "mlp.gate_proj.weight": (128, 64), layer + "mlp.up_proj.weight": (128, 64),
                       layer + "mlp.down_proj.weight": (64, 128), layer + "input_layernorm.weight": (64,),
                       layer + "post_attention_layernorm.weight": (64,)})
    save_file({name: np.zeros(shape, np.float16) for name, shape in shapes.items()}, str(folder / "model.safetensors"))
    return folder


def test_hf_folder_selectors(tiny_hf_folder):
    text = ('plan p { model "hf:tiny" target { device c cpu "local" } allow { keep "model.layers.1.mlp.*", lm_head '
            'within "model.layers.0.*" { quantize weights int8 } } }')
    assert check_plan(parse_text(text), tiny_hf_folder.parent) == []
    found = check_plan(parse_text(text.replace("layers.1", "layers.2")), tiny_hf_folder.parent)
    assert [d.code for d in found] == ["E260"] and "model.layers.1.mlp" in found[0].hint

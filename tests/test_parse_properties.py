"""Property tests: generated valid plans survive `fmt -> parse` unchanged (spans aside); mutated
plans and random bytes never raise anything but the tool's own error."""
from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lwdsl.errors import LwdslError
from lwdsl.fmt import format_text
from lwdsl.parse import parse_text
from lwdsl.plans import check_text, decode_plan

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = settings(max_examples=int(os.environ.get("LWDSL_HYPOTHESIS_EXAMPLES", "80")), deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEYWORDS = {"then", "minimize", "maximize", "up", "to", "latency", "memory", "group", "asymmetric", "symmetric",
            "tokens", "optimizer", "within", "keep", "offload", "prune", "shard", "quantize", "zero", "checkpoint",
            "accumulate", "link", "device", "model", "target", "workload", "require", "allow", "eval", "calibrate"}
names = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True).filter(lambda n: n not in KEYWORDS)
numbers = st.one_of(st.integers(1, 4096).map(str), st.sampled_from(["0.5", "1_000", "2e3", "12.25"]))
units = {"size": ["B", "KB", "MiB", "GiB", "TB"], "bandwidth": ["GB/s", "MiB/s"], "compute": ["GFLOPS", "TFLOP/s", "TOPS"],
         "time": ["ns", "us", "ms", "s", "min", "h"], "token_rate": ["tok/s"], "money": ["$/h"]}


def quantity(kind: str):
    glue = st.sampled_from([" ", ""])
    return st.tuples(numbers, glue, st.sampled_from(units[kind])).map(lambda t: "".join(t))


sep = st.sampled_from(["\n", "; ", " ", "\n\n", " # note\n", ";\n"])
comma = st.sampled_from([", ", " ", ",\n  "])
formats = st.tuples(st.sampled_from(["fp16", "bf16", "fp8", "int8", "int4", "nf4", "int2"]),
                    st.sampled_from(["", " group 32", " group 128"]),
                    st.sampled_from(["", " symmetric", " asymmetric"])).map("".join)
selectors = st.sampled_from(["lm_head", '"model.layers.*.mlp"', "model.norm", '"x \\" y"'])


@st.composite
def plans(draw):
    devices = draw(st.lists(names, min_size=1, max_size=4, unique=True))
    dev = st.sampled_from(devices)
    device_lines = []
    for name in devices:
        kind = draw(st.sampled_from(["cpu", "gpu", "disk"]))
        catalog = draw(st.sampled_from(["", ' "local"', ' "rtx-4090"']))
        props = draw(st.lists(st.sampled_from(["memory", "bandwidth", "compute", "price"]), unique=True, max_size=4))
        kinds = {"memory": "size", "bandwidth": "bandwidth", "compute": "compute", "price": "money"}
        body = draw(sep).join(f"{p} {draw(quantity(kinds[p]))}" for p in props)
        device_lines.append(f"device {name} {kind}{catalog}" + (f" {{ {body} }}" if props else ""))
    links = [f"link {draw(dev)} <-> {draw(dev)} {draw(quantity('bandwidth'))}"
             + draw(st.sampled_from(["", f" latency {draw(quantity('time'))}"])) for _ in range(draw(st.integers(0, 2)))]
    blocks = [f'model "arch:{draw(names)}"' + draw(st.sampled_from(["", ' { eval "text:python-docs" tokens 64 }',
                                                                   ' { calibrate "text:a b.txt"; eval "text:e" }'])),
              "target " + draw(st.sampled_from(["", "t "])) + "{ " + draw(sep).join(device_lines + links) + " }"]
    training = draw(st.booleans())
    if training:
        blocks.append("workload training { " + draw(sep).join(draw(st.permutations(
            [f"batch {draw(st.integers(1, 64))}", f"tokens {draw(st.integers(1, 10**9))}", "optimizer sgd",
             "precision fp16"]))) + " }")
    elif draw(st.booleans()):
        blocks.append(f"workload inference {{ context {draw(st.integers(1, 9999))}{draw(sep)}generate 7 }}")
    metrics = [f"memory {draw(dev)} <= {draw(quantity('size'))}", f"memory < {draw(quantity('size'))}",
               f"latency token <= {draw(quantity('time'))}", "quality perplexity <= +5%", "quality kld < 0.1",
               f"throughput >= {draw(quantity('token_rate'))}", f"cost <= {draw(quantity('money'))}",
               f"time <= {draw(quantity('time'))}"]
    require = draw(st.lists(st.sampled_from(metrics), max_size=5))
    if require or draw(st.booleans()):
        blocks.append("require { " + draw(sep).join(require) + " }")
    techniques = [f"quantize weights {draw(comma).join(draw(st.lists(formats, min_size=1, max_size=3)))}",
                  f"quantize kv {draw(formats)}", "prune channels up to 25%", "prune 2:4", "prune heads up to 12.5%",
                  "shard tensor up to 4", "shard pipeline", f"offload {draw(dev)}",
                  f"keep {draw(comma).join(draw(st.lists(selectors, min_size=1, max_size=3)))}",
                  f"within {draw(selectors)} {{ prune unstructured up to 50%{draw(sep)}keep lm_head }}",
                  "zero 1..3", "zero 2", "checkpoint activations", "accumulate up to 8", "shard data up to 2",
                  f"offload optimizer {draw(dev)}"]
    allow = draw(st.lists(st.sampled_from(techniques), max_size=6))
    if allow or draw(st.booleans()):
        blocks.append("allow { " + draw(sep).join(allow) + " }")
    if draw(st.booleans()):
        blocks.append(draw(st.sampled_from(["minimize latency token then memory", "maximize throughput then minimize cost",
                                            f"minimize memory {draw(dev)}", "minimize quality then memory then latency token"])))
    blocks = draw(st.permutations(blocks))
    return "# generated\nplan " + draw(names) + " {" + draw(sep) + draw(sep).join(blocks) + draw(sep) + "}\n"


def without_spans(value):
    if isinstance(value, dict):
        return {k: without_spans(v) for k, v in value.items() if k != "span"}
    if isinstance(value, (list, tuple)):
        return [without_spans(v) for v in value]
    return value


@SETTINGS
@given(plans())
def test_fmt_round_trip_same_ast_and_idempotent(text):
    plan = parse_text(text)
    once = format_text(text)
    again = parse_text(once)
    original, formatted = without_spans(plan.model_dump()), without_spans(again.model_dump())
    assert {k: v for k, v in original.items() if k != "comments"} == {k: v for k, v in formatted.items() if k != "comments"}
    assert sorted(c["text"] for c in original["comments"]) == sorted(c["text"] for c in formatted["comments"])
    assert format_text(once) == once


SAMPLES = [(ROOT / "plans" / "every_construct.lwp").read_text(), """# top
plan p { # header
  model "arch:smollm2-135m" { eval "text:python-docs" tokens 100 } # model
  target t { device c cpu { memory 8GiB; bandwidth 20 GB/s # bw
      compute 1 TFLOPS } # after device
    # before link
    link c <-> d 10 GB/s latency 5 us; device d disk { bandwidth 2 GB/s; memory 1 TB }
    # end of target
  }
  allow { quantize weights int8, int4 group 32 asymmetric # formats
    within "model.layers.*" { prune heads up to 10% keep lm_head # a
    # inside within
    } }
  require { memory <= 2 GiB # first
    latency token <= 1 s
    # last
  } # two
  minimize latency token then maximize throughput then memory c # objective
}
# trailing
"""]
TOKENS = ["{", "}", ";", ",", '"', "#", "<->", "<=", "8 GiB", "plan", "model", "within", "\n", "..", "2:4", "%",
          "+", "\\", "\x00", "é", "up to", "9" * 400, "-1e999", "1e999 GiB"]


@st.composite
def mutations(draw):
    text = draw(st.sampled_from(SAMPLES))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["delete", "insert", "duplicate"]))
        if action == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 40)):]
        elif action == "insert":
            text = text[:at] + draw(st.one_of(st.sampled_from(TOKENS), st.text(max_size=5))) + text[at:]
        else:
            end = min(len(text), at + draw(st.integers(1, 80)))
            text = text[:end] + text[at:end] + text[end:]
    return text


@SETTINGS
@given(mutations())
def test_mutations_raise_only_lwdsl_errors(text):
    try:
        check_text(text, "m.lwp", ROOT / "plans")
    except LwdslError as error:
        assert error.diagnostics and all(d.code.startswith("E") for d in error.diagnostics)
        for diagnostic in error.diagnostics:
            diagnostic.render(error.source)
    try:
        once = format_text(text)
    except LwdslError:
        return
    assert format_text(once) == once  # whatever parses, fmt lays out stably and keeps the meaning
    strip = lambda plan: {k: v for k, v in without_spans(plan.model_dump()).items() if k != "comments"}  # noqa: E731
    assert strip(parse_text(once)) == strip(parse_text(text))


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_lwdsl_errors(data):
    try:
        check_text(decode_plan(data, "b.lwp"), "b.lwp", ROOT / "plans")
    except LwdslError as error:
        assert error.diagnostics

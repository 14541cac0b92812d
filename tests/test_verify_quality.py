"""verify.text, verify.quality, verify.latency and the isolated memory worker."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lwdsl import ast
from lwdsl.errors import LwdslError
from lwdsl.verify.text import WINDOW_TOKENS, calibration_hash, plan_texts, prompt_ids, read_text


class _CharTokenizer:
    """A stand-in tokenizer for the pure text tests: one token per character."""

    vocab_size = 256

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 256 for c in text]}


def _plan(eval_source="text:python-docs", eval_tokens=None, calibrate=None):
    return ast.Plan(name="p", model=ast.ModelBlock(
        source="gguf:m.gguf", scheme="gguf", location="m.gguf",
        eval=ast.TextSource(source=eval_source, tokens=eval_tokens),
        calibrate=ast.TextSource(source=calibrate[0], tokens=calibrate[1]) if calibrate else None),
        target=ast.Target(devices=(ast.Device(name="c", kind="cpu"),)))


def test_python_docs_is_built_in_and_deterministic():
    text = read_text("text:python-docs", Path("."))
    assert len(text) > 100_000 and text == read_text("text:python-docs", Path("/"))


def test_calibration_and_evaluation_windows_never_overlap():
    texts = plan_texts(_plan(eval_tokens=1000, calibrate=("text:python-docs", 600)), Path("."), _CharTokenizer())
    assert texts.evaluation.ids.shape == (4, WINDOW_TOKENS)  # 1000 tokens -> 4 whole windows
    assert texts.calibration.ids.shape == (3, WINDOW_TOKENS)
    evaluation = {tuple(w.tolist()) for w in texts.evaluation.ids}
    assert not evaluation & {tuple(w.tolist()) for w in texts.calibration.ids}
    again = plan_texts(_plan(eval_tokens=1000, calibrate=("text:python-docs", 600)), Path("."), _CharTokenizer())
    assert torch.equal(again.evaluation.ids, texts.evaluation.ids)
    assert texts.calibration.text_hash == calibration_hash(
        _plan(eval_tokens=1000, calibrate=("text:python-docs", 600)), Path("."))


def test_calibration_mixes_kinds_and_ignores_the_eval_text(tmp_path):
    from lwdsl.verify.text import calibration_mix

    assert calibration_mix("text:python-docs", 4) == [("text:python-docs", 2), ("text:alice", 2)]
    assert calibration_mix("text:alice", 5) == [("text:alice", 3), ("text:python-docs", 2)]
    assert calibration_mix("text:mine.txt", 4) == [("text:mine.txt", 2), ("text:python-docs", 1), ("text:alice", 1)]
    assert calibration_mix("text:alice", 1) == [("text:alice", 1)]
    tokenizer = _CharTokenizer()
    docs = read_text("text:python-docs", Path("."))
    alice = read_text("text:alice", Path("."))
    by_eval = {}
    for eval_source in ("text:python-docs", "text:alice"):
        texts = plan_texts(_plan(eval_source, 512, ("text:python-docs", 1024)), Path("."), tokenizer)
        calibration = texts.calibration.ids
        assert calibration.shape == (4, WINDOW_TOKENS)
        # interleaved: docs, alice, docs, alice; each the text's odd windows
        assert calibration[0].tolist() == [ord(c) % 256 for c in docs[WINDOW_TOKENS: 2 * WINDOW_TOKENS]]
        assert calibration[1].tolist() == [ord(c) % 256 for c in alice[WINDOW_TOKENS: 2 * WINDOW_TOKENS]]
        assert texts.calibration.source == "text:python-docs+text:alice"
        assert texts.calibration.sources == ("text:python-docs", "text:alice") * 2
        evaluation = {tuple(w.tolist()) for w in texts.evaluation.ids}
        assert not evaluation & {tuple(w.tolist()) for w in calibration}
        by_eval[eval_source] = texts
    docs_eval, alice_eval = by_eval.values()
    assert torch.equal(docs_eval.calibration.ids, alice_eval.calibration.ids)
    assert docs_eval.calibration.text_hash == alice_eval.calibration.text_hash
    assert alice_eval.evaluation.ids[0].tolist() == [ord(c) % 256 for c in alice[:WINDOW_TOKENS]]
    (tmp_path / "eval.txt").write_text("abcdefgh" * 200)
    own_eval = plan_texts(_plan("text:eval.txt", 256, ("text:python-docs", 1024)), tmp_path, tokenizer)
    assert own_eval.calibration.text_hash == docs_eval.calibration.text_hash
    assert calibration_hash(_plan("text:eval.txt", 256, ("text:python-docs", 1024)), tmp_path) == \
        docs_eval.calibration.text_hash


def test_text_file_relative_to_the_plan_and_errors(tmp_path):
    (tmp_path / "eval.txt").write_text("abcdefgh" * 200)
    texts = plan_texts(_plan("text:eval.txt", 256, ("text:python-docs", 256)), tmp_path, _CharTokenizer())
    assert texts.evaluation.ids[0, :3].tolist() == [97, 98, 99]
    assert texts.evaluation.source == "text:eval.txt"
    for source, code in (("text:missing.txt", "E702"), ("data:x", "E701")):
        with pytest.raises(LwdslError) as error:
            read_text(source, tmp_path)
        assert error.value.diagnostics[0].code == code
    with pytest.raises(LwdslError) as error:
        plan_texts(_plan("text:eval.txt", 100_000), tmp_path, _CharTokenizer())
    assert error.value.diagnostics[0].code == "E704"


def test_prompt_ids_shape():
    assert prompt_ids("abc", _CharTokenizer(), 2, 5).tolist() == [[97, 98, 99, 97, 98], [99, 97, 98, 99, 97]]


@pytest.mark.model
def test_quality_against_a_damaged_model_and_itself(smollm2_model):
    from lwdsl.verify.quality import compare_quality, perplexity
    from lwdsl.verify.text import tokenize_windows

    model, tokenizer = smollm2_model
    windows = tokenize_windows(read_text("text:python-docs", Path(".")), tokenizer, 1)
    def damaged(ids):  # block 5's MLP silenced, the shared model left as it is
        handle = model.model.layers[5].mlp.register_forward_hook(lambda module, args, output: output * 0)
        try:
            return model(ids)
        finally:
            handle.remove()

    worse = compare_quality(model, damaged, windows)
    assert worse.kld > 0.01 and worse.perplexity_increase > 0.0
    assert worse.baseline_perplexity == pytest.approx(perplexity(model, windows), rel=1e-5)
    assert 5 < worse.baseline_perplexity < 60 and worse.tokens == WINDOW_TOKENS - 1
    # the same model on both sides: nothing lost (two tiny windows keep this cheap)
    same = compare_quality(model, model, windows[:, :32])
    assert same.kld == pytest.approx(0.0, abs=1e-6) and same.perplexity_increase == pytest.approx(0.0, abs=1e-6)


@pytest.mark.model
def test_latency_and_memory_of_the_original_in_its_own_process(smollm2_gguf):
    """The worker measures only what the model adds: its fp32 weights (135M parameters, tied head:
    538 MB) and the run's working memory, not the checker's own model or libraries."""
    from lwdsl.verify.memory import measure_isolated

    block = ast.ModelBlock(source=f"gguf:{smollm2_gguf}", scheme="gguf", location=str(smollm2_gguf))
    result = measure_isolated({"kind": "model", "block": block.model_dump(mode="json"),
                               "base_dir": str(smollm2_gguf.parent)}, [list(range(100, 116))], 4, repeats=1)
    weights = 134_515_008 * 4
    assert weights * 0.95 < result["memory"]["cpu"] < weights * 2.5
    latency = result["latency"]
    assert 0 < latency["token_s"] < latency["request_s"] and latency["runs"] == 1
    assert latency["throughput_tok_s"] == pytest.approx(1 / latency["token_s"], rel=0.5)

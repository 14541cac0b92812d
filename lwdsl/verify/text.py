"""Text sources for quality: read, tokenise with the model's tokenizer, cut into windows.

Two sources are understood: `text:FILE` (relative paths against the plan's folder) and the
built-in `text:python-docs`, CPython's own `pydoc_data.topics` (shipped with every Python), so a
plan can be checked with no data file at all.

Calibration (what `profile` measures sensitivities on) and evaluation (what `check` reports) are
kept apart: when both come from the same text, the token stream is cut into fixed windows and the
windows alternate, evaluation first (0, 2, 4, ...) and calibration second (1, 3, 5, ...). The
split depends only on the text, the tokenizer and the window length, so it is deterministic.

    >>> texts = plan_texts(plan, base_dir, tokenizer)            # doctest: +SKIP
    >>> texts.evaluation.shape                                     # doctest: +SKIP
    torch.Size([8, 256])
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from lwdsl.errors import Span, fail

PYTHON_DOCS = "python-docs"
# English prose shipped with lwdsl (lwdsl/data/texts/README.md): a text of another kind than the docs
PACKAGED_TEXTS = {"alice": "alice.txt"}
WINDOW_TOKENS = 256  # tokens per window: perplexity is measured with this much left context at most
DEFAULT_EVAL_TOKENS = 2048
DEFAULT_CALIBRATION_TOKENS = 1024
_CHARS_PER_TOKEN_BOUND = 8  # generous: English text and code run at about 4 characters a token


@dataclass(frozen=True)
class TokenWindows:
    """Token ids of one text use, shape (windows, WINDOW_TOKENS), and what identifies them."""

    ids: torch.Tensor
    source: str
    text_hash: str  # sha256 of the text and the window layout

    @property
    def tokens(self) -> int:
        return int(self.ids.numel())


@dataclass(frozen=True)
class PlanTexts:
    calibration: TokenWindows
    evaluation: TokenWindows


def read_text(source: str, base_dir: Path, span: Span | None = None) -> str:
    """The text a `text:` source names: `text:python-docs` or `text:FILE`."""
    scheme, _, location = source.partition(":")
    if scheme != "text" or not location:
        raise fail("E701", f"unknown text source {source!r}", span,
                   hint='write "text:FILE" or "text:python-docs"')
    if location == PYTHON_DOCS:
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        return "\n\n".join(topics[key] for key in sorted(topics))
    if location in PACKAGED_TEXTS:
        from importlib import resources

        return resources.files("lwdsl").joinpath("data", "texts", PACKAGED_TEXTS[location]).read_text(encoding="utf-8")
    path = Path(location)
    if not path.is_absolute():
        path = Path(base_dir) / path
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise fail("E702", f"cannot read text file {str(path)!r}: {error}", span,
                   hint="the path is relative to the plan file's folder") from None
    if not text.strip():
        raise fail("E703", f"text file {str(path)!r} is empty", span)
    return text


def tokenize_windows(text: str, tokenizer, windows: int, source: str = "",
                     span: Span | None = None) -> torch.Tensor:
    """The first `windows` full windows of `text`'s tokens, shape (windows, WINDOW_TOKENS).

    A tokenizer that starts every text with its BOS token (Gemma's) gets it at the head of each window:
    such a model is only itself after it (without, Gemma-3-270M's perplexity on prose is in the hundreds).
    """
    bos = _leading_bos(tokenizer)
    per_window = WINDOW_TOKENS - (bos is not None)
    needed = windows * per_window
    prefix = text[: needed * _CHARS_PER_TOKEN_BOUND]
    ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    if len(ids) < needed:
        raise fail("E704", f"text {source!r} has {len(ids)} tokens; {needed} are needed "
                   f"({windows} windows of {WINDOW_TOKENS})", span,
                   hint="use a longer text or fewer `tokens`")
    cut = torch.tensor(ids[:needed], dtype=torch.long).reshape(windows, per_window)
    if bos is not None:
        cut = torch.cat([torch.full((windows, 1), bos, dtype=torch.long), cut], dim=1)
    return cut


def _leading_bos(tokenizer) -> int | None:
    """The BOS id the tokenizer puts before every text by default, or None (SmolLM2, Qwen2: none)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        ids = tokenizer("a")["input_ids"]
    except (TypeError, ValueError, KeyError):
        return None
    return int(bos) if ids and ids[0] == bos else None


def _windows_for(tokens: int) -> int:
    return max(1, -(-tokens // WINDOW_TOKENS))


def _hash(text: str, role: str, windows: int) -> str:
    """Identifies a window set by its text and layout; the tokenizer is the model's, so the model's
    own hash covers it (and this stays computable without loading a tokenizer)."""
    digest = hashlib.sha256(text.encode("utf-8"))
    digest.update(f"|{WINDOW_TOKENS}|{role}|{windows}".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class _Layout:
    eval_source: str
    calib_source: str
    eval_span: Span | None
    calib_span: Span | None
    eval_windows: int
    calib_windows: int

    @property
    def shared(self) -> bool:
        return self.calib_source == self.eval_source


def _layout(plan, eval_tokens: int | None, calibration_tokens: int | None) -> _Layout:
    block = plan.model
    eval_node, calib_node = block.eval, block.calibrate or block.eval
    eval_source = eval_node.source if eval_node else f"text:{PYTHON_DOCS}"
    eval_span = eval_node.span if eval_node else block.span
    n_eval = eval_tokens or (eval_node.tokens if eval_node and eval_node.tokens else DEFAULT_EVAL_TOKENS)
    n_calib = calibration_tokens or (block.calibrate.tokens if block.calibrate and block.calibrate.tokens
                                     else DEFAULT_CALIBRATION_TOKENS)
    return _Layout(eval_source=eval_source,
                   calib_source=calib_node.source if calib_node else eval_source,
                   eval_span=eval_span, calib_span=calib_node.span if calib_node else eval_span,
                   eval_windows=_windows_for(n_eval), calib_windows=_windows_for(n_calib))


def calibration_hash(plan, base_dir: Path, calibration_tokens: int | None = None) -> str:
    """The `text_hash` `plan_texts(...).calibration` will carry, without tokenising anything."""
    layout = _layout(plan, None, calibration_tokens)
    text = read_text(layout.calib_source, base_dir, layout.calib_span)
    return _hash(text, "calibration-shared" if layout.shared else "calibration-own", layout.calib_windows)


def plan_texts(plan, base_dir: Path, tokenizer, eval_tokens: int | None = None,
               calibration_tokens: int | None = None) -> PlanTexts:
    """Evaluation and calibration windows for a plan (`model { eval ...; calibrate ... }`).

    Defaults: `text:python-docs`, 2048 evaluation and 1024 calibration tokens; `tokens N` in the
    plan (or the arguments here, which win) sets the count, rounded up to whole windows.
    """
    layout = _layout(plan, eval_tokens, calibration_tokens)
    n_eval, n_calib = layout.eval_windows, layout.calib_windows
    eval_text = read_text(layout.eval_source, base_dir, layout.eval_span)
    if layout.shared:
        both = tokenize_windows(eval_text, tokenizer, 2 * max(n_eval, n_calib), layout.eval_source,
                                layout.eval_span)
        evaluation, calibration = both[0::2][:n_eval], both[1::2][:n_calib]
        calib_text = eval_text
    else:
        calib_text = read_text(layout.calib_source, base_dir, layout.calib_span)
        evaluation = tokenize_windows(eval_text, tokenizer, n_eval, layout.eval_source, layout.eval_span)
        calibration = tokenize_windows(calib_text, tokenizer, n_calib, layout.calib_source,
                                       layout.calib_span)
    shared = "shared" if layout.shared else "own"
    return PlanTexts(
        calibration=TokenWindows(calibration, layout.calib_source,
                                 _hash(calib_text, f"calibration-{shared}", n_calib)),
        evaluation=TokenWindows(evaluation, layout.eval_source,
                                _hash(eval_text, f"evaluation-{shared}", n_eval)),
    )


def prompt_ids(text: str, tokenizer, batch: int, context: int) -> torch.Tensor:
    """`batch` prompts of `context` tokens cut one after another from `text` (cycled if short)."""
    needed = batch * context
    ids = tokenizer(text[: needed * _CHARS_PER_TOKEN_BOUND], add_special_tokens=False)["input_ids"]
    if not ids:
        raise fail("E704", "the evaluation text has no tokens")
    repeated = (ids * (needed // len(ids) + 1))[:needed]
    return torch.tensor(repeated, dtype=torch.long).reshape(batch, context)

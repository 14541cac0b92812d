"""Text sources for quality: read, tokenise with the model's tokenizer, cut into windows.

Two sources are understood: `text:FILE` (relative paths against the plan's folder) and the
built-in `text:python-docs`, CPython's own `pydoc_data.topics` (shipped with every Python), so a
plan can be checked with no data file at all.

Calibration (what `profile` measures sensitivities on) and evaluation (what `check` reports) are
kept apart: calibration mixes the plan's `calibrate` text with built-in corpora of other kinds
(`calibration_mix`: the docs and prose, whichever the plan names) and takes the odd windows of each
text's token stream (1, 3, 5, ...); evaluation takes the even ones (0, 2, 4, ...) of a text that
calibration reads too. The split depends only on the texts, the tokenizer and the window length, so
it is deterministic, and the calibration does not depend on the `eval` text.

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
# The built-in corpora of different kinds (code and reference prose; narrative English prose) that
# every calibration mixes in (`calibration_mix`)
MIX_CORPORA = (PYTHON_DOCS, "alice")
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
    sources: tuple[str, ...] = ()  # the text each window comes from, where they mix (calibration)

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


def calibration_mix(source: str, windows: int) -> list[tuple[str, int]]:
    """`[(text source, windows), ...]` the calibration's windows come from: half (rounded up) from
    the plan's `calibrate` text, the rest shared among the built-in corpora of other kinds.

    A profile calibrated on one kind of text held its perplexity predictions there and missed on the
    other (Qwen2.5-Coder int4 g32, calibrated on the Python docs: -2% on the docs, +49% on prose), so
    the sensitivities are measured on both kinds whatever the plan names; which text `eval` names
    plays no part, so one profile serves a plan checked on any text.

        >>> calibration_mix("text:python-docs", 4)
        [('text:python-docs', 2), ('text:alice', 2)]
    """
    partners = [name for name in MIX_CORPORA if f"text:{name}" != source]
    own = windows if windows < 2 else -(-windows // 2)
    mix = [(source, own)]
    rest = windows - own
    for i, name in enumerate(partners):
        share = rest // len(partners) + (i < rest % len(partners))
        if share:
            mix.append((f"text:{name}", share))
    return mix


@dataclass(frozen=True)
class _Layout:
    eval_source: str
    eval_span: Span | None
    calib_span: Span | None
    eval_windows: int
    calib_mix: tuple[tuple[str, int], ...]

    @property
    def eval_shared(self) -> bool:
        return any(source == self.eval_source for source, _n in self.calib_mix)


def _layout(plan, eval_tokens: int | None, calibration_tokens: int | None) -> _Layout:
    block = plan.model
    eval_node, calib_node = block.eval, block.calibrate or block.eval
    eval_source = eval_node.source if eval_node else f"text:{PYTHON_DOCS}"
    eval_span = eval_node.span if eval_node else block.span
    n_eval = eval_tokens or (eval_node.tokens if eval_node and eval_node.tokens else DEFAULT_EVAL_TOKENS)
    n_calib = calibration_tokens or (block.calibrate.tokens if block.calibrate and block.calibrate.tokens
                                     else DEFAULT_CALIBRATION_TOKENS)
    calib_source = calib_node.source if calib_node else eval_source
    return _Layout(eval_source=eval_source, eval_span=eval_span,
                   calib_span=calib_node.span if calib_node else eval_span,
                   eval_windows=_windows_for(n_eval),
                   calib_mix=tuple(calibration_mix(calib_source, _windows_for(n_calib))))


def _calibration_text_hash(texts: list[str], layout: _Layout) -> str:
    digest = hashlib.sha256()
    for text, (source, windows) in zip(texts, layout.calib_mix):
        digest.update(_hash(text, f"calibration-odd|{source}", windows).encode())
    return digest.hexdigest()[:16]


def calibration_hash(plan, base_dir: Path, calibration_tokens: int | None = None) -> str:
    """The `text_hash` `plan_texts(...).calibration` will carry, without tokenising anything."""
    layout = _layout(plan, None, calibration_tokens)
    texts = [read_text(source, base_dir, layout.calib_span) for source, _n in layout.calib_mix]
    return _calibration_text_hash(texts, layout)


def _interleave(parts: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Rows taken from each part in turn (a, b, a, b, ...), so any half of the windows has every kind;
    and the part each row came from."""
    order, owner, cursor = [], [], [0] * len(parts)
    while any(c < p.shape[0] for c, p in zip(cursor, parts)):
        for i, part in enumerate(parts):
            if cursor[i] < part.shape[0]:
                order.append(part[cursor[i]])
                owner.append(i)
                cursor[i] += 1
    return torch.stack(order), owner


def plan_texts(plan, base_dir: Path, tokenizer, eval_tokens: int | None = None,
               calibration_tokens: int | None = None) -> PlanTexts:
    """Evaluation and calibration windows for a plan (`model { eval ...; calibrate ... }`).

    Defaults: `text:python-docs`, 2048 evaluation and 1024 calibration tokens; `tokens N` in the
    plan (or the arguments here, which win) sets the count, rounded up to whole windows. Calibration
    mixes the `calibrate` text with the built-in corpora of other kinds (`calibration_mix`) and takes
    the odd windows (1, 3, 5, ...) of each text; evaluation takes the even ones of its text when
    calibration reads that text too, else its first windows. So the two never overlap, and the
    calibration windows do not depend on the `eval` text.
    """
    layout = _layout(plan, eval_tokens, calibration_tokens)
    n_eval = layout.eval_windows
    eval_text = read_text(layout.eval_source, base_dir, layout.eval_span)
    parts, calib_texts = [], []
    for source, windows in layout.calib_mix:
        text = eval_text if source == layout.eval_source else read_text(source, base_dir, layout.calib_span)
        calib_texts.append(text)
        wanted = 2 * max(windows, n_eval if source == layout.eval_source else 0)
        both = tokenize_windows(text, tokenizer, wanted, source,
                                layout.eval_span if source == layout.eval_source else layout.calib_span)
        parts.append(both[1::2][:windows])
        if source == layout.eval_source:
            evaluation = both[0::2][:n_eval]
    if not layout.eval_shared:
        evaluation = tokenize_windows(eval_text, tokenizer, n_eval, layout.eval_source, layout.eval_span)
    shared = "shared" if layout.eval_shared else "own"
    mixed, owner = _interleave(parts)
    return PlanTexts(
        calibration=TokenWindows(mixed, "+".join(s for s, _n in layout.calib_mix),
                                 _calibration_text_hash(calib_texts, layout),
                                 sources=tuple(layout.calib_mix[i][0] for i in owner)),
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

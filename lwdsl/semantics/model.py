"""The model source and its texts exist: files and folders where the plan says, `arch:` ids in the
built-in catalog, `text:` sources readable (E250-E253). Paths resolve against the plan's folder."""
from __future__ import annotations

import difflib
from pathlib import Path

from lwdsl import ast
from lwdsl.errors import Diagnostic, Span
from lwdsl.semantics.context import Context, error

# `text:python-docs`: CPython's pydoc_data.topics, always present; `text:alice`: English prose shipped in
# lwdsl/data/texts (see its README)
BUILTIN_TEXTS = ("python-docs", "alice")
MODEL_FILE_CODES = ("E250", "E251", "E252")
_WANTS = {"gguf": "file", "config": "file", "hf": "folder"}


def resolve(location: str, base_dir: Path) -> Path:
    path = Path(location).expanduser()
    return path if path.is_absolute() else base_dir / path


def source_span(block: ast.ModelBlock) -> Span:
    """`model "SOURCE"` on its first line: where a caret under a model problem belongs."""
    span = block.span
    width = len('model ""') + len(block.source.replace("\\", "\\\\").replace('"', '\\"'))
    return Span(file=span.file, line=span.line, column=span.column, end_line=span.line, end_column=span.column + width)


def _model(block: ast.ModelBlock, context: Context) -> list[Diagnostic]:
    if block.scheme == "arch":
        from lwdsl.inventory import architecture_ids

        ids = architecture_ids()
        if block.location in ids:
            return []
        close = difflib.get_close_matches(block.location, ids, n=3)
        hint = f"did you mean {', '.join(f'`{c}`' for c in close)}?" if close else f"known: {', '.join(ids)}"
        return [error("E252", f"unknown architecture `{block.location}`", source_span(block), hint)]
    path = resolve(block.location, context.base_dir)
    wants = _WANTS[block.scheme]
    if not path.exists():
        from lwdsl.models.fetch import fetch_hint

        hint = fetch_hint(path) or ("paths are relative to the plan's folder"
                                    if not Path(block.location).is_absolute() else None)
        return [error("E250", f"the model {wants} `{block.location}` does not exist (looked at {path})", source_span(block),
                      hint)]
    if (wants == "file") != path.is_file():
        found = "a folder" if path.is_dir() else "not a regular file"
        return [error("E251", f"`{block.scheme}:` expects a {wants}, and `{block.location}` is {found}", source_span(block))]
    return []


def _text(source: ast.TextSource, context: Context) -> list[Diagnostic]:
    _, _, location = source.source.partition(":")
    if location in BUILTIN_TEXTS or not location:
        return []
    path = resolve(location, context.base_dir)
    if not path.is_file():
        return [error("E253", f"the text file `{location}` does not exist (looked at {path})", source.span,
                      f"use a file relative to the plan's folder, or a built-in text: "
                      f"{', '.join(f'`text:{t}`' for t in BUILTIN_TEXTS)}")]
    return []


def check(plan: ast.Plan, context: Context) -> list[Diagnostic]:
    found = _model(plan.model, context)
    for source in (plan.model.eval, plan.model.calibrate):
        if source is not None:
            found += _text(source, context)
    return found

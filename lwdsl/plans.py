"""A plan file, loaded: read, decoded, parsed and checked for meaning. Every later stage (estimate,
solve, apply, profile, check) starts here.

    plan_file = load_plan("plans/smollm2_edge.lwp")
    plan_file.plan, plan_file.base_dir, plan_file.sha256
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from lwdsl import ast
from lwdsl.errors import Diagnostic, LwdslError, Span


class PlanFile(BaseModel):
    """A plan that parsed and means something, with the file it came from."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    plan: ast.Plan
    path: Path
    text: str
    sha256: str
    base_dir: Path  # the plan's folder: model sources and texts resolve against it


def _position(data: bytes, offset: int) -> tuple[int, int]:
    line = data.count(b"\n", 0, offset) + 1
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    return line, column


def read_plan_text(path: str | Path) -> tuple[str, bytes]:
    """The text of a plan file; E110 missing, E111 not a file, E100 not UTF-8 text (positioned)."""
    path = Path(path)
    where = Span(file=str(path), line=1, column=1)
    if not path.exists():
        raise LwdslError(Diagnostic(code="E110", message=f"no plan file `{path}`", span=where,
                                    hint="check the path; plans end in `.lwp`"))
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise LwdslError(Diagnostic(code="E111", message=f"`{path}` is {kind}, not a plan file", span=where))
    try:
        data = path.read_bytes()
    except OSError as problem:
        raise LwdslError(Diagnostic(code="E111", message=f"cannot read `{path}`: {problem.strerror}", span=where))
    return decode_plan(data, str(path)), data


def decode_plan(data: bytes, file: str = "<plan>") -> str:
    """UTF-8 text without NUL bytes (a binary file is bad input like any other)."""
    if b"\x00" in data:
        line, column = _position(data, data.index(b"\x00"))
        raise LwdslError(Diagnostic(code="E100", message="this is a binary file, not a plan (it holds a NUL byte)",
                                    span=Span(file=file, line=line, column=column)))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as problem:
        line, column = _position(data, problem.start)
        raise LwdslError(Diagnostic(code="E100", message=f"the plan is not UTF-8 text (byte 0x{data[problem.start]:02x})",
                                    span=Span(file=file, line=line, column=column),
                                    hint="save the file as UTF-8")) from None
    return text.removeprefix("\ufeff")


def check_text(text: str, file: str, base_dir: Path) -> ast.Plan:
    """Parse and check meaning; one LwdslError holding every diagnostic, source attached. The plan comes
    back with its device groups written out (`lwdsl.groups`), as every later stage reads it."""
    from lwdsl.parse import parse_text
    from lwdsl.semantics import check_plan

    from lwdsl.groups import expand_plan

    plan = parse_text(text, file)
    diagnostics = check_plan(plan, base_dir)
    if any(d.severity == "error" for d in diagnostics):
        raise LwdslError(diagnostics, source=text)
    return expand_plan(plan)


def load_plan(path: str | Path) -> PlanFile:
    """Read, parse and check a plan file (LwdslError, exit 2, with every problem and the source)."""
    path = Path(path)
    text, data = read_plan_text(path)
    base_dir = path.resolve().parent
    plan = check_text(text, str(path), base_dir)
    return PlanFile(plan=plan, path=path, text=text, sha256=hashlib.sha256(data).hexdigest(), base_dir=base_dir)


def validate_plan(text_or_path: str | Path) -> list[Diagnostic]:
    """Every diagnostic of a plan text or file; `[]` when it is valid."""
    from lwdsl.parse import looks_like_path

    try:
        if looks_like_path(text_or_path):
            load_plan(text_or_path)
        else:
            check_text(text_or_path, "<plan>", Path.cwd())
    except LwdslError as problem:
        return problem.diagnostics
    return []

"""Positions, diagnostics and the one error type every stage raises.

Every problem a user can cause is a `Diagnostic`: a stable code, a message in words, the place in
the plan (`Span`) and a hint. `LwdslError` carries one or more of them and the exit code the CLI
returns. Exit codes are named here and nowhere else.
"""
from __future__ import annotations

from enum import IntEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict


class ExitCode(IntEnum):
    OK = 0
    UNMET = 1  # a requirement or gate not met: infeasible plan, failed check
    BAD_INPUT = 2  # syntax, meaning, missing file, unusable artifact


class Span(BaseModel):
    """Where a node or a problem sits in a source file (1-based line and column)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    file: str = "<plan>"
    line: int = 1
    column: int = 1
    end_line: int | None = None
    end_column: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class Diagnostic(BaseModel):
    """One problem: `E###` code, message, where, and what to do about it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    code: str
    message: str
    span: Span | None = None
    hint: str | None = None
    severity: Literal["error", "warning"] = "error"

    def render(self, source: str | None = None) -> str:
        """The message as a compiler prints it: place, message, source line, caret, hint.

        >>> Diagnostic(code="E001", message="boom", span=Span(file="p.lwp", line=1, column=3)).render("ab cd")
        'p.lwp:1:3: error E001: boom\\n  1 | ab cd\\n    |   ^'
        """
        where = f"{self.span}: " if self.span else ""
        lines = [f"{where}{self.severity} {self.code}: {self.message}"]
        if self.span and source is not None:
            source_lines = source.splitlines()
            if 1 <= self.span.line <= len(source_lines):
                text = source_lines[self.span.line - 1].expandtabs(1)
                gutter = str(self.span.line)
                lines.append(f"  {gutter} | {text}")
                width = 1
                if self.span.end_line == self.span.line and self.span.end_column:
                    width = max(1, self.span.end_column - self.span.column)
                lines.append(f"  {' ' * len(gutter)} | {' ' * (self.span.column - 1)}{'^' * width}")
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


class LwdslError(Exception):
    """The tool's own error: one or more diagnostics and the exit code they mean."""

    def __init__(
        self,
        diagnostics: Diagnostic | list[Diagnostic],
        exit_code: ExitCode = ExitCode.BAD_INPUT,
        source: str | None = None,
    ):
        self.diagnostics = [diagnostics] if isinstance(diagnostics, Diagnostic) else list(diagnostics)
        self.exit_code = exit_code
        self.source = source
        super().__init__("\n".join(d.render(source) for d in self.diagnostics))


def fail(code: str, message: str, span: Span | None = None, hint: str | None = None,
         exit_code: ExitCode = ExitCode.BAD_INPUT) -> LwdslError:
    """Build (not raise) an `LwdslError` with a single diagnostic: `raise fail(...)`."""
    return LwdslError(Diagnostic(code=code, message=message, span=span, hint=hint), exit_code)

"""`.lwp` text -> `ast.Plan`: a cached LALR parser (grammar/lwp.lark), a transformer that only shapes,
and syntax errors translated into words.

    >>> plan = parse_text('plan p { model "arch:gpt2" target { device c cpu "local" } }')
    >>> plan.model.location, plan.target.devices[0].kind
    ('gpt2', 'cpu')

Only syntax and the shape of values are checked here (units, whole numbers, blocks given twice);
meaning (names, ranges, files, catalogs, selectors) is `lwdsl.semantics`.
"""
from __future__ import annotations

import difflib
import re
import sys
import types
from functools import lru_cache
from pathlib import Path

from lark import Lark, Token
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from lwdsl import ast
from lwdsl.errors import Diagnostic, LwdslError, Span
from lwdsl.parse_shape import Shaper
from lwdsl.units import UNITS

GRAMMAR_NAME = "lwp.lark"

# Terminal names as a reader would say them (keywords are shown as written: `memory`).
TERMINAL_WORDS = {
    "NAME": "a name",
    "MODULE_NAME": "a module name",
    "STRING": "a quoted string",
    "NUMBER": "a number such as `8`",
    "QUANTITY": "a quantity such as `8 GiB`",
    "$END": "the end of the file",
}


def grammar_path() -> Path:
    """The grammar shipped in the package (wheel), else the checkout's top-level `grammar/`."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "grammar" / GRAMMAR_NAME, here.parent / "grammar" / GRAMMAR_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{GRAMMAR_NAME} is neither in {here / 'grammar'} nor in {here.parent / 'grammar'}")


class _AlwaysAcceptName:
    """Post-lexer whose only job is to make every lexer state know NAME, so that a keyword is matched
    as a whole word (`cpux` is a name, not `cpu` followed by `x`)."""

    always_accept = ("NAME",)

    def process(self, stream):
        return stream


@lru_cache(maxsize=1)
def parser() -> Lark:
    """The LALR parser, built once per process."""
    return Lark(grammar_path().read_text(encoding="utf-8"), parser="lalr", lexer="contextual",
                propagate_positions=True, postlex=_AlwaysAcceptName(), maybe_placeholders=False)


def parse_text(text: str, file: str = "<plan>") -> ast.Plan:
    """Parse one plan. Raises LwdslError (E1xx syntax, E2xx shape) with `source` attached."""
    return parse_with_layout(text, file)[0]


def parse_with_layout(text: str, file: str = "<plan>") -> tuple[ast.Plan, dict[str, Span]]:
    """`parse_text`, plus the spans of blocks the AST keeps only as their contents (`require`), for `fmt`."""
    try:
        tree = parser().parse(text)
    except UnexpectedInput as error:
        raise LwdslError(_syntax_diagnostic(error, text, file), source=text) from None
    except RecursionError:
        raise LwdslError(Diagnostic(code="E108", message="the plan is nested too deeply to read",
                                    span=Span(file=file)), source=text) from None
    shaper = Shaper(file, comments=scan_comments(text, file))
    try:
        plan = shaper.transform(tree)
    except RecursionError:
        raise LwdslError(Diagnostic(code="E108", message="the plan is nested too deeply to read",
                                    span=Span(file=file), hint="`within` blocks nest a few levels at most"),
                         source=text) from None
    if shaper.diagnostics:
        raise LwdslError(shaper.diagnostics, source=text)
    return plan, shaper.block_spans


_STRING_OR_COMMENT = re.compile(r'"(?:[^"\\\n]|\\.)*"?|#[^\n]*')


def scan_comments(text: str, file: str = "<plan>") -> tuple[ast.Comment, ...]:
    """Every `# ...` outside a string, with its place (comments never change a plan's meaning)."""
    comments = []
    for number, line in enumerate(text.split("\n"), start=1):
        if "#" not in line:
            continue
        for match in _STRING_OR_COMMENT.finditer(line):
            if match.group(0).startswith("#"):
                body = match.group(0)[1:].rstrip()
                span = Span(file=file, line=number, column=match.start() + 1, end_line=number,
                            end_column=match.start() + 2 + len(body))
                comments.append(ast.Comment(text=body, span=span))
                break
    return tuple(comments)


# --- syntax errors in words -------------------------------------------------------------------------

def _words(names) -> str:
    shown = sorted({_terminal_words(name) for name in names})
    if len(shown) > 1:  # the optional separators (and a group's `[`) are noise in a list of what could come next
        shown = [word for word in shown if word not in ("`;`", "`,`", "`[`")] or shown
    if len(shown) > 12:
        shown = shown[:12] + ["..."]
    if len(shown) <= 1:
        return "".join(shown)
    return ", ".join(shown[:-1]) + " or " + shown[-1]


def _terminal_words(name: str) -> str:
    if name in TERMINAL_WORDS:
        return TERMINAL_WORDS[name]
    try:
        pattern = parser().get_terminal(name).pattern
    except KeyError:
        return name.lower()
    return f"`{pattern.value}`" if pattern.type == "str" else name.lower()


def _parser_expects(error: UnexpectedToken) -> set[str]:
    """What the parser (not only the lexer state, which always knows NAME) accepts at the error."""
    expected = set(error.expected)
    try:
        narrowed = expected & set(error.interactive_parser.accepts())
    except Exception:  # noqa: BLE001 - an older lark without an interactive parser: keep the lexer's set
        return expected
    return narrowed or expected


def _found(token: Token) -> str:
    if token.type == "$END":
        return "the end of the file"
    if token.type == "STRING":
        return f"the string {token.value}"
    return f"`{token.value}`"


def _after_number(text: str, token: Token) -> bool:
    lines = text.split("\n")
    if not 1 <= token.line <= len(lines):
        return False
    before = lines[token.line - 1][: token.column - 1].rstrip()
    return bool(before) and before[-1].isdigit()


def _syntax_diagnostic(error: UnexpectedInput, text: str, file: str) -> Diagnostic:
    if isinstance(error, UnexpectedToken) and error.token.type != "$END":
        token = error.token
        span = Span(file=file, line=token.line, column=token.column, end_line=token.end_line,
                    end_column=token.end_column)
        close = [unit for unit in UNITS if unit.lower() == token.value.lower()]
        if token.type == "NAME" and close and _after_number(text, token):
            return Diagnostic(code="E104", message=f"unknown unit `{token.value}`", span=span,
                              hint=f"did you mean `{close[0]}`? Units are case-sensitive")
        expected = _parser_expects(error)
        keywords = [word.strip("`") for word in map(_terminal_words, expected) if word.startswith("`")]
        close = difflib.get_close_matches(token.value, keywords, n=1, cutoff=0.6) if token.type == "NAME" else []
        return Diagnostic(code="E102", message=f"expected {_words(expected)}, found {_found(token)}",
                          span=span, hint=f"did you mean `{close[0]}`?" if close else None)
    if isinstance(error, (UnexpectedToken, UnexpectedEOF)):
        lines = text.split("\n")
        line = max((number for number, content in enumerate(lines, start=1) if content.strip()), default=1)
        if not text.strip() or not any(not l.strip().startswith("#") for l in lines if l.strip()):
            return Diagnostic(code="E107", message="the file holds no plan: expected `plan NAME { ... }`",
                              span=Span(file=file, line=1, column=1))
        span = Span(file=file, line=line, column=len(lines[line - 1].rstrip()) + 1)
        expected = error.expected if error.expected else ["$END"]
        return Diagnostic(code="E103", message=f"the plan ends too early: expected {_words(expected)}",
                          span=span, hint="every `{` needs its `}`")
    assert isinstance(error, UnexpectedCharacters)
    span = Span(file=file, line=error.line, column=error.column)
    if error.char == '"':
        return Diagnostic(code="E106", message="this string is not closed on its line", span=span,
                          hint='a string is `"..."` on one line; write `\\"` for a quote and `\\\\` for a backslash')
    shown = repr(error.char) if not error.char.isprintable() else f"`{error.char}`"
    return Diagnostic(code="E101", message=f"unexpected character {shown}", span=span,
                      hint=f"expected {_words(error.allowed)}" if error.allowed else None)


# --- the facade: `lwdsl.parse(text_or_path)` --------------------------------------------------------

def looks_like_path(text_or_path) -> bool:
    """A Path, or a one-line string without braces (plan text always has a `{`)."""
    if isinstance(text_or_path, Path):
        return True
    return bool(text_or_path.strip()) and "\n" not in text_or_path and "{" not in text_or_path


def parse(text_or_path: str | Path) -> ast.Plan:
    """Parse plan text, or the plan file at a path (syntax and shape only; `lwdsl.validate` checks meaning)."""
    if looks_like_path(text_or_path):
        from lwdsl.plans import read_plan_text

        return parse_text(read_plan_text(text_or_path)[0], str(text_or_path))
    return parse_text(text_or_path)


class _CallableModule(types.ModuleType):
    """`lwdsl.parse` is this module once imported; calling it is `parse(text_or_path)`."""

    def __call__(self, text_or_path: str | Path) -> ast.Plan:
        return parse(text_or_path)


sys.modules[__name__].__class__ = _CallableModule

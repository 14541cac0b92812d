"""Golden diagnostics: each invalid snippet in tests/golden/invalid/ gives exactly the pinned
`CODE@line:column` list (tests/golden/invalid/expected.json), at once, without a traceback."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lwdsl.errors import LwdslError
from lwdsl.plans import load_plan

GOLDEN = Path(__file__).resolve().parent / "golden" / "invalid"
EXPECTED: dict[str, list[str]] = json.loads((GOLDEN / "expected.json").read_text())


def test_at_least_forty_snippets_all_pinned():
    files = sorted(p.stem for p in GOLDEN.glob("*.lwp"))
    assert len(files) >= 40
    assert files == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_snippet_diagnostics(name):
    with pytest.raises(LwdslError) as raised:
        load_plan(GOLDEN / f"{name}.lwp")
    error = raised.value
    assert [f"{d.code}@{d.span.line}:{d.span.column}" for d in error.diagnostics] == EXPECTED[name]
    assert error.exit_code == 2
    for diagnostic in error.diagnostics:
        assert diagnostic.span.file.endswith(f"{name}.lwp")
        rendered = diagnostic.render(error.source)
        assert diagnostic.code in rendered and diagnostic.message in rendered

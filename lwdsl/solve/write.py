"""Write a Solution to disk atomically (temporary file in the same folder, then rename)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from lwdsl.errors import fail
from lwdsl.solution import Solution


def write_solution(solution: Solution, path: str | Path) -> Path:
    """`solution.json` as `apply` reads it (`Solution.model_validate_json`); nothing half-written."""
    path = Path(path)
    if path.is_dir():
        raise fail("E504", f"--out names a folder: {path}", hint="give a file name such as solution.json")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise fail("E504", f"no such folder for --out: {folder}")
    fd, partial = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(solution.model_dump(mode="json"), handle, indent=2)
            handle.write("\n")
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return path

"""Atomic outputs for `lwdsl export`: everything is written under a temporary name next to the target
and renamed into place at the end, so a failed or killed export leaves nothing half-written.

    with output_file(Path("model.gguf")) as partial:   # write to `partial`
        ...
An existing target is an error (E682) unless `overwrite`; a folder target must not exist either.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lwdsl.errors import fail


def check_target(target: Path, overwrite: bool) -> None:
    """E682 when `target` exists and may not be replaced (or is of the other kind: file vs folder)."""
    if target.exists() and not overwrite:
        raise fail("E682", f"{target} exists; not overwriting it", hint="choose another -o or pass --force")
    if not target.parent.is_dir():
        raise fail("E682", f"{target.parent} is not a folder", hint="create it first or choose another -o")


@contextmanager
def output_file(target: Path):
    """A temporary file path next to `target`, renamed onto it when the block ends without error."""
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.partial-")
    os.close(fd)
    partial = Path(partial)
    try:
        yield partial
        partial.chmod(0o644)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def output_folder(target: Path):
    """A temporary folder next to `target`, renamed onto it (replacing an old one) at the end."""
    partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        yield partial
        partial.chmod(0o755)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(partial, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)

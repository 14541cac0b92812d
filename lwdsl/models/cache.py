"""The converted-model cache (`$LWDSL_CACHE/models`, default `~/.cache/lwdsl/models`): what is there,
and removing it. Entries are keyed by the source file's content (`lwdsl.models.load.cache_key`).

A source file's SHA-256 is remembered per (path, size, modification time) in `.sha256-index.json`
beside the entries, so an unchanged file is read in full once, not on every load. An entry is
removed under its conversion lock (a process converting or about to read it is not cut short):
renamed out of the way first, then deleted, so no half entry is ever visible under its name.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

_INDEX = ".sha256-index.json"
_MARKER = "lwdsl_source.json"


def models_root() -> Path:
    from lwdsl.models.load import cache_root

    return cache_root()


def _read_index(root: Path) -> dict[str, str]:
    try:
        data = json.loads((root / _INDEX).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's content, read once per (path, size, mtime) and remembered."""
    path = Path(path).resolve()
    stat = path.stat()
    identity = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    root = models_root()
    known = _read_index(root).get(identity)
    if known:
        return known
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    value = digest.hexdigest()
    try:  # remembered best-effort: a lost update only means one more read later
        root.mkdir(parents=True, exist_ok=True)
        index = {k: v for k, v in _read_index(root).items() if Path(k.rsplit("|", 2)[0]).exists()}  # gone files drop out
        index[identity] = value
        fd, partial = tempfile.mkstemp(dir=root, prefix=f"{_INDEX}.partial-")
        with os.fdopen(fd, "w") as out:
            json.dump(index, out, indent=0)
        os.replace(partial, root / _INDEX)
    except OSError:
        pass
    return value


class CacheEntry(BaseModel):
    """One converted model (or a leftover: a partial conversion, an entry of an older format)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    key: str  # the folder's name
    bytes: int
    source: str | None = None  # the file it was converted from (as first seen)
    sha256: str | None = None  # the source's content hash (None: an entry of the old path-keyed format)
    cache_format: int | None = None
    modified: float = 0.0  # seconds since the epoch
    state: str = "ok"  # "ok", "stale" (older format: never read again), "partial" (an unfinished conversion)


def _folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += (Path(dirpath) / name).stat().st_size
            except OSError:
                pass
    return total


def list_entries() -> list[CacheEntry]:
    """Every entry under the cache root, largest first."""
    from lwdsl.models.load import CACHE_FORMAT

    root = models_root()
    if not root.is_dir():
        return []
    entries = []
    for folder in root.iterdir():
        if not folder.is_dir():
            continue
        marker: dict = {}
        try:
            marker = json.loads((folder / _MARKER).read_text())
        except (OSError, ValueError):
            pass
        fmt = marker.get("cache_format")
        state = "partial" if not marker else ("ok" if fmt == CACHE_FORMAT else "stale")
        entries.append(CacheEntry(key=folder.name, bytes=_folder_bytes(folder), source=marker.get("source"),
                                  sha256=marker.get("sha256"), cache_format=fmt,
                                  modified=folder.stat().st_mtime, state=state))
    return sorted(entries, key=lambda e: (-e.bytes, e.key))


def remove_entry(key: str) -> bool:
    """Remove one entry under its conversion lock; False when there is none of that name."""
    root = models_root()
    folder = root / key
    if "/" in key or key in ("", ".", "..") or not folder.is_dir():
        return False
    lock_path = root / f".{key}.lock"
    if key.startswith("."):  # a partial conversion: its owner holds the lock of the entry it makes
        lock_path = root / f"{key.split('.partial-')[0]}.lock"
    with open(lock_path, "a") as lock:
        if key.startswith("."):
            try:  # still being written by a live process: leave it
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
        else:
            fcntl.flock(lock, fcntl.LOCK_EX)
        doomed = root / f".{key}.removing-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.replace(folder, doomed)
        except OSError:
            return False
    shutil.rmtree(doomed, ignore_errors=True)
    return True

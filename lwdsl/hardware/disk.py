"""The local disk's figures for `device NAME disk "local"`: the rate streamed offload reads it at.

Disk-offloaded blocks are read past the page cache (`lwdsl.apply.offload.TensorFile(direct=True)`),
one block's tensors in one request of a few MiB, so that is what is timed here: O_DIRECT reads of
`CHUNK` bytes from a file written for the purpose on the file system of `folder` (lwdsl's cache
folder, `$LWDSL_CACHE`: point it at the disk the artifacts live on). The rate is the median of
`PASSES` passes; the memory is the file system's free space. Where O_DIRECT is refused (tmpfs), the
file is dropped from the page cache before each pass and read buffered.

    figures = measure_disk(Path("~/.cache/lwdsl").expanduser())
"""
from __future__ import annotations

import mmap
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

FILE_BYTES = 128 << 20
CHUNK = 4 << 20  # about one transformer block of a small model's int8 weights (SmolLM2: 3.5 MB)
PASSES = 5


def _write_file(folder: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=folder, prefix=".lwdsl-disk-probe-")
    block = os.urandom(CHUNK)  # incompressible: a disk that compresses must not look faster
    with os.fdopen(fd, "wb") as handle:
        for _ in range(FILE_BYTES // CHUNK):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(name)


def _read_pass(path: Path, buffer: mmap.mmap, direct: bool = True) -> float:
    """Seconds to read the whole file in `CHUNK` requests, past the page cache."""
    view = memoryview(buffer)
    flag = getattr(os, "O_DIRECT", 0) if direct else 0
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError:
        fd, flag = os.open(path, os.O_RDONLY), 0
    try:
        if not flag and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        for offset in range(0, FILE_BYTES, CHUNK):
            done = 0
            while done < CHUNK:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise OSError(f"short read of {path}")
                done += got
        return time.perf_counter() - start
    finally:
        os.close(fd)


def measure_disk(folder: Path) -> dict[str, Any]:
    """The disk holding `folder`: streamed read rate (bytes/s) and free bytes, as probe figures."""
    folder.mkdir(parents=True, exist_ok=True)
    path = _write_file(folder)
    buffer = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    try:
        try:
            seconds = [_read_pass(path, buffer) for _ in range(PASSES)]
        except OSError:  # O_DIRECT opened but refused to read (as the streamer then falls back too)
            seconds = [_read_pass(path, buffer, direct=False) for _ in range(PASSES)]
    finally:
        buffer.close()
        path.unlink(missing_ok=True)
    rate = FILE_BYTES / statistics.median(seconds)
    return {"kind": "disk", "memory_bytes": int(shutil.disk_usage(folder).free), "bandwidth_Bps": rate,
            "rates": {}, "passes_Bps": [FILE_BYTES / s for s in seconds],
            "source": f"measured by lwdsl probe: {CHUNK >> 20} MiB reads past the page cache in {folder}"}

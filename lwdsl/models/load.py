"""A runnable torch model (and its tokenizer) from a plan's `model` block.

`hf:DIR` loads the folder as it is. `gguf:FILE` is dequantised by transformers once (about 25 s
here) and kept as an ordinary safetensors Hugging Face folder in a cache, so every later load is a
plain, fast `from_pretrained`. The cache key is the GGUF file's content (its SHA-256, remembered per
path, size and modification time in `lwdsl.models.cache` so an unchanged file is hashed once): the
same file copied into several folders converts once (`lwdsl cache` lists and clears the cache);
the cache folder is written to a temporary name and renamed into place, so a killed conversion never
leaves a half folder, and the source file is only ever read. `arch:` and `config:` sources have no
weights: asking to load them is a user error, not a crash.

    model, tokenizer = load_model(plan.model, plan_dir)
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from lwdsl import ast
from lwdsl.errors import fail

CACHE_FORMAT = 2  # bump when the layout of a cached folder changes (2: keyed by content)
_MARKER = "lwdsl_source.json"


def cache_root() -> Path:
    """Where converted models live: `$LWDSL_CACHE/models`, default `~/.cache/lwdsl/models`."""
    base = os.environ.get("LWDSL_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "lwdsl"
    return root / "models"


def source_path(block: ast.ModelBlock, base_dir: Path) -> Path:
    """The file or folder a weight-bearing model block names, resolved against the plan's folder."""
    if block.scheme in ("arch", "config"):
        raise fail(
            "E320",
            f"model {block.source!r} has no weights: `apply`, `run` and `check` need weights",
            block.span,
            hint='point `model` at weights ("hf:DIR" or "gguf:FILE"); `solve` works without them',
        )
    path = Path(block.location).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    if block.scheme == "gguf" and not path.is_file():
        from lwdsl.models.fetch import fetch_hint

        raise fail("E321", f"GGUF file not found: {path}", block.span,
                   hint=fetch_hint(path) or "fetch it with `python -m lwdsl.models.fetch --dest models`")
    if block.scheme == "hf" and not (path / "config.json").is_file():
        raise fail("E322", f"not a Hugging Face model folder (no config.json): {path}", block.span)
    return path


def cache_key(gguf_file: Path) -> str:
    """The cache folder's name for a GGUF file: its content's SHA-256 (and the cache format), so copies
    of one file in different folders share one conversion and an edited file gets a new one."""
    from lwdsl.models.cache import file_sha256

    digest = file_sha256(gguf_file)
    return hashlib.sha256(f"{CACHE_FORMAT}|{digest}".encode()).hexdigest()[:20]


def cached_hf_folder(block: ast.ModelBlock, base_dir: Path) -> Path:
    """The safetensors Hugging Face folder for this block, converting a GGUF file once.

    For `hf:` the folder itself is returned. For `gguf:` the cached conversion is returned,
    created on first use.
    """
    path = source_path(block, base_dir)
    if block.scheme == "hf":
        return path
    target = cache_root() / cache_key(path)
    if (target / _MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # several processes (torchrun ranks, parallel tests) may ask at once: one converts, the rest wait
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / _MARKER).is_file():
            _convert_gguf(path, target)
    return target


def load_model(block: ast.ModelBlock, base_dir: Path, dtype=None):
    """`(model, tokenizer)` for a weight-bearing model block, in eval mode, on the CPU.

    `dtype` defaults to `torch.float32`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cached_hf_folder(block, base_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as error:
        raise fail("E323", f"cannot load the model from {folder}: {error}", block.span) from None
    model.eval()
    model.requires_grad_(False)  # lwdsl only runs models: no autograd bookkeeping, inference tensors work
    return model, tokenizer


def _convert_gguf(gguf_file: Path, target: Path) -> None:
    """Dequantise `gguf_file` with transformers and save it as safetensors at `target`, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_file.parent, gguf_file.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise fail("E324", f"cannot read the GGUF file {gguf_file}: {error}") from None
    # The weights are plain floats now; transformers refuses to save while the GGUF quantizer is
    # still attached, and a saved `quantization_config` would make the next load look for the GGUF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        partial.chmod(0o755)
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        stat = gguf_file.stat()
        from lwdsl.models.cache import file_sha256

        marker = {"source": str(gguf_file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                  "sha256": file_sha256(gguf_file), "cache_format": CACHE_FORMAT}
        (partial / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.replace(partial, target)
        except OSError:
            if not (target / _MARKER).is_file():  # another process did not win the race either
                raise
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise

"""`lwdsl export`: an artifact in a format other runtimes load, written atomically.

    lwdsl.export("out/edge", "gguf", "edge.gguf")      # llama.cpp, ollama, LM Studio, llamafile
    lwdsl.export("out/edge", "hf", "edge-hf")          # transformers, vLLM, TGI (float weights)

Each format is a writer registered in `WRITERS`; this module checks the input, gives the writer a
temporary path next to the output and renames it into place at the end (nothing is left on failure).
Nothing in lwdsl imports this package: it only reads artifacts (`lwdsl.artifact`).
"""
from __future__ import annotations

import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lwdsl.errors import fail
from lwdsl.export.atomic import check_target, output_file, output_folder


@dataclass(frozen=True)
class ExportResult:
    format: str
    path: Path
    bytes: int
    summary: list[str] = field(default_factory=list)  # lines for the user
    detail: object = None  # the writer's own result record


def _gguf(view, partial: Path, options: dict):
    from lwdsl.export.gguf_file import write_gguf
    from lwdsl.export.source import source_gguf

    source = source_gguf(view, options.get("source"))
    result = write_gguf(view, partial, source, requantize=options.get("requantize", False),
                        progress=options.get("progress"))
    lines = [f"tensors: " + ", ".join(f"{n} x {t}" for t, n in sorted(result.types.items())),
             f"metadata and tokenizer from {source}"]
    if len(set(result.feed_forward)) > 1:
        lines.append(f"MLP widths {min(result.feed_forward)}..{max(result.feed_forward)} per layer: padded with "
                     f"zero channels to {max(result.feed_forward)} (exact; llama.cpp builds every llama layer "
                     f"at one feed_forward_length)")
    elif result.feed_forward:
        lines.append(f"feed_forward_length: {result.feed_forward[0]}")
    for item in result.requantized:
        lines.append(f"re-quantized {item.name}: {item.stored} -> {item.gguf_type} (predicted perplexity "
                     f"share {item.ppl_before:+.3%} -> {item.ppl_after:+.3%}, priors; a second rounding adds to it)")
    return lines, result


def _hf(view, partial: Path, options: dict):
    from lwdsl.export.hf import write_hf

    result = write_hf(view, partial, dtype=options.get("dtype"))
    return result.summary, result


def _hf_quantized(view, partial: Path, options: dict):
    from lwdsl.export.hf_quantized import write_hf_quantized

    result = write_hf_quantized(view, partial, dtype=options.get("dtype"))
    return result.summary, result


# format -> (writes a folder?, writer(view, partial path, options) -> (summary lines, detail))
WRITERS: dict[str, tuple[bool, Callable]] = {
    "gguf": (False, _gguf),
    "hf": (True, _hf),
    "hf-quantized": (True, _hf_quantized),
}


def export(directory, format: str, output, *, requantize: bool = False, source=None, force: bool = False,
           dtype: str | None = None, progress=None) -> ExportResult:
    """Write the artifact at `directory` as `format` to `output`; the result names what was written."""
    from lwdsl.export.view import read_view

    if format not in WRITERS:
        raise fail("E680", f"unknown export format {format!r}", hint=f"formats: {', '.join(WRITERS)}")
    folder, writer = WRITERS[format]
    target = Path(output).expanduser().resolve()
    check_target(target, force)
    view = read_view(directory)
    options = {"requantize": requantize, "source": source, "dtype": dtype, "progress": progress}
    if folder:
        with output_folder(target) as partial:
            lines, detail = writer(view, partial, options)
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    else:
        with output_file(target) as partial:
            lines, detail = writer(view, partial, options)
        size = target.stat().st_size
    return ExportResult(format, target, size, lines, detail)


class _CallableModule(types.ModuleType):
    """`lwdsl.export(directory, format, output, ...)` is the facade; `lwdsl.export.*` the package."""

    def __call__(self, directory, format: str, output, **options) -> ExportResult:
        return export(directory, format, output, **options)


sys.modules[__name__].__class__ = _CallableModule

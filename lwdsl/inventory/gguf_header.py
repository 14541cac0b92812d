"""A GGUF file's metadata and tensor infos, read without touching its arrays or weights.

`gguf.GGUFReader` parses every field into numpy views, the tokenizer's ~50k-entry string arrays
included: 2.2 s for SmolLM2's header, paid by every command that reads the plan's model. The
inventory needs only the scalar metadata and the tensors' names, types and shapes, so this reader
walks the header (GGUF v2/v3: little-endian; magic, version, tensor count, key/value count, the
key/values, then the tensor infos) and steps over arrays by their element size, or string by string.

    header = read_header(Path("model.gguf"))
    header.fields["llama.block_count"]          # 30
    header.tensors[0]                           # TensorInfo('token_embd.weight', 'Q8_0', (49152, 576), ...)
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

# GGUF value types: the struct format of each fixed-size scalar (8 = string, 9 = array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str            # the GGML type (`Q4_1`, `F32`, ...)
    shape: tuple[int, ...]    # outermost first (as torch writes it; GGUF stores the innermost first)
    n_bytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    fields: dict[str, Any]    # scalar and string values; arrays are left out
    tensors: list[TensorInfo]


class _Reader:
    def __init__(self, stream: BinaryIO):
        self.stream = stream

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = self.stream.read(size)
        if len(data) != size:
            raise ValueError("the file ends inside its header")
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        length = self.take("<Q")
        if length > 1 << 30:
            raise ValueError(f"a string of {length} bytes")
        data = self.stream.read(length)
        if len(data) != length:
            raise ValueError("the file ends inside its header")
        return data.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        raise ValueError(f"unknown GGUF value type {kind}")

    def skip_array(self) -> None:
        kind, count = self.take("<I"), self.take("<Q")
        if kind in _SCALARS:
            self.stream.seek(count * struct.calcsize(_SCALARS[kind]), 1)
        elif kind == _STRING:
            for _ in range(count):
                self.stream.seek(self.take("<Q"), 1)
        elif kind == _ARRAY:
            for _ in range(count):
                self.skip_array()
        else:
            raise ValueError(f"unknown GGUF array type {kind}")


def read_header(path: Path) -> GGUFHeader:
    """The metadata and tensor infos of the GGUF file at `path`; ValueError when it is not one."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as stream:
        reader = _Reader(stream)
        if stream.read(4) != b"GGUF":
            raise ValueError("not a GGUF file (no GGUF magic)")
        version = reader.take("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (2 and 3 are read)")
        tensor_count, field_count = reader.take("<Q"), reader.take("<Q")
        fields: dict[str, Any] = {}
        for _ in range(field_count):
            key, kind = reader.string(), reader.take("<I")
            if kind == _ARRAY:
                reader.skip_array()
            else:
                fields[key] = reader.value(kind)
        tensors = []
        for _ in range(tensor_count):
            name, dims = reader.string(), reader.take("<I")
            shape = tuple(reader.take("<Q") for _ in range(dims))
            type_code, _offset = reader.take("<I"), reader.take("<Q")
            try:
                ggml_type = GGMLQuantizationType(type_code)
            except ValueError:
                raise ValueError(f"tensor {name}: unknown GGML type {type_code}") from None
            block, block_bytes = GGML_QUANT_SIZES[ggml_type]
            elements = 1
            for d in shape:
                elements *= d
            tensors.append(TensorInfo(name, ggml_type.name, tuple(reversed(shape)), elements // block * block_bytes))
    return GGUFHeader(version, fields, tensors)

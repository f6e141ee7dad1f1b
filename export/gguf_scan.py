"""A bounded walk over a GGUF header before gguf-py's `GGUFReader` sees it.

GGUFReader trusts the header's counts: an array claiming 2^32 entries in a 100 KB file
makes it loop and allocate for minutes before it fails. This walk reads the same layout
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md: magic, version, tensor count,
key/value count, the key/values, the tensor infos, the aligned data section) and checks
every count and length against the bytes left in the file before stepping over it, so a
hostile header costs at most one pass over the file and fails with the field it broke.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from fanformer.errors import FANformerError
from fanformer.export import gguf_format as names

# Bytes of each fixed-size value type; strings and arrays are walked.
_SCALAR = {GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1, GGUFValueType.UINT16: 2,
           GGUFValueType.INT16: 2, GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
           GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8}
_MIN_KV = 8 + 4 + 1  # key length, value type, a one-byte value
_MIN_TENSOR_INFO = 8 + 4 + 4 + 8  # name length, n_dims, type, offset (and no dims)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 2  # an array of arrays is legal; deeper nesting only makes gguf-py recurse
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ne, as stored (ne[0] first)
    type: GGMLQuantizationType
    offset: int  # from the start of the data section
    n_bytes: int


class _Cursor:
    def __init__(self, data, path: Path):
        self.data, self.pos, self.path = data, 0, path

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> int:
        """Step over n bytes, or fail naming `what`; returns where they start."""
        if n > self.left:
            raise FANformerError(f"{self.path}: {what} needs {n:,} bytes but only {self.left:,} are left in the "
                                 "file; it is truncated or its header is damaged")
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str, what: str):
        return struct.unpack_from("<" + fmt, self.data, self.take(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.unpack("Q", f"{what}'s length")
        raw = bytes(self.data[self.take(length, what):self.pos])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FANformerError(f"{self.path}: {what} is not UTF-8; the header is damaged") from None

    def count(self, what: str, least_bytes: int) -> int:
        """A count field, checked against the bytes its items need at least."""
        n = self.unpack("Q", what)
        if n * least_bytes > self.left:
            raise FANformerError(f"{self.path}: {what} is {n:,}, but the {self.left:,} bytes left in the file hold "
                                 f"at most {self.left // least_bytes:,}; the header is damaged")
        return n

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.unpack("I", what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise FANformerError(f"{self.path}: {what} is {raw}, not a GGUF value type; the header is damaged") from None


def _skip_value(cur: _Cursor, kind: GGUFValueType, key: str, depth: int = 0):
    """Step over one value; return it when it is a scalar or string (for general.alignment)."""
    if kind in _SCALAR:
        return cur.data[cur.take(_SCALAR[kind], f"key {key}"):cur.pos]
    if kind == GGUFValueType.STRING:
        return cur.string(f"key {key}")
    if depth >= _MAX_NESTING:
        raise FANformerError(f"{cur.path}: key {key} nests arrays {depth + 1} deep; the header is damaged")
    item = cur.value_type(f"key {key}'s element type")
    n = cur.count(f"key {key}'s element count", _SCALAR.get(item, 8))  # a string or array takes 8 at least
    if item in _SCALAR:
        cur.take(n * _SCALAR[item], f"key {key}'s {n:,} elements")
    else:
        for _ in range(n):
            _skip_value(cur, item, key, depth + 1)
    return None


def scan_gguf(path: Path) -> list[TensorInfo]:
    """Walk the whole header of the GGUF file at `path` within its bytes; the tensor infos,
    each checked to lie within the data section. Raises FANformerError naming the field."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            raise FANformerError(f"{path} is empty: it is not a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _scan(_Cursor(data, path))


def _scan(cur: _Cursor) -> list[TensorInfo]:
    path = cur.path
    cur.take(8, "the magic and version")  # open_gguf has checked them
    n_tensors = cur.count("the tensor count", _MIN_TENSOR_INFO)
    n_kv = cur.count("the key/value count", _MIN_KV)
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = cur.string(f"key/value {i}'s key")
        kind = cur.value_type(f"key {key}'s type")
        value = _skip_value(cur, kind, key)
        if key == names.GENERAL_ALIGNMENT:
            alignment = _alignment(value, kind, path)
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor {i}'s name")
        n_dims = cur.unpack("I", f"tensor {name}'s dimension count")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise FANformerError(f"{path}: tensor {name} has {n_dims} dimensions; GGUF allows 1 to {_MAX_DIMS}")
        dims = tuple(cur.unpack("Q", f"tensor {name}'s shape") for _ in range(n_dims))
        raw_type = cur.unpack("I", f"tensor {name}'s type")
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise FANformerError(f"{path}: tensor {name} has type {raw_type}, not a ggml type this tool knows") from None
        offset = cur.unpack("Q", f"tensor {name}'s offset")
        elements = 1
        for d in dims:
            elements *= d
        if dims[0] % block:
            raise FANformerError(f"{path}: tensor {name}'s rows of {dims[0]} are not whole {qtype.name} blocks "
                                 f"of {block}")
        infos.append(TensorInfo(name, dims, qtype, offset, elements // block * type_size))
    data_start = -(-cur.pos // alignment) * alignment
    size = len(cur.data)
    for t in infos:
        if data_start + t.offset + t.n_bytes > size:
            raise FANformerError(f"{path}: tensor {t.name} needs bytes up to {data_start + t.offset + t.n_bytes:,} "
                                 f"but the file has {size:,}; it is truncated or its header is damaged")
    if len({t.name for t in infos}) != len(infos):
        raise FANformerError(f"{path}: two tensors share a name; the header is damaged")
    return infos


def _alignment(value, kind: GGUFValueType, path: Path) -> int:
    if kind != GGUFValueType.UINT32:
        raise FANformerError(f"{path}: general.alignment must be a uint32")
    alignment = struct.unpack("<I", value)[0]
    if alignment == 0 or alignment & (alignment - 1):
        raise FANformerError(f"{path}: general.alignment is {alignment}, not a power of two")
    return alignment

"""A validating reader for a GGUF file's header: metadata and tensor table, never the weights.

In:  the path of a file that claims to be GGUF (v2 or v3).
Out: `GGUFHeader` with the metadata key/values, one `TensorInfo` per tensor
     (name, numpy-order shape, GGML type, offset, byte size), where the
     tensor data starts and the file size.

Why our own parser: gguf-py's `GGUFReader` trusts its input (a header claiming
2**60 tensors makes it allocate or loop for ever).  Here every count and
length is checked against the bytes left in the file *before* it is used, so a
hostile or truncated file costs at most one pass over its real bytes and
fails with one `InputError` line.  The file is memory-mapped; only the header
pages are touched.

Layout (gguf.cpp / docs/gguf.md in llama.cpp), all little-endian:
    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv × (string key | u32 value type | value)
    n_tensors × (string name | u32 n_dims | n_dims × u64 ne | u32 ggml type | u64 offset)
    padding to `general.alignment` (default 32) | tensor data
    string = u64 length | bytes (UTF-8, no terminator)
    array  = u32 element type | u64 count | elements
"""

from __future__ import annotations

import mmap
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from alpaca_local.errors import InputError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts and is long gone
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT (ggml/include/gguf.h)

# Sanity caps, far above any real model and small enough to keep work bounded.
MAX_TENSORS = 1 << 20  # a 405B model has ~1.1k tensors
MAX_KV = 1 << 16  # real files have ~30-50 keys
MAX_STRING = 1 << 24  # 16 MiB: chat templates are ~10 KiB
MAX_ARRAY = 1 << 24  # token lists: 32k (LLaMA) to 256k (Gemma)
MAX_DIMS = 4  # GGML_MAX_DIMS (ggml/include/ggml.h)
MAX_ALIGNMENT = 1 << 16

# GGUF value types (enum gguf_type in ggml/include/gguf.h) -> struct format.
_SCALARS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool",
               8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}

Value = Union[int, float, bool, str, list]


def printable(value: object, limit: int = 60) -> str:
    """A value from the file, fit for a one-line message: repr() escapes newlines and
    terminal control codes, and a 16 MiB key or token list is cut to `limit` characters."""
    text = repr(value[:limit + 1] if isinstance(value, (str, list)) else value)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: shape[-1] is ggml's ne[0] (the row length)
    ggml_type: GGMLQuantizationType
    offset: int  # from the start of the tensor data section
    nbytes: int  # ggml_nbytes: bytes of data, without alignment padding
    part: int = 0  # which file of a split model holds it (convert/split.py), 0 for a single file


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    kv: dict[str, Value]
    tensors: tuple[TensorInfo, ...]
    alignment: int
    data_offset: int  # absolute file offset where tensor data starts
    file_size: int  # of a split model (convert/split.py): all parts together
    # A split model's files: (path, data_offset, size) of each part, first part first; () for one file.
    parts: tuple[tuple[Path, int, int], ...] = ()

    @property
    def arch(self) -> str:
        arch = self.kv.get("general.architecture")
        if not isinstance(arch, str):
            raise InputError(f"{self.path}: general.architecture is missing; not a model file")
        # It becomes part of key names and messages: a plain identifier only.
        if not (0 < len(arch) <= 64 and arch.isascii() and arch.replace("_", "").replace("-", "").isalnum()):
            raise InputError(f"{self.path}: general.architecture = {printable(arch)} is not an architecture name")
        return arch

    def get_int(self, key: str, default: int | None = None) -> int:
        """An integer key (arrays: first element, as llama.cpp's per-layer keys allow)."""
        value = self.kv.get(key, default)
        if isinstance(value, list) and value:
            value = value[0]
        if value is None or isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{self.path}: metadata {key} = {printable(value)} is not an integer")
        return value

    @property
    def tensor_data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def header_bytes(self) -> int:
        """Bytes before the tensor data, of every part of a split model."""
        return sum(p[1] for p in self.parts) if self.parts else self.data_offset


class _Cursor:
    """Bounds-checked little-endian reads over a memory map."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> InputError:
        return InputError(f"{self.path}: not a valid GGUF file ({what} at byte {self.pos})")

    def remaining(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.remaining():
            raise self.fail(f"truncated: {what} needs {n} bytes, {self.remaining()} left")
        start = self.pos
        self.pos += n
        return self.buf[start : self.pos]

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def count(self, what: str, cap: int, min_item_bytes: int) -> int:
        """A u64 count, checked against a cap and against the bytes left."""
        n = self.u64(what)
        if n > cap or n * min_item_bytes > self.remaining():
            raise self.fail(f"{what} = {n} is impossible for a file of {self.size} bytes")
        return n

    def string(self, what: str) -> str:
        n = self.count(f"{what} length", MAX_STRING, 1)
        return self.take(n, what).decode("utf-8", errors="replace")


def _value(cur: _Cursor, vtype: int, label: str, nested: bool = False) -> Value:
    if vtype in _SCALARS:
        return cur.scalar(_SCALARS[vtype], label)
    if vtype == _STRING:
        return cur.string(label)
    if vtype == _ARRAY and not nested:
        etype = cur.u32(f"{label} element type")
        if etype == _ARRAY:
            raise cur.fail(f"{label} is an array of arrays")
        min_size = 8 if etype == _STRING else struct.calcsize(_SCALARS.get(etype, "<B"))
        if etype not in _SCALARS and etype != _STRING:
            raise cur.fail(f"{label} has unknown element type {etype}")
        n = cur.count(f"{label} array length", MAX_ARRAY, min_size)
        if etype == _STRING:
            return _string_array(cur, n, label)
        fmt = _SCALARS[etype]
        return list(struct.unpack(f"<{n}{fmt[1]}", cur.take(n * min_size, label)))
    raise cur.fail(f"{label} has unknown value type {vtype}")


def _string_array(cur: _Cursor, n: int, label: str) -> list[str]:
    """`n` strings (token lists: tens of thousands), each length checked before use; a tight loop."""
    buf, pos, size, out = cur.buf, cur.pos, cur.size, []
    unpack = struct.Struct("<Q").unpack_from
    for _ in range(n):
        if pos + 8 > size:
            break
        length = unpack(buf, pos)[0]
        if length > MAX_STRING or pos + 8 + length > size:
            break
        out.append(buf[pos + 8 : pos + 8 + length].decode("utf-8", errors="replace"))
        pos += 8 + length
    cur.pos = pos
    if len(out) < n:
        raise cur.fail(f"truncated: string {len(out)} of {label}")
    return out


def _tensor_info(cur: _Cursor, index: int) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
    name = cur.string(f"tensor {index} name")
    label = printable(name)
    n_dims = cur.u32(f"tensor {label} n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {label} has {n_dims} dimensions (ggml allows 1 to {MAX_DIMS})")
    ne = [cur.u64(f"tensor {label} dims") for _ in range(n_dims)]
    raw_type = cur.u32(f"tensor {label} type")
    offset = cur.u64(f"tensor {label} offset")
    try:
        ggml_type = GGMLQuantizationType(raw_type)
        GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {label} has unknown ggml type {raw_type}") from None
    if any(d == 0 or d >= 1 << 62 for d in ne):
        raise cur.fail(f"tensor {label} has dimensions {ne}")
    return name, tuple(reversed(ne)), ggml_type, offset


def _nbytes(name: str, shape: tuple[int, ...], ggml_type: GGMLQuantizationType, cur: _Cursor) -> int:
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    if shape[-1] % block:
        raise cur.fail(
            f"tensor {printable(name)} row length {shape[-1]} is not a multiple of {ggml_type.name}'s block {block}"
        )
    n = shape[-1] // block * type_size
    for d in shape[:-1]:
        n *= d
        if n > cur.size:  # stop before the product grows absurd
            break
    return n


def _parse(cur: _Cursor) -> tuple[int, dict[str, Value], list, int]:
    if cur.size < 4 or cur.take(4, "magic") != GGUF_MAGIC:
        raise InputError(f"{cur.path} is not a GGUF file (it does not start with 'GGUF')")
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise InputError(f"{cur.path}: GGUF version {version} is not supported (expected 2 or 3)")
    n_tensors = cur.count("tensor count", MAX_TENSORS, 24)  # smallest tensor info is 24+ bytes
    n_kv = cur.count("metadata count", MAX_KV, 12)  # u64 key length + u32 type
    kv: dict[str, Value] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key")
        label = f"metadata key {printable(key)}"
        kv[key] = _value(cur, cur.u32(f"{label} type"), label)
    infos = [_tensor_info(cur, i) for i in range(n_tensors)]
    return version, kv, infos, cur.pos


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Read and check a GGUF file's header and tensor table (no tensor data is read)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError
        if not stat.S_ISREG(mode):  # opening a FIFO blocks; a device may never end
            raise InputError(f"{path} is not a regular file, so not a GGUF model")
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise InputError(f"{path} is not a GGUF file ({size} bytes; truncated or empty)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                cur = _Cursor(buf, path)
                version, kv, infos, end = _parse(cur)
                return _check_layout(cur, path, version, kv, infos, end)
    except FileNotFoundError:
        raise InputError(f"{path} not found") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a folder, not a GGUF file") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc


def _check_layout(cur: _Cursor, path: Path, version: int, kv: dict, infos: list, end: int) -> GGUFHeader:
    alignment = kv.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or not 0 < alignment <= MAX_ALIGNMENT \
            or alignment & (alignment - 1):
        raise InputError(f"{path}: general.alignment = {printable(alignment)} is not a power of two")
    data_offset = (end + alignment - 1) // alignment * alignment
    data_size = cur.size - data_offset
    tensors, seen = [], set()
    for name, shape, ggml_type, offset in infos:
        if name in seen:
            raise InputError(f"{path}: tensor {printable(name)} appears twice")
        seen.add(name)
        nbytes = _nbytes(name, shape, ggml_type, cur)
        if offset % alignment:
            raise InputError(f"{path}: tensor {printable(name)} offset {offset} is not aligned to {alignment}")
        if offset + nbytes > data_size:
            raise InputError(
                f"{path}: tensor {printable(name)} ends at byte {data_offset + offset + nbytes} but the file has "
                f"{cur.size} bytes (truncated download?)"
            )
        tensors.append(TensorInfo(name, shape, ggml_type, offset, nbytes))
    return GGUFHeader(path, version, kv, tuple(tensors), alignment, data_offset, cur.size)

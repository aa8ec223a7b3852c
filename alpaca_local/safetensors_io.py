"""Index a .safetensors file into `TensorRef`s, trusting nothing in it.

Why not `safetensors.safe_open`: its numpy side has no bfloat16 and copies each
tensor into memory, while we want a byte range to memory-map. The format is
small enough to parse here: 8-byte little-endian header length N, N bytes of
JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the data block that the offsets are relative to.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from .errors import InputError, UnsupportedError
from .tensors import DTYPE_ITEMSIZE, TensorRef

# A 7B header is ~30 KB; 100 MB leaves room for any real model and stops a
# crafted length from making us read gigabytes of "JSON".
MAX_HEADER_BYTES = 100 * 1024 * 1024
KNOWN_OTHER_DTYPES = {"F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U16", "U32", "U64"}


def read_safetensors(path: Path) -> dict[str, TensorRef]:
    """Every tensor of one safetensors file, in file order, validated against its size."""
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: not a safetensors file (only {len(head)} bytes); re-download it")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES:
                raise InputError(
                    f"{path}: safetensors header claims {header_len} bytes (limit {MAX_HEADER_BYTES}); "
                    "the file is corrupt or not safetensors"
                )
            if 8 + header_len > file_size:
                raise InputError(
                    f"{path}: safetensors header ({header_len} bytes) runs past the end of the "
                    f"{file_size}-byte file; the file is truncated, re-download it"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: safetensors header is not valid JSON ({exc}); the file is corrupt") from exc
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object; the file is corrupt")
    data_start = 8 + header_len
    return _tensors_from_header(path, header, data_start, file_size - data_start)


def _tensors_from_header(path: Path, header: dict, data_start: int, data_len: int) -> dict[str, TensorRef]:
    refs: dict[str, TensorRef] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise InputError(f"{where}: entry is not an object; the file is corrupt")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_ITEMSIZE:
            if dtype in KNOWN_OTHER_DTYPES:
                raise UnsupportedError(f"{where} has dtype {dtype}; supported weight dtypes are F32, F16, BF16")
            raise InputError(f"{where} has unknown dtype {dtype!r}; the file is corrupt")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise InputError(f"{where}: bad shape {shape!r}; the file is corrupt")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise InputError(f"{where}: bad data_offsets {offsets!r}; the file is corrupt")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise InputError(
                f"{where}: data range {begin}..{end} lies outside the {data_len}-byte data block; "
                "the file is truncated or corrupt"
            )
        expected = math.prod(shape) * DTYPE_ITEMSIZE[dtype]
        if end - begin != expected:
            raise InputError(
                f"{where}: shape {shape} in {dtype} needs {expected} bytes but the file gives it {end - begin}; "
                "the file is corrupt"
            )
        refs[name] = TensorRef(name, dtype, tuple(shape), path, data_start + begin)
        spans.append((begin, end, name))
    _check_no_overlap(path, spans)
    return refs


def _check_no_overlap(path: Path, spans: list[tuple[int, int, str]]) -> None:
    spans.sort()
    for (b1, e1, n1), (b2, e2, n2) in zip(spans, spans[1:]):
        if b2 < e1 and e1 > b1 and e2 > b2:
            raise InputError(f"{path}: tensors {n1!r} and {n2!r} overlap in the file; the file is corrupt")

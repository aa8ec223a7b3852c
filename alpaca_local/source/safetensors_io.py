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
import stat
import struct
from pathlib import Path
from typing import Callable

from alpaca_local.errors import InputError, UnsupportedError
from alpaca_local.source.tensors import DTYPE_ITEMSIZE, RangeReader, TensorRef

# A 7B header is ~30 KB; 100 MB leaves room for any real model and stops a
# crafted length from making us read gigabytes of "JSON".
MAX_HEADER_BYTES = 100 * 1024 * 1024
# torch allows 64 dimensions; weights have 1 to 4. The cap keeps the size product small.
MAX_DIMS = 16
KNOWN_OTHER_DTYPES = {"F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U16", "U32", "U64"}


def read_safetensors(path: Path) -> dict[str, TensorRef]:
    """Every tensor of one safetensors file, in file order, validated against its size."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            raise InputError(f"{path} is not a regular file; give the model's .safetensors file")
        with open(path, "rb") as f:

            def read_at(offset: int, nbytes: int) -> bytes:
                f.seek(offset)
                return f.read(nbytes)

            raw = read_header_bytes(path, st.st_size, read_at)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return parse_header(path, raw, st.st_size)


def read_header_bytes(path: Path, file_size: int, read_at: Callable[[int, int], bytes]) -> bytes:
    """The 8-byte length and the JSON header, checked against the file size before reading.

    `read_at(offset, nbytes)` is a local read or an HTTP range request: both
    sources get exactly the same checks.
    """
    head = read_at(0, 8) if file_size >= 8 else b""
    if len(head) < 8:
        raise InputError(f"{path}: not a safetensors file (only {min(file_size, len(head))} bytes); re-download it")
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
    raw = read_at(8, header_len) if header_len else b""
    if len(raw) != header_len:
        raise InputError(f"{path} ended early while reading its header; the file is truncated, re-download it")
    return head + raw


def parse_header(
    path: Path, raw: bytes, file_size: int, file: RangeReader | None = None
) -> dict[str, TensorRef]:
    """`TensorRef`s from the bytes `read_header_bytes` returned (length prefix included)."""
    try:
        header = json.loads(raw[8:].decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        raise InputError(f"{path}: safetensors header names {_short(exc.args[0])} twice; the file is corrupt") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError: bad JSON, or an integer of thousands of digits (int_max_str_digits);
        # RecursionError: "[[[[..." nested deeper than the parser's stack.
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise InputError(f"{path}: safetensors header is not valid JSON ({reason}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object; the file is corrupt")
    data_start = len(raw)
    return _tensors_from_header(path, header, data_start, file_size - data_start, file)


def _short(value: object, limit: int = 60) -> str:
    """A value from the header, fit for a one-line message (escaped, at most `limit` chars)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # json.loads keeps the last of two equal keys; another reader may keep the first,
    # so a file naming one tensor twice means different weights to different tools.
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _tensors_from_header(
    path: Path, header: dict, data_start: int, data_len: int, file: RangeReader | None
) -> dict[str, TensorRef]:
    refs: dict[str, TensorRef] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {_short(name)}"
        if not isinstance(info, dict):
            raise InputError(f"{where}: entry is not an object; the file is corrupt")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_ITEMSIZE:  # a list is unhashable
            if isinstance(dtype, str) and dtype in KNOWN_OTHER_DTYPES:
                raise UnsupportedError(f"{where} has dtype {_short(dtype)}; supported weight dtypes are F32, F16, BF16")
            raise InputError(f"{where} has unknown dtype {_short(dtype)}; the file is corrupt")
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
                and all(type(d) is int and 0 <= d < 1 << 62 for d in shape)):
            raise InputError(f"{where}: bad shape {_short(shape)}; the file is corrupt")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise InputError(f"{where}: bad data_offsets {_short(offsets)}; the file is corrupt")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise InputError(
                f"{where}: data range {_short(begin, 24)}..{_short(end, 24)} lies outside "
                f"the {data_len}-byte data block; "
                "the file is truncated or corrupt"
            )
        expected = math.prod(shape) * DTYPE_ITEMSIZE[dtype]
        if end - begin != expected:
            raise InputError(
                f"{where}: shape {_short(shape)} in {dtype} needs "
                f"{expected if expected < 1 << 64 else 'over 2**64'} bytes "
                f"but the file gives it {end - begin}; "
                "the file is corrupt"
            )
        refs[name] = TensorRef(name, dtype, tuple(shape), path, data_start + begin, file)
        spans.append((begin, end, name))
    _check_no_overlap(path, spans)
    return refs


def _check_no_overlap(path: Path, spans: list[tuple[int, int, str]]) -> None:
    # Compare each span with the furthest-reaching one before it, not just its neighbour:
    # with (0, 100), (10, 10), (50, 70) the empty middle span must not hide the overlap.
    reach, owner = 0, ""
    for begin, end, name in sorted(s for s in spans if s[1] > s[0]):
        if begin < reach:
            raise InputError(
                f"{path}: tensors {_short(owner)} and {_short(name)} overlap in the file; the file is corrupt"
            )
        if end > reach:
            reach, owner = end, name

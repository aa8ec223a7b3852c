"""The GGUF header reader: agrees with gguf-py on good files, and refuses bad ones in one line,
without allocating or looping on what a hostile header claims."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import gguf
import pytest

from alpaca_local.errors import InputError
from alpaca_local.convert.gguf_read import read_gguf_header


def test_matches_gguf_py_on_a_converted_file(tiny_gguf: Path) -> None:
    ours, ref = read_gguf_header(tiny_gguf), gguf.GGUFReader(tiny_gguf)
    assert ours.version == 3 and ours.data_offset == ref.data_offset
    assert ours.file_size == tiny_gguf.stat().st_size
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for t, r in zip(ours.tensors, ref.tensors):
        assert t.shape == tuple(int(x) for x in reversed(r.shape))
        assert (t.ggml_type, t.nbytes, ours.data_offset + t.offset) == (r.tensor_type, r.n_bytes, r.data_offset)
    assert ours.arch == "llama" and ours.get_int("llama.block_count") == 2
    assert len(ours.kv["tokenizer.ggml.tokens"]) == ours.get_int("llama.vocab_size")


# -- crafted files ---------------------------------------------------------------------


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _kv_u32(key: str, value: int) -> bytes:
    return _s(key) + struct.pack("<II", 4, value)


def _tensor(name: str, ne: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return _s(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne) + struct.pack("<IQ", ggml_type, offset)


def _good(data_bytes: int = 64 * 4) -> bytes:
    body = _header(1, 1) + _kv_u32("general.alignment", 32) + _tensor("w", [64, 1], 0, 0)
    return body + b"\0" * (-len(body) % 32) + b"\0" * data_bytes


CASES = {
    "not gguf": (b"PK\x03\x04" + b"\0" * 60, "does not start with 'GGUF'"),
    "empty": (b"", "truncated or empty"),
    "version 1": (_header(0, 0, version=1) + b"\0" * 8, "version 1"),
    "absurd tensor count": (_header(1 << 60, 0), "tensor count"),
    "absurd kv count": (_header(0, 1 << 62), "metadata count"),
    "tensor count beyond file": (_header(1000, 0) + b"\0" * 64, "tensor count"),
    "absurd string length": (_header(0, 1) + struct.pack("<Q", 1 << 62) + b"\0" * 16, "length"),
    "absurd array length": (_header(0, 1) + _s("a") + struct.pack("<IIQ", 9, 4, 1 << 61), "array length"),
    "array of arrays": (_header(0, 1) + _s("a") + struct.pack("<IIQ", 9, 9, 1) + b"\0" * 16, "array of arrays"),
    "unknown value type": (_header(0, 1) + _s("a") + struct.pack("<I", 99) + b"\0" * 16, "unknown value type"),
    "five dimensions": (_header(1, 0) + _tensor("w", [32, 1, 1, 1, 1]) + b"\0" * 32, "5 dimensions"),
    "unknown tensor type": (_header(1, 0) + _tensor("w", [32], 999) + b"\0" * 32, "unknown ggml type"),
    "data past the end": (_good(64 * 4)[:-8], "truncated download"),
    "huge dimensions": (_header(1, 0) + _tensor("w", [1 << 40, 1 << 40]) + b"\0" * 64, "file has"),
    "misaligned offset": (_header(1, 0) + _tensor("w", [32], 0, 4) + b"\0" * 512, "not aligned"),
    "bad alignment": (_header(0, 1) + _kv_u32("general.alignment", 3) + b"\0" * 8, "power of two"),
    "truncated kv": (_header(0, 1) + _kv_u32("general.alignment", 32)[:-2], "truncated"),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_files_fail_in_one_line_fast(tmp_path: Path, name: str) -> None:
    data, message = CASES[name]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=message) as exc:
        read_gguf_header(path)
    assert time.perf_counter() - t0 < 0.5
    assert "\n" not in str(exc.value)


def test_crafted_good_file_reads(tmp_path: Path) -> None:
    path = tmp_path / "ok.gguf"
    path.write_bytes(_good())
    h = read_gguf_header(path)
    assert [(t.name, t.shape, t.nbytes) for t in h.tensors] == [("w", (1, 64), 256)]
    assert h.data_offset % 32 == 0 and h.kv["general.alignment"] == 32


def test_every_truncation_of_a_real_header_fails_cleanly(tiny_gguf: Path, tmp_path: Path) -> None:
    data = tiny_gguf.read_bytes()
    end = read_gguf_header(tiny_gguf).data_offset
    path = tmp_path / "cut.gguf"
    for cut in list(range(0, 200, 7)) + list(range(200, end, max(1, end // 60))) + [len(data) - 1]:
        path.write_bytes(data[:cut])
        with pytest.raises(InputError):
            read_gguf_header(path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        read_gguf_header(tmp_path / "nope.gguf")
    with pytest.raises(InputError, match="folder"):
        read_gguf_header(tmp_path)

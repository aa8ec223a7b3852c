"""Importance-matrix files: our writer's layout is llama-imatrix's, both formats read back, and
`importance()` divides exactly as llama-quantize's load_imatrix does."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from alpaca_local.convert.imatrix_file import Imatrix, ImatrixEntry, read_imatrix, write_imatrix
from alpaca_local.errors import InputError


def _sample() -> Imatrix:
    rng = np.random.default_rng(1)
    return Imatrix(
        {
            "blk.0.attn_q.weight": ImatrixEntry(rng.random((1, 64), dtype=np.float32) * 300, np.array([96])),
            "blk.0.ffn_down_exps.weight": ImatrixEntry(rng.random((4, 32), dtype=np.float32), np.array([5, 0, 7, 3])),
        },
        datasets=["wiki.txt"], chunk_count=3, chunk_size=32,
    )


def test_round_trip_and_layout(tmp_path: Path) -> None:
    path = tmp_path / "i.gguf"
    write_imatrix(_sample(), path)
    back = read_imatrix(path)
    assert (back.datasets, back.chunk_count, back.chunk_size, back.legacy, back.partial) == (["wiki.txt"], 3, 32, False, False)
    for name, e in _sample().entries.items():
        np.testing.assert_array_equal(back.entries[name].sums, e.sums)
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)
    # As save_imatrix writes it: no architecture, name order, sums then counts, ne [cols, n_mat] / [1, n_mat].
    r = gguf.GGUFReader(path)
    assert [k for k in r.fields if not k.startswith("GGUF.")] == [
        "general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    shapes = {t.name: [int(x) for x in t.shape] for t in r.tensors}
    assert list(shapes) == ["blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts",
                            "blk.0.ffn_down_exps.weight.in_sum2", "blk.0.ffn_down_exps.weight.counts"]
    assert shapes["blk.0.attn_q.weight.in_sum2"] == [64] and shapes["blk.0.attn_q.weight.counts"] == [1]
    assert shapes["blk.0.ffn_down_exps.weight.in_sum2"] == [32, 4] and shapes["blk.0.ffn_down_exps.weight.counts"] == [1, 4]


def test_importance_divides_by_counts_and_fills_unseen_experts_with_one(tmp_path: Path) -> None:
    imp = _sample().importance()
    e = _sample().entries
    np.testing.assert_array_equal(imp["blk.0.attn_q.weight"], e["blk.0.attn_q.weight"].sums[0] / np.float32(96))
    experts = imp["blk.0.ffn_down_exps.weight"].reshape(4, 32)
    np.testing.assert_array_equal(experts[1], np.ones(32, np.float32))  # count 0: quantize.cpp writes 1
    np.testing.assert_array_equal(experts[2], e["blk.0.ffn_down_exps.weight"].sums[2] / np.float32(7))


def test_legacy_dat_is_divided_by_ncall(tmp_path: Path) -> None:
    values = np.arange(1, 9, dtype="<f4") * 3
    name = b"blk.3.ffn_up.weight"
    raw = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 3, 8) + values.tobytes()
    raw += struct.pack("<ii", 12, 8) + b"data.txt"
    (tmp_path / "i.dat").write_bytes(raw)
    imat = read_imatrix(tmp_path / "i.dat")
    assert imat.legacy and imat.datasets == ["data.txt"] and imat.chunk_count == 12
    np.testing.assert_array_equal(imat.importance()["blk.3.ffn_up.weight"], values / np.float32(3))


@pytest.mark.parametrize("content, needle", [
    (b"", "too short"),
    (b"GGUF" + b"\0" * 40, "GGUF"),
    (struct.pack("<i", 1) + struct.pack("<i", 5) + b"bad\nx" + struct.pack("<ii", 1, 1) + b"\0\0\0\0", "not a tensor name"),
    (struct.pack("<i", 1) + struct.pack("<i", 3) + b"abc" + struct.pack("<ii", 1, 1) + b"\0\0\x80\xff", "NaN"),
    (struct.pack("<i", 1) + struct.pack("<i", 3) + b"abc" + struct.pack("<ii", 1, 1) + b"\0\0\x80\xbf", "negative"),
    (struct.pack("<i", 1) + struct.pack("<i", 3) + b"abc" + struct.pack("<ii", 1, 1) + b"\0\0\x80\x3f" + b"\1\2",
     "truncated"),
])
def test_malformed_files_are_one_line_errors(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "bad.dat"
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        read_imatrix(path)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_missing_counts_in_gguf(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(tmp_path / "i.gguf", arch="")
    w.kv_data[0].pop("general.architecture", None)
    w.add_type("imatrix")
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InputError, match="sums without counts"):
        read_imatrix(tmp_path / "i.gguf")


@pytest.mark.parametrize("legacy", [False, True])
def test_random_corruption_is_a_clean_error_or_a_valid_result(tmp_path: Path, legacy: bool) -> None:
    """Flip, cut and overwrite bytes of a valid file (fixed seed): never anything but InputError."""
    good = tmp_path / "good"
    if legacy:
        e = _sample().entries["blk.0.attn_q.weight"]
        name = b"blk.0.attn_q.weight"
        raw = (struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 2, 64)
               + e.sums.astype("<f4").tobytes() + struct.pack("<ii", 2, 4) + b"t.txt")
        good.write_bytes(raw)
    else:
        write_imatrix(_sample(), good)
        raw = good.read_bytes()
    rng = np.random.default_rng(7)
    bad = tmp_path / "bad"
    for _ in range(300):
        data = bytearray(raw)
        kind = rng.integers(3)
        if kind == 0:
            data = data[: rng.integers(len(data))]
        else:
            for pos in rng.integers(0, len(data), rng.integers(1, 8)):
                data[pos] = int(rng.integers(256)) if kind == 1 else 0xFF
        bad.write_bytes(bytes(data))
        try:
            imat = read_imatrix(bad)
        except InputError as exc:
            assert "\n" not in str(exc)
            continue
        for e in imat.entries.values():
            assert np.isfinite(e.sums).all() and (e.sums >= 0).all() and e.sums.size % len(e.counts) == 0

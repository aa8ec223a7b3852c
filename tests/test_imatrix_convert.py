"""convert --imatrix: bit-identical to llama.cpp's llama_model_quantize given the same importance
matrix (set up as `llama-quantize --imatrix` sets it up), on the reference converter's f16."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

import reference
import tinymodels
from alpaca_local.convert.imatrix_file import Imatrix, ImatrixEntry, write_imatrix
from alpaca_local.convert.pipeline import convert

# 8 layers: n_layer/8 = 1, so Q4_0 gives layer 0's ffn_down Q4_1 with an imatrix;
# rows of 320 make the K-quants fall back to Q5_0/Q5_1/Q8_0, which use the imatrix too.
VARIANTS = {
    "8-layers": {"n_layer": 8, "n_kv_head": 4},
    "rows-320": {"hidden": 320, "n_head": 5, "n_kv_head": 1, "intermediate": 640},
}


def synthetic_imatrix(gguf_path: Path, seed: int = 0, zero_count: str | None = None) -> Imatrix:
    """Sums of squares for every block weight a llama-imatrix run would see, skewed so that some
    columns matter far more than others (as real activations do)."""
    rng = np.random.default_rng(seed)
    entries = {}
    for t in gguf.GGUFReader(gguf_path).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            n_cols = int(t.shape[0])
            sums = (rng.lognormal(0.0, 2.0, n_cols) * 512).astype(np.float32)
            entries[t.name] = ImatrixEntry(sums.reshape(1, -1), np.array([0 if t.name == zero_count else 512]))
    return Imatrix(entries, datasets=["calibration.txt"], chunk_count=1, chunk_size=512)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    work = tmp_path_factory.mktemp(request.param)
    model = tinymodels.build_llama(work / "model", **VARIANTS[request.param])
    f16 = reference.reference_file(model.path, work, "f16")
    imatrix = work / "imatrix.gguf"
    write_imatrix(synthetic_imatrix(f16, zero_count="blk.1.attn_k.weight"), imatrix)
    return model, work, f16, imatrix


def _kv(path: Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k.startswith("quantize.imatrix")}


@pytest.mark.reference
@pytest.mark.parametrize("quant", ["q4_0", "q4_k_m", "q5_k_m"])
def test_bit_identical_to_llama_quantize_with_imatrix(variant, quant):
    model, work, f16, imatrix = variant
    ref_path = reference.reference_quantize(f16, work / f"ref-imatrix.{quant}.gguf", quant, imatrix=imatrix)
    ours_path = convert(model.path, work / f"ours-imatrix.{quant}.gguf", quant, force=True, imatrix=imatrix).output
    ref, ours = reference.tensor_table(ref_path), reference.tensor_table(ours_path)
    assert sorted(ours) == sorted(ref)
    mismatched = [(n, ref[n][:2], ours[n][:2]) for n in ref if ours[n] != ref[n]]
    assert not mismatched, mismatched
    assert _kv(ours_path) == _kv(ref_path) and _kv(ours_path)["quantize.imatrix.entries_count"] > 0

    # Not vacuous: the imatrix changed the bytes of the quantized block weights.
    plain = reference.tensor_table(reference.reference_file(model.path, work, quant))
    changed = [n for n in ours if n.startswith("blk.") and ours[n][2] != plain[n][2]]
    assert len(changed) >= len([n for n in ours if n.startswith("blk.") and ours[n][0] not in ("F32", "F16")]) // 2


@pytest.mark.reference
def test_q4_0_with_imatrix_gives_first_eighth_ffn_down_q4_1(variant):
    """llama-quant.cpp:661: only with an imatrix, Q4_0's ffn_down in layers < n_layer/8 is Q4_1."""
    model, work, f16, imatrix = variant
    n_layer = model.config["num_hidden_layers"]
    ours = reference.tensor_table(convert(model.path, work / "q40.gguf", "q4_0", force=True, imatrix=imatrix).output)
    q41 = sorted(n for n, (t, *_) in ours.items() if t == "Q4_1")
    assert q41 == [f"blk.{i}.ffn_down.weight" for i in range(n_layer // 8)]


def test_legacy_dat_gives_the_same_file_as_gguf(tiny_model, tmp_path):
    """The legacy format stores (sum / count) × ncall; divided by ncall it is the same importance."""
    f16 = convert(tiny_model.path, tmp_path / "f16.gguf", "f16").output
    imat = synthetic_imatrix(f16, seed=3)
    write_imatrix(imat, tmp_path / "i.gguf")
    dat = tmp_path / "i.dat"
    _write_legacy(imat, dat, ncall=4)
    a = convert(tiny_model.path, tmp_path / "a.gguf", "q4_k_m", imatrix=tmp_path / "i.gguf").output
    b = convert(tiny_model.path, tmp_path / "b.gguf", "q4_k_m", imatrix=dat).output
    assert reference.tensor_table(a) == reference.tensor_table(b)


def _write_legacy(imat: Imatrix, path: Path, ncall: int) -> None:
    """save_imatrix_legacy (imatrix.cpp): values (sum / count) × ncall, then chunks and dataset."""
    import struct

    out = struct.pack("<i", len(imat.entries))
    for name in sorted(imat.entries):
        e = imat.entries[name]
        values = (e.sums / np.float32(e.counts[0]) * np.float32(ncall)).astype("<f4").reshape(-1)
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, values.size) + values.tobytes()
    dataset = imat.datasets[0].encode()
    out += struct.pack("<ii", imat.chunk_count, len(dataset)) + dataset
    path.write_bytes(out)

"""llama.cpp's own pipeline, as vendored in the llama-cpp-python sdist: the reference.

Step 1: `convert_hf_to_gguf.py --outtype f16`; step 2: llama.cpp's quantize
(`llama_model_quantize` with default parameters) for the other types. The
Makefile downloads and unpacks the sdist into .cache/ and exports its path as
LLAMA_CPP_VENDOR.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from alpaca_local.convert.quant_rules import QUANTS

CONVERTER_OUTTYPES = ("f16", "bf16", "f32")  # the levels convert_hf_to_gguf.py writes itself

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_VERSION = "0.3.36"


def vendor_dir() -> Path:
    default = ROOT / ".cache" / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp"
    path = Path(os.environ.get("LLAMA_CPP_VENDOR", default))
    if not (path / "convert_hf_to_gguf.py").is_file():
        pytest.fail(f"vendored llama.cpp not found at {path}; run `make test` (it unpacks the sdist)")
    return path


_CONVERT_WITH_PRE = """
import runpy, sys
from pathlib import Path
vendor, pre, *args = sys.argv[1:]
sys.path.insert(0, vendor)
sys.path.insert(1, str(Path(vendor) / "gguf-py"))
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [str(Path(vendor) / "convert_hf_to_gguf.py"), *args]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def reference_convert(src: Path, out: Path, outtype: str = "f16", pre: str | None = None) -> Path:
    """`convert_hf_to_gguf.py SRC --outtype OUTTYPE` (f16, bf16, f32...). `pre`: the BPE
    pre-tokenizer name to give it; the converter only names the pre-tokenizers of released
    vocabularies (it hashes their tokens), so a tiny trained BPE vocabulary needs one."""
    args = [str(src), "--outtype", outtype, "--outfile", str(out)]
    if pre is None:
        cmd = [sys.executable, str(vendor_dir() / "convert_hf_to_gguf.py"), *args]
    else:
        cmd = [sys.executable, "-c", _CONVERT_WITH_PRE, str(vendor_dir()), pre, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"reference converter failed:\n{proc.stderr[-3000:]}")
    return out


def reference_f16(src: Path, out: Path) -> Path:
    return reference_convert(src, out, "f16")


def reference_quantize(f16: Path, out: Path, quant: str, imatrix: Path | None = None) -> Path:
    """llama_model_quantize with default parameters; with `imatrix`, set up as
    tools/quantize/quantize.cpp does for `--imatrix FILE` (the per-tensor map and the
    quantize.imatrix.* kv_overrides)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(QUANTS[quant])
    keep = []  # ctypes buffers must outlive the call
    if imatrix is not None:
        data, datasets, chunks = load_imatrix_like_quantize(imatrix)
        entries = (llama_cpp.llama_model_imatrix_data * (len(data) + 1))()
        for i, (name, values) in enumerate(data.items()):
            arr = (ctypes.c_float * len(values))(*values.tolist())
            keep.append(arr)
            entries[i].name, entries[i].data, entries[i].size = name.encode(), ctypes.cast(arr, ctypes.POINTER(ctypes.c_float)), len(values)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        kv = [("quantize.imatrix.file", str(imatrix))]
        if datasets:
            kv.append(("quantize.imatrix.dataset", datasets[0]))
        kv.append(("quantize.imatrix.entries_count", len(data)))
        if chunks > 0:
            kv.append(("quantize.imatrix.chunks_count", chunks))
        overrides = (llama_cpp.llama_model_kv_override * (len(kv) + 1))()
        for o, (key, value) in zip(overrides, kv):
            o.key = key.encode()
            if isinstance(value, str):
                o.tag, o.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()[:127]
            else:
                o.tag, o.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, value
        params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
        keep += [entries, overrides]
    rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params)
    assert rc == 0, f"llama_model_quantize failed with {rc}"
    return out


def load_imatrix_like_quantize(path: Path) -> tuple[dict[str, np.ndarray], list[str], int]:
    """quantize.cpp's load_imatrix for a GGUF imatrix, through gguf-py (independent of our reader):
    name -> in_sum2 / count per matrix (1.0 where the count is 0), the datasets, the chunk count."""
    reader = gguf.GGUFReader(path)
    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}
    data = {}
    for name in sorted(n[: -len(".in_sum2")] for n in tensors if n.endswith(".in_sum2")):
        sums, counts = tensors[name + ".in_sum2"], np.rint(tensors[name + ".counts"]).astype(np.float32)
        ne0 = sums.size // counts.size
        data[name] = np.concatenate([sums[j * ne0:(j + 1) * ne0] / c if c > 0 else np.ones(ne0, np.float32)
                                     for j, c in enumerate(counts)]).astype(np.float32)
    datasets = list(reader.fields["imatrix.datasets"].contents()) if "imatrix.datasets" in reader.fields else []
    chunks = int(reader.fields["imatrix.chunk_count"].contents()) if "imatrix.chunk_count" in reader.fields else 0
    return data, datasets, chunks


def reference_file(src: Path, workdir: Path, quant: str, pre: str | None = None) -> Path:
    """The reference route's file for `quant`, cached in `workdir`: the converter alone for its
    own output types (f16, bf16, f32), else its f16 file through llama_model_quantize."""
    if quant in CONVERTER_OUTTYPES:
        out = workdir / f"ref.{quant.upper()}.gguf"
        return out if out.exists() else reference_convert(src, out, quant, pre)
    f16 = reference_file(src, workdir, "f16", pre)
    out = workdir / f"ref.{quant}.gguf"
    if not out.exists():
        reference_quantize(f16, out, quant)
    return out


def tensor_layout(path: Path) -> list[tuple[str, str, tuple[int, ...], int]]:
    """The tensor infos in file order: (name, type name, ggml shape, data offset from the start of
    the data section). llama.cpp's loader reads these; two files with the same tensors but another
    order or padding are different files."""
    reader = gguf.GGUFReader(path)
    return [
        (t.name, t.tensor_type.name, tuple(int(x) for x in t.shape), int(t.data_offset) - int(reader.data_offset))
        for t in reader.tensors
    ]


def assert_same_tensors(ours: Path, ref: Path) -> None:
    """`ours` holds the reference's tensors in its order, at its offsets, byte for byte."""
    a, b = tensor_layout(ours), tensor_layout(ref)
    assert [x[0] for x in a] == [x[0] for x in b], "tensor order differs from the reference"
    moved = [(x, y) for x, y in zip(a, b) if x != y]
    assert not moved, f"type, shape or offset differs (ours, reference): {moved[:4]}"
    ta, tb = tensor_table(ours), tensor_table(ref)
    mismatched = [(n, tb[n][:2]) for n in tb if ta[n] != tb[n]]
    assert not mismatched, f"bytes differ: {mismatched}"


def tensor_table(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (type name, ggml shape, raw bytes) of a GGUF file we trust."""
    reader = gguf.GGUFReader(path)
    return {
        t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), np.asarray(t.data).tobytes())
        for t in reader.tensors
    }


# --------------------------------------------------------------------------
# LoRA merges against PEFT's: as exact as this machine's two BLAS libraries allow
# --------------------------------------------------------------------------

# Where numpy's and torch's float32 matmuls add the rank dimension in different orders, one
# merged value in this many may land one F16 step away from PEFT's (measured on an AMD Zen 4:
# one value in a tensor of 2,048 to 8,192, in 4 of the tiny model's rsLoRA/DoRA cases); more
# than that is a real difference.
F16_STEP_SHARE = 1e-3


@functools.lru_cache(maxsize=1)
def blas_orders_differ() -> bool:
    """Whether B @ A (float32, a LoRA's rank as the inner dimension) comes out of numpy's BLAS
    other than out of torch's, which PEFT's merge uses, on this machine. MKL (torch's, on its
    AVX-512 path) adds the products one fused multiply-add after another; OpenBLAS's Haswell
    kernel (numpy's wheels on AMD Zen 4 too) does not, and about 2% of the products differ in
    their last bit, so a merged F16 value now and then rounds the other way."""
    import torch

    rng = np.random.default_rng(0)
    b = rng.standard_normal((256, 16), dtype=np.float32)
    a = rng.standard_normal((16, 256), dtype=np.float32)
    return not np.array_equal(b @ a, (torch.from_numpy(b) @ torch.from_numpy(a)).numpy())


def lora_mismatches(ours: dict, ref: dict) -> list[str]:
    """Tensors of two tensor_tables that differ beyond the BLAS order: byte for byte where both
    BLAS libraries agree (blas_orders_differ), else F16 tensors may have up to F16_STEP_SHARE of
    their values one step apart (every other type must still be identical)."""
    loose = blas_orders_differ()
    bad = []
    for name in ours:
        (kind, shape, x), (_, _, y) = ours[name], ref[name]
        if x == y:
            continue
        if loose and kind == "F16" and len(x) == len(y):
            steps = np.abs(np.frombuffer(x, np.int16).astype(np.int32) - np.frombuffer(y, np.int16).astype(np.int32))
            if steps.max() <= 1 and np.count_nonzero(steps) <= F16_STEP_SHARE * steps.size:
                continue
        bad.append(name)
    return sorted(bad)

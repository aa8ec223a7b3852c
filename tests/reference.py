"""llama.cpp's own pipeline, as vendored in the llama-cpp-python sdist: the reference.

Step 1: `convert_hf_to_gguf.py --outtype f16`; step 2: llama.cpp's quantize
(`llama_model_quantize` with default parameters) for the other types. The
Makefile downloads and unpacks the sdist into .cache/ and exports its path as
LLAMA_CPP_VENDOR.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from alpaca_local.convert.quant_rules import QUANTS

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_VERSION = "0.3.36"


def vendor_dir() -> Path:
    default = ROOT / ".cache" / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp"
    path = Path(os.environ.get("LLAMA_CPP_VENDOR", default))
    if not (path / "convert_hf_to_gguf.py").is_file():
        pytest.fail(f"vendored llama.cpp not found at {path}; run `make test` (it unpacks the sdist)")
    return path


def reference_f16(src: Path, out: Path) -> Path:
    script = vendor_dir() / "convert_hf_to_gguf.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(src), "--outtype", "f16", "--outfile", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        raise AssertionError(f"reference converter failed:\n{proc.stderr[-3000:]}")
    return out


def reference_quantize(f16: Path, out: Path, quant: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(QUANTS[quant])
    rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params)
    assert rc == 0, f"llama_model_quantize failed with {rc}"
    return out


def reference_file(src: Path, workdir: Path, quant: str) -> Path:
    """The reference route's file for `quant`, cached in `workdir`."""
    f16 = workdir / "ref.F16.gguf"
    if not f16.exists():
        reference_f16(src, f16)
    if quant == "f16":
        return f16
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

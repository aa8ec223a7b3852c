"""ggml's own quantizers, called through ctypes from the library llama-cpp-python ships.

Why ggml and not numpy: the quantized bytes must equal what llama.cpp's
quantize writes, and the K-quant search is ggml's code, not a formula. ctypes
drops the GIL for the duration of each call, so quantizing chunks from several
threads uses every core.

ggml aborts the whole process (GGML_ASSERT) on a bad shape, so `quantize_rows`
checks every argument before the call.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from alpaca_local.errors import AlpacaError
from alpaca_local.convert.quant_rules import row_nbytes

# Types this module may be asked for: every type a level's rules can choose (the
# float ones, the legacy and K-quants, the i-quants, the ternary TQ*, Q1_0, MXFP4).
# IQ2_XXS, IQ2_XS and IQ1_S *require* an importance matrix (ggml_quantize_requires_imatrix
# asserts otherwise); most of the others use one when given (see quantize_rows).
T = GGMLQuantizationType
SUPPORTED = frozenset({
    T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
    T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_NL, T.IQ4_XS,
    T.TQ1_0, T.TQ2_0, T.Q1_0, T.MXFP4,
} | ({T.Q2_0} if hasattr(T, "Q2_0") else set()))


class GGMLUnavailable(AlpacaError):
    """llama-cpp-python (which ships ggml) is missing or too old."""


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    try:
        import llama_cpp  # noqa: F401  (loads libggml and its dependencies)
    except ImportError as exc:
        raise GGMLUnavailable(
            "llama-cpp-python is not installed; install alpaca-local with `pip install -e .` (see README)"
        ) from exc
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*")) + sorted(lib_dir.glob("libggml.*"))
    for path in candidates:
        try:
            lib = ctypes.CDLL(str(path))
            lib.ggml_quantize_chunk  # noqa: B018  (probe the symbol)
        except (OSError, AttributeError):
            continue
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
        ]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_init.restype = None
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        lib.ggml_fp16_to_fp32_row.restype = None
        lib.ggml_fp16_to_fp32_row.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        return lib
    raise GGMLUnavailable(f"no ggml library with ggml_quantize_chunk found in {lib_dir}; reinstall llama-cpp-python")


def library() -> ctypes.CDLL:
    """The ggml base library llama-cpp-python ships (also used by measure/imatrix.py's eval callback)."""
    return _lib()


@functools.lru_cache(maxsize=None)
def _init(ggml_type: int) -> None:
    # The i-quants search lattice grids that ggml_quantize_init builds once per type;
    # ggml_quantize_chunk would build them too, but under a lock the worker threads
    # would then queue on. Build them here, once, before the threads start.
    _lib().ggml_quantize_init(ggml_type)


def quantize_rows(
    values: np.ndarray, ggml_type: GGMLQuantizationType, imatrix: np.ndarray | None = None
) -> np.ndarray:
    """Quantize a 2-D float32 array row by row into ggml's byte layout (uint8, rows × row bytes).

    `imatrix`: one float32 importance weight per column (llama-quantize's per-tensor
    vector), passed to ggml_quantize_chunk as `quant_weights`; ggml's quantizers for
    Q4_0/Q4_1/Q5_0/Q5_1, the K-quants and the i-quants weight their error search with
    it, Q8_0, the ternary types and the float types ignore it. IQ2_XXS, IQ2_XS and
    IQ1_S cannot do without it (ValueError, where ggml would abort the process).
    """
    if ggml_type not in SUPPORTED:
        raise ValueError(f"quantizing to {ggml_type.name} is not supported")
    if values.ndim != 2 or values.dtype != np.float32:
        raise ValueError(f"expected a 2-D float32 array, got {values.ndim}-D {values.dtype}")
    n_rows, n_per_row = values.shape
    row_bytes = row_nbytes(ggml_type, n_per_row)  # raises before ggml could abort
    src = np.ascontiguousarray(values)
    weights = None
    if imatrix is not None:
        weights = np.ascontiguousarray(imatrix, dtype=np.float32)
        if weights.shape != (n_per_row,):
            raise ValueError(f"imatrix has {weights.size} values for rows of {n_per_row}")
    out = np.empty((n_rows, row_bytes), dtype=np.uint8)
    if n_rows == 0 or n_per_row == 0:
        return out
    lib = _lib()
    if weights is None and lib.ggml_quantize_requires_imatrix(int(ggml_type)):
        raise ValueError(f"{ggml_type.name} needs an importance matrix (ggml_quantize_requires_imatrix)")
    _init(int(ggml_type))
    if lib.ggml_row_size(int(ggml_type), n_per_row) != row_bytes:
        raise GGMLUnavailable(f"ggml disagrees with gguf on the size of {ggml_type.name}; versions do not match")
    written = lib.ggml_quantize_chunk(
        int(ggml_type), src.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row,
        None if weights is None else weights.ctypes.data,
    )
    if written != out.nbytes:
        raise RuntimeError(f"ggml wrote {written} bytes for {ggml_type.name}, expected {out.nbytes}")
    return out



@functools.lru_cache(maxsize=1)
def _cpu_lib() -> ctypes.CDLL | None:
    """libggml-cpu, for its SIMD (F16C) float16 row conversions; None where it is absent."""
    import llama_cpp

    for path in sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-cpu.*")):
        try:
            lib = ctypes.CDLL(str(path))
            funcs = (lib.ggml_cpu_fp32_to_fp16, lib.ggml_cpu_fp16_to_fp32)
        except (OSError, AttributeError):
            continue
        for f in funcs:
            f.restype = None
            f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        return lib
    return None


def round_to_f16(values: np.ndarray) -> np.ndarray:
    """`values` (2-D float32) rounded to float16 precision and widened back, exactly as numpy's
    astype(float16).astype(float32) (round to nearest even), through ggml's row conversions:
    the merged LoRA rows take this trip before a quantizer, and ggml-cpu's SIMD version is
    about 15x faster than numpy's (0.2 ms against 2.8 ms a million values)."""
    if values.ndim != 2 or values.dtype != np.float32:
        raise ValueError(f"expected a 2-D float32 array, got {values.ndim}-D {values.dtype}")
    src = np.ascontiguousarray(values)
    out = np.empty(src.shape, dtype=np.float32)
    if not out.size:
        return out
    cpu = _cpu_lib()
    if cpu is None:
        half = quantize_rows(src, GGMLQuantizationType.F16)
        _lib().ggml_fp16_to_fp32_row(half.ctypes.data, out.ctypes.data, out.size)
        return out
    # The SIMD loops leave a tail of fewer than one vector untouched (ggml-cpu.c
    # ggml_cpu_fp32_to_fp16 / ggml_cpu_fp16_to_fp32 in this build), so whole
    # multiples of 64 go to ggml and the few values left to numpy.
    flat, flat_out = src.reshape(-1), out.reshape(-1)
    main = src.size - src.size % 64
    if main:
        half16 = np.empty(main, dtype=np.uint16)
        cpu.ggml_cpu_fp32_to_fp16(flat.ctypes.data, half16.ctypes.data, main)
        cpu.ggml_cpu_fp16_to_fp32(half16.ctypes.data, flat_out.ctypes.data, main)
    flat_out[main:] = flat[main:].astype(np.float16).astype(np.float32)
    return out


# ggml_backend_dev_type (ggml/include/ggml-backend.h:134): CPU is the first value.
_DEVICE_TYPE_CPU = 0


@functools.lru_cache(maxsize=1)
def _cpu_device() -> tuple[ctypes.CDLL, int] | None:
    """(ggml-base, the CPU backend's device) of the build llama-cpp-python ships, or None."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    base, top = _lib(), None
    for path in sorted(lib_dir.glob("libggml.*")):
        try:
            top = ctypes.CDLL(str(path))
            top.ggml_backend_dev_by_type  # noqa: B018  (probe the symbol)
            break
        except (OSError, AttributeError):
            top = None
    if top is None:
        return None
    vp = ctypes.c_void_p
    top.ggml_backend_dev_by_type.restype, top.ggml_backend_dev_by_type.argtypes = vp, [ctypes.c_int]
    base.ggml_backend_dev_backend_reg.restype, base.ggml_backend_dev_backend_reg.argtypes = vp, [vp]
    base.ggml_backend_reg_get_proc_address.restype = vp
    base.ggml_backend_reg_get_proc_address.argtypes = [vp, ctypes.c_char_p]
    base.ggml_backend_buft_name.restype, base.ggml_backend_buft_name.argtypes = ctypes.c_char_p, [vp]
    base.ggml_backend_dev_buffer_type.restype, base.ggml_backend_dev_buffer_type.argtypes = vp, [vp]
    dev = top.ggml_backend_dev_by_type(_DEVICE_TYPE_CPU)
    return (base, dev) if dev else None


@functools.lru_cache(maxsize=1)
def cpu_extra_buffer_types() -> dict[str, int]:
    """The extra buffer types the CPU backend of this build registers, in llama.cpp's order
    ({"CPU_REPACK": pointer} here; "AMX" first on a native build for an AMX CPU), read as
    make_cpu_buft_list does (src/llama-model.cpp:1110-1126): the CPU device's registry hands out
    `ggml_backend_dev_get_extra_bufts`, a NULL-terminated array. The pointers are what
    tensor_buft_overrides takes."""
    found_dev = _cpu_device()
    if found_dev is None:
        return {}
    base, dev = found_dev
    vp = ctypes.c_void_p
    fn = base.ggml_backend_reg_get_proc_address(base.ggml_backend_dev_backend_reg(dev), b"ggml_backend_dev_get_extra_bufts")
    if not fn:
        return {}
    bufts = ctypes.CFUNCTYPE(ctypes.POINTER(vp), vp)(fn)(dev)
    found: dict[str, int] = {}
    i = 0
    while bufts and bufts[i]:
        found[base.ggml_backend_buft_name(bufts[i]).decode("utf-8", "replace")] = int(bufts[i])
        i += 1
    return found


@functools.lru_cache(maxsize=1)
def cpu_buffer_type() -> int:
    """The CPU backend's plain buffer type (0 if not found): what `--n-cpu-moe` overrides name.
    The loader compares the pointer with ggml_backend_cpu_buffer_type() to consider the extra
    buffer types (src/llama-model-loader.cpp:1240), and the CPU device hands out that very one
    (ggml_backend_cpu_device_get_buffer_type, ggml/src/ggml-cpu/ggml-cpu.cpp)."""
    found_dev = _cpu_device()
    if found_dev is None:
        return 0
    base, dev = found_dev
    return int(base.ggml_backend_dev_buffer_type(dev) or 0)

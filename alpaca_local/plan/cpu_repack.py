"""ggml-cpu's CPU_REPACK buffer: which weights llama.cpp copies into an interleaved layout.

In: a planned tensor (name, shape, type) and the CPU's features. Out: whether
llama.cpp repacks it, so the planner can count the extra copy. Split from
memory.py to keep the planner's arithmetic readable; memory.py re-exports these names.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

from gguf.constants import GGMLQuantizationType

from alpaca_local.plan.shape import PlannedTensor

T = GGMLQuantizationType


# --------------------------------------------------------------------------
# CPU_REPACK: ggml-cpu's copy of some weights in an interleaved layout
# --------------------------------------------------------------------------
#
# On the CPU, llama.cpp puts a MUL_MAT weight in the first buffer type of
# make_cpu_buft_list (src/llama-model.cpp:1077-1134: ACCEL -> GPU host ->
# CPU extra -> CPU) whose device supports the op (select_weight_buft,
# src/llama-model-loader.cpp:1067).  The CPU "extra" type CPU_REPACK
# (ggml/src/ggml-cpu/repack.cpp:5162-5253) takes a weight when
# ggml_repack_get_optimal_repack_type (repack.cpp:4925) has a layout for its
# type on this CPU; the loader then reads the mmapped bytes into a new buffer
# of ggml_nbytes per tensor (get_alloc_size is the default), each padded to
# TENSOR_ALIGNMENT (ggml/src/ggml-impl.h:44).  The repacked tensor leaves the
# CPU_Mapped context, so the mapped range shrinks only where it sat at an end
# (get_mapping_range, llama-model-loader.cpp:1449); repacked tensors in the
# middle stay inside the mapping (only its ends are unmapped, :1783): their
# pages were read once for the copy and are clean page cache the kernel may
# drop, but llama.cpp counts them in CPU_Mapped and so does the planner.
# use_extra_bufts is true in llama_model_default_params (llama-model.cpp:2924)
# and llama-cpp-python 0.3.36 keeps that default (llama.py:227).
#
# Which tensors: supports_op (repack.cpp:5191) takes MUL_MAT with a 2-D
# weight and MUL_MAT_ID with a 3-D one (MoE experts).  Inputs read with
# GET_ROWS (token_embd and friends, LLM_TENSOR_INFOS in src/llama-arch.cpp:728)
# and biases (ADD) stay in CPU_Mapped.  A tied model's output layer is a
# second tensor (TENSOR_DUPLICATED) created with MUL_MAT, so it is repacked on
# its own even though token_embd is not.
#
# Not on CUDA: there the GPU's host buffer type comes before CPU_REPACK in
# the list, supports every MUL_MAT, and with mmap is swapped for the plain CPU
# type (llama-model-loader.cpp:1269-1276), so nothing is repacked (even at
# -ngl 0 on a CUDA build).  Metal has no host buffer type
# (ggml-metal.cpp:822), so its CPU layers are repacked.

TENSOR_ALIGNMENT = 32  # ggml/src/ggml-impl.h:44, CPU_REPACK's get_alignment (repack.cpp:5183)
# Tensors whose op is GET_ROWS, not MUL_MAT (src/llama-arch.cpp:728-730, 921).
GET_ROWS_TENSORS = ("token_embd.weight", "position_embd.weight", "token_types.weight", "per_layer_token_embd.weight")

# One entry per branch of ggml_repack_get_optimal_repack_type (repack.cpp:4974-5137):
# CPU feature -> {weight type: rows (ne[1]) must be a multiple of this}.  The
# features are compile-time tests (ggml-cpu.c:3651-3833: __AVX2__, __AVX512F__,
# __ARM_FEATURE_DOTPROD, __ARM_FEATURE_MATMUL_INT8).  A type listed under two
# features takes the smaller multiple (4 divides 8).  Left out: SVE-256 (only
# picks 8x8 instead of 4x8 for Q4_0: same bytes, and it needs i8mm, whose
# rule already takes %4), RISC-V (needs __riscv_zvfh and a 256-bit vector),
# s390x VXE (Q4_0 %4), and AMX, a separate extra buffer type that comes
# before CPU_REPACK when built with __AMX_INT8__ (ggml-cpu.cpp:46).
REPACK_RULES: dict[str, dict[GGMLQuantizationType, int]] = {
    # x86: Q4_0 -> q4_0x8 (:4975), Q4_K -> q4_Kx8 (:5007), IQ4_NL x8 (:5072), MXFP4 x8 (:5094)
    "avx2": {T.Q4_0: 8, T.Q4_K: 8, T.IQ4_NL: 8, T.MXFP4: 8},
    "avx512f": {T.Q2_K: 8},  # :5034
    # ARM: i8mm (matmul_int8) and dotprod branches; Q5_K/Q6_K/Q8_0 repack only here
    "i8mm": {T.Q4_0: 4, T.Q4_K: 8, T.Q5_K: 8, T.Q6_K: 8, T.Q8_0: 4, T.Q1_0: 4},
    "dotprod": {T.Q4_0: 4, T.Q4_K: 8, T.Q5_K: 8, T.Q6_K: 8, T.IQ4_NL: 4, T.MXFP4: 4, T.Q8_0: 4, T.Q1_0: 4},
}


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU features that decide CPU_REPACK, and where they came from."""

    features: tuple[str, ...]  # keys of REPACK_RULES
    source: str  # "/proc/cpuinfo", or the assumption made

    @property
    def repack_rows(self) -> dict[GGMLQuantizationType, int]:
        rows: dict[GGMLQuantizationType, int] = {}
        for f in self.features:
            for t, n in REPACK_RULES[f].items():
                rows[t] = min(n, rows.get(t, n))
        return rows


NO_REPACK = CpuFeatures((), "none")


def parse_cpuinfo(text: str) -> tuple[str, ...]:
    """REPACK_RULES features named in a Linux /proc/cpuinfo ("flags" on x86, "Features" on ARM)."""
    words: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            words.update(value.split())
    names = {"avx2": "avx2", "avx512f": "avx512f", "asimddp": "dotprod", "i8mm": "i8mm"}
    return tuple(f for w, f in names.items() if w in words)


@functools.lru_cache(maxsize=1)
def detect_cpu() -> CpuFeatures:
    """This machine's features.  ggml tests them at compile time, and llama-cpp-python builds
    with GGML_NATIVE on (-march=native, ggml/CMakeLists.txt:105-123), so the machine's
    features are the library's unless it is a wheel built elsewhere."""

    system, machine = platform.system(), platform.machine().lower()
    if system == "Darwin" and machine in ("arm64", "aarch64"):
        # Every Apple M chip has FEAT_DotProd; i8mm (M2 on) changes the layout, not the sizes.
        return CpuFeatures(("dotprod",), "assumed: Apple silicon has dotprod")
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return CpuFeatures(parse_cpuinfo(f.read()), "/proc/cpuinfo")
    except OSError:
        return CpuFeatures((), f"assumed: no repack ({system} {machine}: no /proc/cpuinfo)")


def repack_rows_for(backend: str, cpu: CpuFeatures) -> dict[GGMLQuantizationType, int]:
    """Weight types CPU_REPACK copies for CPU-resident layers on `backend` (none on CUDA, see above)."""
    return {} if backend == "cuda" else cpu.repack_rows


def is_repacked(t: PlannedTensor, rows: dict[GGMLQuantizationType, int], as_output: bool = False) -> bool:
    """True where llama.cpp puts `t` in CPU_REPACK; `as_output`: token_embd as a tied output (MUL_MAT)."""
    if t.ggml_type not in rows or (t.name in GET_ROWS_TENSORS and not as_output) or t.name.endswith(".bias"):
        return False
    dims = 3 if "_exps." in t.name else 2  # MUL_MAT_ID weights are 3-D, MUL_MAT weights 2-D
    return len(t.shape) == dims and t.shape[-2] % rows[t.ggml_type] == 0  # shape[-2] is ne[1]

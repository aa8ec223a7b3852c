"""ggml-cpu's CPU_REPACK buffer: which weights llama.cpp copies into an interleaved layout,
and how alpaca-local's own loads place weights on the CPU (issue 21).

In: a tensor (name, shape, type: a planned tensor or one read from a GGUF header) and
the CPU's features. Out: whether CPU_REPACK takes it. One truth for the planner
(`plan.memory` counts the extra copy and re-exports these names) and the runtime
(`run.cpu_buffers` hands exactly these tensors to CPU_REPACK where llama.cpp's own
choice would crash), so a prediction and a load cannot disagree.
"""

from __future__ import annotations

import functools
import os
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from gguf.constants import GGMLQuantizationType

from alpaca_local.errors import UsageError

T = GGMLQuantizationType


class WeightTensor(Protocol):
    """What the placement rules read of a tensor (plan's PlannedTensor, gguf_read's TensorInfo)."""

    name: str
    shape: tuple[int, ...]  # numpy order: shape[-1] is ne[0]
    ggml_type: GGMLQuantizationType


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


def is_repacked(t: WeightTensor, rows: dict[GGMLQuantizationType, int], as_output: bool = False) -> bool:
    """True where llama.cpp puts `t` in CPU_REPACK; `as_output`: token_embd as a tied output (MUL_MAT)."""
    if t.ggml_type not in rows or (t.name in GET_ROWS_TENSORS and not as_output) or t.name.endswith(".bias"):
        return False
    dims = 3 if "_exps." in t.name else 2  # MUL_MAT_ID weights are 3-D, MUL_MAT weights 2-D
    return len(t.shape) == dims and t.shape[-2] % rows[t.ggml_type] == 0  # shape[-2] is ne[1]


# Feature words of llama_print_system_info's CPU section (ggml-cpu.cpp:546-640,
# ggml_backend_cpu_get_features): compile-time tests of the build itself.
SYSTEM_INFO_FEATURES = {"AVX2": "avx2", "AVX512": "avx512f", "DOTPROD": "dotprod", "MATMUL_INT8": "i8mm"}


def parse_system_info(text: str) -> tuple[str, ...]:
    """REPACK_RULES features a build reports in llama_print_system_info ("CPU : AVX2 = 1 | ...")."""
    _, _, cpu = text.partition("CPU :")
    words = {k.strip() for k, _, v in (item.partition("=") for item in cpu.split("|")) if v.strip() == "1"}
    return tuple(f for w, f in SYSTEM_INFO_FEATURES.items() if w in words)


# --------------------------------------------------------------------------
# How alpaca-local's own loads place weights on the CPU (issue 21)
# --------------------------------------------------------------------------
#
# llama.cpp's default (use_extra_bufts = true) offers every weight to the build's
# extra CPU buffer types in registration order (ggml-cpu.cpp:42-73: AMX, then
# KleidiAI / SpacemiT, then CPU_REPACK) before the plain CPU type.  A build compiled
# with __AMX_INT8__ (llama-cpp-python's -march=native build on Intel Sapphire Rapids
# and later) puts every Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K/IQ4_XS weight in the AMX buffer
# (amx/common.h qtype_has_amx_kernels), and 0.3.36 then segfaults in
# ggml_backend_amx_mul_mat at the first decode (llama.cpp #20824, closed unfixed).
# "explicit" keeps CPU_REPACK's speed without AMX: extra buffer types off, and
# exactly the tensors CPU_REPACK supports (is_repacked) named in
# tensor_buft_overrides.  An override is taken as given, with no supports_op check
# (llama-model-loader.cpp:1235-1256), so the list must be exact; and it goes by
# name, so a tied model's output (the second token_embd.weight, TENSOR_DUPLICATED)
# cannot be told from the GET_ROWS input and stays in plain CPU memory.
# A build with a GPU backend puts its host buffer type before the extra ones
# (llama-model.cpp:1093-1107, all MUL_MATs), so AMX is never reached there.

CPU_BUFFER_MODES = {
    "auto": "llama.cpp's own placement, unless the build registers a buffer type known to crash",
    "explicit": "extra buffer types off; CPU_REPACK given exactly the tensors it supports",
    "none": "no extra buffer types: weights used from the mapped file (llama.cpp's --no-repack)",
}
# Extra buffer types that crash this llama.cpp, with the reason shown to the user.
CRASHING_BUFFER_TYPES = {
    "AMX": "its AMX buffer crashes at the first decode (llama.cpp #20824)",
}
BUFFERS_ENV = "ALPACA_LOCAL_CPU_BUFFERS"


def requested_mode(no_repack: bool = False, environ: Mapping[str, str] = os.environ) -> str:
    """The user's choice: --no-repack, else $ALPACA_LOCAL_CPU_BUFFERS, else "auto"."""
    if no_repack:
        return "none"
    value = environ.get(BUFFERS_ENV, "").strip().lower() or "auto"
    if value not in CPU_BUFFER_MODES:
        raise UsageError(f"{BUFFERS_ENV}={printable_env(value)} is not one of {', '.join(CPU_BUFFER_MODES)}")
    return value


def printable_env(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def effective_mode(requested: str, extra_bufts: tuple[str, ...], gpu_build: bool) -> str:
    """What a load does: "auto" becomes "explicit" where the build registers a crashing buffer
    type and no GPU backend's host buffer comes first (see above)."""
    if requested != "auto" or gpu_build:
        return requested
    return "explicit" if any(b in CRASHING_BUFFER_TYPES for b in extra_bufts) else "auto"


def crash_reasons(extra_bufts: tuple[str, ...]) -> list[str]:
    return [f"{b}: {CRASHING_BUFFER_TYPES[b]}" for b in extra_bufts if b in CRASHING_BUFFER_TYPES]


def explicit_repack(tensors: Sequence[WeightTensor], rows: dict[GGMLQuantizationType, int]) -> list[str]:
    """Names of the tensors an explicit load hands to CPU_REPACK: is_repacked's, by name."""
    return [t.name for t in tensors if is_repacked(t, rows)]


@functools.lru_cache(maxsize=1)
def build_facts() -> tuple[tuple[str, ...], bool, CpuFeatures]:
    """(extra CPU buffer types, has a GPU backend, CPU features) of the llama.cpp build
    llama-cpp-python ships: read from the library itself, not /proc/cpuinfo."""
    import llama_cpp

    from alpaca_local.convert.ggml import cpu_extra_buffer_types

    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    cpu = CpuFeatures(parse_system_info(info), "llama_print_system_info")
    return tuple(cpu_extra_buffer_types()), bool(llama_cpp.llama_supports_gpu_offload()), cpu


def machine_mode(no_repack: bool = False) -> str:
    """The effective mode of a load on this machine with this build."""
    bufts, gpu, _ = build_facts()
    return effective_mode(requested_mode(no_repack), bufts, gpu)


# --------------------------------------------------------------------------
# --n-cpu-moe: a mixture-of-experts model's experts kept in CPU buffers
# --------------------------------------------------------------------------
#
# LLM_FFN_EXPS_REGEX (common/common.h:1198). `--n-cpu-moe N` adds one override per layer
# i < N, "blk\.{i}" + this, to ggml_backend_cpu_buffer_type (llm_add_n_cpu_ffn_overrides,
# common/common.h:1210-1217). The loader takes the first override whose regex matches anywhere
# in the name (std::regex_search, src/llama-model-loader.cpp:1235-1258), and a CPU override picks
# the buffer type as an unoffloaded layer would (select_weight_buft over buft_list_cpu,
# :1240-1242): on CUDA with mmap the mapped file, elsewhere CPU_REPACK where its rules take the
# type. The planner counts these tensors (plan.moe) and the runtime sends the same list
# (run.cpu_buffers.apply).
EXPERTS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"


def expert_override_patterns(n_cpu_moe: int) -> list[str]:
    """The tensor_buft_overrides patterns of `--n-cpu-moe n_cpu_moe`, in llama.cpp's order."""
    return [rf"blk\.{i}{EXPERTS_REGEX}" for i in range(n_cpu_moe)]


_LAYER_EXPERT = re.compile(rf"^blk\.(\d+){EXPERTS_REGEX}")


def kept_on_cpu(name: str, n_cpu_moe: int) -> bool:
    """Whether `--n-cpu-moe n_cpu_moe` puts tensor `name` in a CPU buffer (see above): for
    GGUF names, the expert tensors of layers below n_cpu_moe."""
    m = _LAYER_EXPERT.match(name)
    return m is not None and int(m[1]) < n_cpu_moe

"""How much memory a model takes in llama.cpp, per quant level: pure arithmetic over `ModelShape`.

In:  a `ModelShape` (built from a GGUF header, a Hugging Face config or a
     catalog entry) and the run settings (context, batch, KV cache type).
Out: `LevelPlan` per quant level: file size, weights on the GPU, weights in
     RAM (the mapped file plus the CPU_REPACK copies ggml-cpu makes of some
     quant types, see REPACK_RULES), KV cache, compute buffer, output buffer,
     overhead; `fit` answers "does it fit", "how many layers fit" and
     "largest context that fits".

Every number follows how llama.cpp (the tree vendored in llama-cpp-python
0.3.36) allocates, with the source named next to it.  Tensor types and bytes
come from `quant_rules.choose_types` / `tensor_nbytes`, the functions
`convert` uses, so a predicted file size equals the written one.
Measured errors against llama.cpp's own reports are in benchmarks/plan.py.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from alpaca_local.convert import quant_levels, quant_rules
from alpaca_local.convert.architectures import ARCHITECTURES, Architecture
from alpaca_local.convert.cpu_repack import (  # noqa: F401  (re-exported: the planner's public names)
    TENSOR_ALIGNMENT,
    GET_ROWS_TENSORS,
    CpuFeatures,
    NO_REPACK,
    parse_cpuinfo,
    detect_cpu,
    repack_rows_for,
    REPACK_RULES,
    is_repacked,
    machine_mode,
    requested_mode,
)
from alpaca_local.plan import moe
from alpaca_local.plan.shape import ModelShape, PlannedTensor
from alpaca_local.source.config import MAX_CTX, MAX_DIM, MAX_EXPERTS, MAX_VOCAB, ModelConfig, dims_of
from alpaca_local.errors import InputError, UsageError
from alpaca_local.convert.gguf_read import GGUFHeader

T = GGMLQuantizationType
MiB = 1 << 20
GiB = 1 << 30

# The levels the table shows by default, best quality first (its row order); `--levels all`
# shows the whole ladder (quant_levels.LADDER, in measured quality order).
LEVELS = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_xs", "q3_k_m", "iq3_m", "iq2_m")
CACHE_TYPES: dict[str, GGMLQuantizationType] = {"f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}

# llama_context_params defaults (src/llama-context.cpp llama_context_default_params).
DEFAULT_BATCH = 512  # n_batch; n_ubatch is min(n_batch, 512)
DEFAULT_UBATCH = 512
# llama-context.cpp:290: cparams.n_ctx = GGML_PAD(n_ctx, 256): the KV cache has this many cells.
CTX_PAD = 256
# GGUF data alignment (general.alignment default, ggml/include/gguf.h GGUF_DEFAULT_ALIGNMENT).
GGUF_ALIGNMENT = 32
# CUDA buffers: ggml_backend_cuda_buffer_type_get_alignment returns 128 and
# get_alloc_size pads the last row of quantized matrices to MATRIX_ROW_PADDING
# (512) values (ggml/src/ggml-cuda/ggml-cuda.cu:897-920, common.cuh:186).
CUDA_ALIGNMENT = 128
CUDA_MATRIX_ROW_PADDING = 512

# Memory llama.cpp never reports but the process takes on the device, measured on an NVIDIA
# H200 (driver 580, CUDA 13; benchmarks/gpu.py, RESULTS.md "GPU") as nvidia-smi's count less
# the buffers llama.cpp logs: the CUDA context with the ggml-cuda kernels it loads, 524-528 MiB
# once the model is loaded; then ggml-cuda's memory pool and cuBLAS's workspace, which the first
# prompt batch grows by 184-186 MiB, 78 with flash attention (no KQ product through cuBLAS).
# 710-714 MiB in all, 606 with flash attention, for dense and MoE models alike. A GPU with fewer
# multiprocessors likely takes less (the driver reserves local memory per resident thread), so
# on small cards this errs on the safe side.
CUDA_CONTEXT = 528 * MiB
CUDA_POOL = 186 * MiB
CUDA_POOL_FLASH_ATTN = 78 * MiB
CUDA_OVERHEAD = CUDA_CONTEXT + CUDA_POOL
# Metal: command queues and pipeline states; small next to the buffers.
METAL_OVERHEAD = 128 * MiB
# CPU: llama.cpp + Python + our libraries resident besides the buffers.
CPU_OVERHEAD = 160 * MiB
OVERHEAD = {"cuda": CUDA_OVERHEAD, "metal": METAL_OVERHEAD, "cpu": CPU_OVERHEAD}

# Head-room kept free when recommending: other processes, the desktop and
# allocator fragmentation vary by machine. 5% of the memory, at least 256 MiB.
SAFETY_FRACTION = 0.05
SAFETY_MIN = 256 * MiB

# Header size of a catalog model without its tokenizer: per token the GGUF
# holds the string (u64 length + ~6 bytes for SentencePiece pieces), a f32
# score and an i32 type; plus ~4 KiB of other metadata (measured on our files).
HEADER_BYTES_PER_TOKEN = 8 + 6 + 4 + 4
HEADER_BYTES_FIXED = 4096

# Architectures whose graph interleaves sliding-window (SWA) and full-attention layers,
# with llama.cpp's default pattern: layer il slides when il % n < n - 1
# (llama_hparams::set_swa_pattern, src/llama-hparams.cpp:8-17), so every other layer for 2.
# Gemma 2: load_swa_pattern(ml, 2) and n_swa 4096 unless the file says otherwise
# (src/models/gemma2.cpp load_arch_hparams).  Other architectures build a plain KV cache
# even where config.json has a sliding_window (Mistral v0.1, Qwen2's use_sliding_window).
# Gemma 3: load_swa_pattern(ml, 6), five sliding layers then a global one, and sliding
# layers only when the file has a window (src/models/gemma3.cpp load_arch_hparams: no default).
SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
SWA_DEFAULT_WINDOW = {"gemma2": 4096, "gemma3": 0}
# Gemma 2 keeps sa_out (the residual around the feed-forward block, for its ffn_post_norm)
# alive through the FFN: one more width of n_embd at that moment (src/models/gemma2.cpp).
FFN_EXTRA_WIDTHS = {"gemma2": 1}


@dataclass(frozen=True)
class RunSettings:
    n_ctx: int = 2048
    n_batch: int = DEFAULT_BATCH
    cache_type: str = "f16"
    backend: str = "cuda"  # "cuda", "metal" or "cpu": which overhead and alignment apply
    cpu: CpuFeatures | None = None  # decides CPU_REPACK; None: this machine's (detect_cpu)
    # How alpaca-local's loads place CPU weights (convert/cpu_repack.py CPU_BUFFER_MODES, the
    # effective mode): "auto", "explicit" (an AMX build) or "none" (--no-repack). None: this
    # machine's, from $ALPACA_LOCAL_CPU_BUFFERS and the build, asked only where it matters.
    cpu_buffers: str | None = None
    # Sliding-window layers get a full-size cache: llama_context_default_params has
    # swa_full = true (src/llama-context.cpp:3788) and llama-cpp-python 0.3.36 keeps it unless
    # given swa_full= (llama_cpp/llama.py:363).  False: window + ubatch cells (kv_cells).
    swa_full: bool = True
    # A LoRA adapter GGUF applied at run time (plan --lora): its .lora_a/.lora_b tensors.
    lora: tuple[PlannedTensor, ...] = ()

    @property
    def cpu_features(self) -> CpuFeatures:
        return detect_cpu() if self.cpu is None else self.cpu

    @property
    def n_ubatch(self) -> int:
        return min(self.n_batch, DEFAULT_UBATCH)

    @property
    def flash_attn(self) -> bool:
        # A quantized V cache needs flash attention (llama-context.cpp refuses otherwise).
        return self.cache_type != "f16"


@dataclass(frozen=True)
class LevelPlan:
    level: str
    file_bytes: int
    exact_file: bool  # False where the header size is estimated (catalog models)
    weights_gpu: int  # model buffers on the device
    weights_cpu: int  # model buffers in host RAM (token_embd at least), repack included
    kv: int
    compute: int
    output: int  # host buffer for logits
    overhead: int
    n_gpu_layers: int  # -ngl used for this plan (n_layer + 1 = everything)
    repack: int = 0  # the CPU_REPACK buffer: part of weights_cpu, in addition to the mapped file
    n_cpu_moe: int = 0  # --n-cpu-moe: the experts of the first n_cpu_moe layers stay in RAM

    @property
    def total_gpu(self) -> int:
        return self.weights_gpu + self.kv + self.compute + self.overhead


# --------------------------------------------------------------------------
# Building a ModelShape
# --------------------------------------------------------------------------


def shape_from_config(cfg: ModelConfig, name: str, source: str) -> ModelShape:
    arch = ARCHITECTURES[cfg.hf_arch]
    pattern = SWA_PATTERN.get(arch.arch_name, 0)
    n_swa = (cfg.sliding_window or SWA_DEFAULT_WINDOW[arch.arch_name]) if pattern else 0
    return ModelShape(
        **dims_of(cfg), name=name, arch=arch.arch_name, source=source,
        rope_freqs="rope_freqs.weight" in arch.expected_tensors(cfg), n_swa=n_swa, swa_pattern=pattern,
    )


def _file_level(header: GGUFHeader) -> str | None:
    return quant_rules.level_of_file_type(header.kv.get("general.file_type"))


def shape_from_gguf(header: GGUFHeader) -> ModelShape:
    """Model facts from a GGUF header (llama.cpp's own keys, LLM_KV_* in src/llama-arch.cpp).
    A per-tensor mix (`convert --target-size`) is planned from its own tensors like any file, at
    the level its general.file_type names; `file_target` says it is a mix."""
    from alpaca_local.convert.search import recipe_budget

    a = header.arch

    def positive(key: str, default: int | None = None, most: int = MAX_DIM, least: int = 1) -> int:
        # The arithmetic below (and the tensor lists it builds) trusts these: a crafted
        # header must not make it loop over 2^31 layers or plan with zero heads.
        value = header.get_int(f"{a}.{key}", default)
        if not least <= value <= most:
            raise InputError(f"{header.path}: metadata {a}.{key} = {value} is not between {least} and {most}")
        return value

    n_head = positive("attention.head_count")
    hidden = positive("embedding_length")
    n_kv_head = positive("attention.head_count_kv", n_head)
    if n_head % n_kv_head:
        raise InputError(f"{header.path}: metadata {a}.attention.head_count {n_head} is not a multiple of "
                         f"{a}.attention.head_count_kv {n_kv_head}")
    names = {t.name for t in header.tensors}
    tok = header.kv.get("tokenizer.ggml.tokens")
    vocab = positive("vocab_size", len(tok) if isinstance(tok, list) else None, most=MAX_VOCAB)
    tensors = tuple(PlannedTensor(t.name, t.shape, t.ggml_type, t.nbytes) for t in sorted(header.tensors, key=lambda t: (t.part, t.offset)))
    level = _file_level(header)
    pattern = SWA_PATTERN.get(a, 0)
    if pattern:  # LLM_KV_ATTENTION_SLIDING_WINDOW(_PATTERN), read by load_arch_hparams
        pattern = header.get_int(f"{a}.attention.sliding_window_pattern", pattern)
        if not 1 <= pattern <= MAX_DIM:
            raise InputError(f"{header.path}: metadata {a}.attention.sliding_window_pattern = {pattern} "
                             f"is not between 1 and {MAX_DIM}")
    has_window = SWA_DEFAULT_WINDOW.get(a) or f"{a}.attention.sliding_window" in header.kv
    n_swa = positive("attention.sliding_window", SWA_DEFAULT_WINDOW[a], most=MAX_CTX) if pattern and has_window else 0
    pattern = pattern if n_swa else 0
    # LLM_KV_EXPERT_* (llama_model::load_hparams): 0 < expert_used_count <= expert_count when there are experts.
    n_expert = positive("expert_count", 0, most=MAX_EXPERTS, least=0)
    n_expert_used = positive("expert_used_count", 0, most=max(n_expert, 1), least=1 if n_expert else 0)
    return ModelShape(
        name=header.path.name, arch=a, n_layer=positive("block_count", most=max(1, len(header.tensors))),
        hidden=hidden, n_head=n_head, n_kv_head=n_kv_head,
        head_dim=positive("attention.key_length", max(1, hidden // n_head)),
        intermediate=positive("feed_forward_length", most=16 * MAX_DIM), vocab_size=vocab,
        n_ctx=positive("context_length", 2048, most=MAX_CTX), tie_embeddings="output.weight" not in names,
        source="gguf", file_quant=level, file_tensors=tensors, file_bytes=header.file_size,
        file_target=recipe_budget(header.kv) if level else None,
        header_bytes=((level, header.header_bytes),) if level else (),
        rope_freqs="rope_freqs.weight" in names, n_swa=n_swa, swa_pattern=pattern,
        n_expert=n_expert, n_expert_used=n_expert_used,
        n_ff_exp=positive("expert_feed_forward_length", 0, most=16 * MAX_DIM, least=0),
        n_ff_shexp=positive("expert_shared_feed_forward_length", 0, most=16 * MAX_DIM, least=0),
    )


def _architecture(shape: ModelShape) -> Architecture | None:
    return next((a for a in ARCHITECTURES.values() if a.arch_name == shape.arch), None)


def _as_config(shape: ModelShape, arch: Architecture) -> ModelConfig:
    return ModelConfig(
        **dims_of(shape), hf_arch=arch.hf_class, rope_theta=10000.0, rms_eps=1e-6,
        rope_scaling={"rope_type": "llama3"} if shape.rope_freqs else None,
        sliding_window=shape.n_swa or None,
    )


def levels_for(shape: ModelShape, wanted: tuple[str, ...] = LEVELS) -> tuple[str, ...]:
    """The `wanted` levels we can size, best quality first, with a GGUF file's own level
    always among them: all of them for a known architecture, else the file's own only."""
    if _architecture(shape) is None:
        return (shape.file_quant,) if shape.file_quant else ()
    return tuple(lv for lv in quant_levels.LADDER if lv in wanted or lv == shape.file_quant)


def _facts(shape: ModelShape, arch: Architecture) -> quant_rules.ModelFacts:
    return quant_rules.ModelFacts(arch=arch.arch_name, n_layer=shape.n_layer, n_head=shape.n_head,
                                  n_head_kv=shape.n_kv_head, n_expert=shape.n_expert)


@functools.lru_cache(maxsize=64)
def needs_imatrix(shape: ModelShape, level: str) -> bool:
    """The level needs an importance matrix for this model (llama-quantize's rule): then its
    file is planned as `convert --imatrix` writes it (the imatrix changes a few types), and
    its header holds the imatrix's quantize.imatrix.* keys, which the plan cannot know."""
    arch = _architecture(shape)
    if arch is None or level == shape.file_quant:
        return False
    specs = [quant_rules.TensorSpec(n, t) for n, (_, t) in arch.expected_tensors(_as_config(shape, arch)).items()]
    return bool(quant_rules.imatrix_required(specs, quant_rules.choose_types(specs, level, _facts(shape, arch)), level))


def imatrix_levels(shape: ModelShape, quants: Sequence[str]) -> set[str]:
    """Which of `quants` llama-quantize refuses without an importance matrix for this model:
    its per-tensor rule on the model's shapes, or for an architecture we do not know, the
    level's usual answer (`quant_levels.Level.imatrix`)."""
    if _architecture(shape) is None:
        return {q for q in quants if quant_levels.LEVELS[q].imatrix}
    return {q for q in quants if needs_imatrix(shape, q)}


@functools.lru_cache(maxsize=32)
def tensors_for(shape: ModelShape, level: str) -> tuple[PlannedTensor, ...]:
    """Every tensor of the file at `level`, in file order, with convert's type rules."""
    if level == shape.file_quant and shape.file_tensors:
        return shape.file_tensors
    arch = _architecture(shape)
    if arch is None:
        raise InputError(f"architecture {shape.arch!r} is unknown to the planner; only the file's own level can be sized")
    cfg = _as_config(shape, arch)
    # Every tensor convert writes: weights, biases and generated ones (rope_freqs).
    specs = [quant_rules.TensorSpec(name, tshape) for name, (_, tshape) in arch.expected_tensors(cfg).items()]
    types = quant_rules.choose_types(specs, level, _facts(shape, arch), has_imatrix=needs_imatrix(shape, level))
    order = quant_rules.llama_quantize_order([s.name for s in specs])
    return tuple(
        PlannedTensor(specs[i].name, specs[i].shape, types[i], quant_rules.tensor_nbytes(specs[i].shape, types[i]))
        for i in order
    )


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def file_size(shape: ModelShape, level: str) -> tuple[int, bool]:
    """(bytes, exact): header padded to the alignment + every tensor padded to it."""
    data = sum(_pad(t.nbytes, GGUF_ALIGNMENT) for t in tensors_for(shape, level))
    headers = dict(shape.header_bytes)
    if level in headers:
        return headers[level] + data, not needs_imatrix(shape, level)
    header = HEADER_BYTES_FIXED + HEADER_BYTES_PER_TOKEN * shape.vocab_size
    return _pad(header, GGUF_ALIGNMENT) + data, False


# --------------------------------------------------------------------------
# Memory components
# --------------------------------------------------------------------------


def padded_ctx(n_ctx: int) -> int:
    return _pad(n_ctx, CTX_PAD)


def _layer_of(name: str) -> int | None:
    return int(name.split(".")[1]) if name.startswith("blk.") else None


def _on_gpu(name: str, n_layer: int, n_gpu_layers: int) -> bool:
    """llama_model::load_tensors (src/llama-model.cpp:1589-1614): layers il >= n_layer+1-ngl go
    to the GPU; the output layer counts as layer n_layer, so it goes first (ngl >= 1); the input
    layer (token_embd) always stays on the CPU."""
    il = _layer_of(name)
    if il is None:
        il = -1 if name.startswith("token_embd") else n_layer
    return il >= 0 and il >= n_layer + 1 - n_gpu_layers


def _gpu_alloc_size(t: PlannedTensor, backend: str) -> int:
    if backend != "cuda":
        return _pad(t.nbytes, GGUF_ALIGNMENT)
    size = t.nbytes
    row = t.shape[-1]
    block, type_size = GGML_QUANT_SIZES[t.ggml_type]
    if t.ggml_type not in (T.F32, T.F16, T.BF16) and row % CUDA_MATRIX_ROW_PADDING:
        size += (CUDA_MATRIX_ROW_PADDING - row % CUDA_MATRIX_ROW_PADDING) // block * type_size
    return _pad(size, CUDA_ALIGNMENT)


def weights_split(tensors: tuple[PlannedTensor, ...], shape: ModelShape, ngl: int, backend: str,
                  repack_rows: dict[GGMLQuantizationType, int] | None = None,
                  tied_output_repacked: bool = True, n_cpu_moe: int = 0) -> tuple[int, int, int]:
    """(device bytes, CPU_Mapped bytes, CPU_REPACK bytes) of the model buffers for -ngl `ngl`
    and `--n-cpu-moe n_cpu_moe` (those experts take the CPU buffers an unoffloaded layer would).

    CPU_Mapped: llama.cpp maps the file and wraps the range from the first to
    the last tensor that stays mapped (llama_model_loader::get_mapping_range).
    CPU_REPACK: the CPU tensors `is_repacked` picks (types and row multiples in
    `repack_rows`, see REPACK_RULES), each padded to TENSOR_ALIGNMENT.
    A tied model's output layer is a second copy of token_embd (TENSOR_DUPLICATED):
    on the device when ngl >= 1, else repacked when its type is and `tied_output_repacked`
    (llama.cpp's own placement; an explicit one names tensors, and cannot name this one).
    """
    rows = repack_rows or {}
    gpu, repack, cpu_spans, offset = 0, 0, [], 0
    for t in tensors:
        if _on_gpu(t.name, shape.n_layer, ngl) and not moe.kept_on_cpu(t.name, n_cpu_moe):
            gpu += _gpu_alloc_size(t, backend)
        elif is_repacked(t, rows):
            repack += _pad(t.nbytes, TENSOR_ALIGNMENT)
        else:
            cpu_spans.append((offset, offset + t.nbytes))
        offset += _pad(t.nbytes, GGUF_ALIGNMENT)
    if shape.tie_embeddings:
        embd = [t for t in tensors if t.name == "token_embd.weight"]
        if ngl >= 1:
            gpu += sum(_gpu_alloc_size(t, backend) for t in embd)
        else:
            repack += sum(_pad(t.nbytes, TENSOR_ALIGNMENT) for t in embd
                          if tied_output_repacked and is_repacked(t, rows, as_output=True))
    cpu = cpu_spans[-1][1] - cpu_spans[0][0] if cpu_spans else 0
    return gpu, cpu, repack


def lora_split(tensors: tuple[PlannedTensor, ...], shape: ModelShape, ngl: int, backend: str) -> tuple[int, int]:
    """(device bytes, host bytes) of a LoRA adapter's tensors. llama_adapter_lora_init
    (src/llama-adapter.cpp) allocates each pair in the buffer type of the weight it adapts,
    and in plain CPU memory where that weight is repacked or mapped."""
    gpu = cpu = 0
    for t in tensors:
        if backend != "cpu" and _on_gpu(t.name.rsplit(".", 1)[0], shape.n_layer, ngl):
            gpu += _gpu_alloc_size(t, backend)
        else:
            cpu += _pad(t.nbytes, TENSOR_ALIGNMENT)
    return gpu, cpu


def swa_cells(shape: ModelShape, n_ctx: int, n_ubatch: int = DEFAULT_UBATCH, swa_full: bool = True) -> int:
    """Cells of the sliding-window layers' cache (llama_kv_cache_iswa, src/llama-kv-cache-iswa.cpp:69-78):
    the full kv_size with swa_full, else GGML_PAD(min(kv_size, n_swa + n_ubatch), 256)
    (n_seq_max 1: llama-cpp-python's default)."""
    kv_size = padded_ctx(n_ctx)
    return kv_size if swa_full else _pad(min(kv_size, shape.n_swa + n_ubatch), CTX_PAD)


def kv_bytes(shape: ModelShape, n_ctx: int, cache_type: str, n_layers: int | None = None,
             n_ubatch: int = DEFAULT_UBATCH, swa_full: bool = True) -> int:
    """llama_kv_cache (src/llama-kv-cache.cpp:100-260): per layer one K and one V tensor of
    n_embd_k_gqa x cells in the cache type; the cells are n_ctx padded to 256, or `swa_cells`
    for a sliding-window layer (a second cache, llama_kv_cache_iswa).  `n_layers`: the last
    n_layers layers only (those offloaded)."""
    ggml_type = CACHE_TYPES[cache_type]
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    row = shape.n_kv_gqa // block * type_size  # ggml_row_size
    layers = shape.n_layer if n_layers is None else n_layers
    full, swa = padded_ctx(n_ctx), swa_cells(shape, n_ctx, n_ubatch, swa_full)
    cells = sum(swa if shape.is_swa(il) else full for il in range(shape.n_layer - layers, shape.n_layer))
    return 2 * cells * row


def compute_bytes(shape: ModelShape, s: RunSettings) -> int:
    """The scheduler's compute buffer (graph_reserve in src/llama-context.cpp) at its worst case,
    a ubatch of n_tokens = min(n_ubatch, n_ctx) with every cell of the KV cache in view.

    ggml-alloc reuses memory, so the buffer is the peak of live tensors, in
    floats per token, at the largest of three moments of one layer's graph
    (build_attn_mha in src/llama-graph.cpp, llm_build_llama in src/models/llama.cpp):
      attention: KQ f32 [n_kv, n_tokens, n_head] + KQ mask f32 [n_kv, n_tokens]
                 (soft_max runs in place) + 3 activations of width n_embd and 2 of
                 Q's width n_head x head_dim + the V-cache row indices (i64,
                 n_embd_v_gqa per token) + 5 ints of inputs;
                 with flash attention there is no KQ matrix and the mask is f16;
      feed-forward: gate, up and their product (n_ff each) + 5 of width n_embd
                 (+ FFN_EXTRA_WIDTHS);
      output: the logits f32 [n_vocab, n_outputs], n_outputs = n_tokens at reserve
                 (llama-context.cpp:670 n_outputs_pp) + 3 of width n_embd; the
                 vocab term dominates for large vocabularies (256000 for Gemma).
    A model with sliding-window layers (build_attn_inp_kv_iswa, src/llama-graph.cpp:3425)
    has a second set of inputs alive for the whole graph: its own KQ mask
    [swa_cells, n_tokens] and its own K/V row indices (i64: 2 x n_embd_v_gqa + 2 per token).
    The widths were calibrated on CPU against llama.cpp's "compute buffer size"
    (benchmarks/plan.py prints the errors; tests/test_plan_archs.py pins them).
    """
    n_tokens = min(s.n_ubatch, padded_ctx(s.n_ctx))
    n_kv, h, kv_w = padded_ctx(s.n_ctx), shape.hidden, shape.n_kv_gqa
    swa = shape.n_swa > 0
    n_kv_swa = swa_cells(shape, s.n_ctx, s.n_ubatch, s.swa_full) if swa else 0
    swa_idxs = 2 * kv_w + 2 if swa else 0
    if s.flash_attn:
        mask_bytes = 2 * (n_kv + n_kv_swa) * n_tokens
        ffn_fa = moe.ffn_floats(shape, 0) if shape.is_moe else 3 * shape.intermediate + 3 * h
        per_token = max(ffn_fa, shape.vocab_size + 2 * h + 2 * kv_w) + 64 + swa_idxs
        return mask_bytes + 4 * n_tokens * per_token
    attention = (n_kv * (shape.n_head + 1) + n_kv_swa + 3 * h + 2 * shape.n_q + 2 * kv_w + 5 + swa_idxs
                 + moe.attention_extra_floats(shape))
    ffn = 3 * shape.intermediate + (5 + FFN_EXTRA_WIDTHS.get(shape.arch, 0)) * h + 5 + (2 if swa else 0)
    if shape.is_moe:  # no dense FFN: the routed (and shared) experts' moment, see plan.moe
        ffn = moe.ffn_floats(shape, n_kv)
    output = shape.vocab_size + 3 * h + 5
    return 4 * n_tokens * max(attention, ffn, output)


def output_bytes(shape: ModelShape, n_outputs: int = 1) -> int:
    """llama_context::output_reserve (src/llama-context.cpp:2116): n_vocab floats per output,
    at least n_seq_max (1) outputs; host memory. Chat asks for the last token's logits only."""
    return 4 * shape.vocab_size * n_outputs


def overhead_bytes(s: RunSettings) -> int:
    """What the runtime takes beside its buffers on the backend `s` plans for (OVERHEAD); CUDA's
    memory pool grows less with flash attention, which a quantized cache turns on."""
    if s.backend == "cuda" and s.flash_attn:
        return CUDA_CONTEXT + CUDA_POOL_FLASH_ATTN
    return OVERHEAD[s.backend]


def cpu_placement(s: RunSettings, shape: ModelShape,
                  tensors: tuple[PlannedTensor, ...]) -> tuple[dict[GGMLQuantizationType, int], bool]:
    """(the types CPU_REPACK takes, whether a tied output is repacked) under `s`'s placement.
    The build is asked (importing llama.cpp) only when the answer turns on it: "auto" on an
    AMX build is "explicit", which differs from llama.cpp's own placement only in a tied
    output of a repacked type."""
    mode = s.cpu_buffers or requested_mode()
    if mode == "none":
        return {}, False
    rows = repack_rows_for(s.backend, s.cpu_features)
    tied_matters = shape.tie_embeddings and any(
        is_repacked(t, rows, as_output=True) for t in tensors if t.name == "token_embd.weight")
    if mode == "auto" and s.cpu_buffers is None and tied_matters:
        mode = machine_mode()
    return rows, mode == "auto"


def plan_level(shape: ModelShape, level: str, s: RunSettings, n_gpu_layers: int | None = None,
               n_cpu_moe: int = 0) -> LevelPlan:
    """Memory of one level with `n_gpu_layers` offloaded (default: all, n_layer + 1) and the
    experts of the first `n_cpu_moe` layers kept in RAM (llama.cpp's --n-cpu-moe)."""
    ngl = shape.n_layer + 1 if n_gpu_layers is None else n_gpu_layers
    tensors = tensors_for(shape, level)
    size, exact = file_size(shape, level)
    on_gpu = s.backend != "cpu" and ngl > 0
    gpu_layers = max(0, min(ngl, shape.n_layer + 1) - 1) if on_gpu else 0
    rows, tied = cpu_placement(s, shape, tensors)
    if s.backend == "cpu":
        w_gpu, mapped, repack = weights_split(tensors, shape, 0, "cpu", rows, tied)
        kv_dev = kv_bytes(shape, s.n_ctx, s.cache_type, None, s.n_ubatch, s.swa_full)
    else:
        w_gpu, mapped, repack = weights_split(tensors, shape, ngl if on_gpu else 0, s.backend, rows, tied, n_cpu_moe)
        kv_dev = kv_bytes(shape, s.n_ctx, s.cache_type, gpu_layers, s.n_ubatch, s.swa_full)
    lora_gpu, lora_cpu = lora_split(s.lora, shape, ngl if on_gpu else 0, s.backend)
    w_gpu, w_cpu = w_gpu + lora_gpu, mapped + repack + lora_cpu
    compute = compute_bytes(shape, s) if (on_gpu or s.backend == "cpu") else 0
    if on_gpu and s.backend == "cuda":  # prompt batches run host-weight ops on the GPU (plan.moe)
        host = [t for t in tensors if t.name not in GET_ROWS_TENSORS
                and not (_on_gpu(t.name, shape.n_layer, ngl) and not moe.kept_on_cpu(t.name, n_cpu_moe))]
        compute += moe.offload_copy_bytes(host, min(s.n_ubatch, padded_ctx(s.n_ctx)), lambda t: _gpu_alloc_size(t, "cuda"))
    return LevelPlan(
        level=level, file_bytes=size, exact_file=exact, weights_gpu=w_gpu if s.backend != "cpu" else w_cpu,
        weights_cpu=w_cpu, kv=kv_dev, compute=compute, output=output_bytes(shape),
        overhead=overhead_bytes(s) if (on_gpu or s.backend == "cpu") else 0, n_gpu_layers=ngl, repack=repack,
        n_cpu_moe=n_cpu_moe,
    )


# --------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------


def usable(budget: int) -> int:
    """Budget minus the safety head-room (SAFETY_FRACTION, at least SAFETY_MIN)."""
    return budget - max(int(budget * SAFETY_FRACTION), SAFETY_MIN)


def fits(p: LevelPlan, budget: int) -> bool:
    return p.total_gpu <= usable(budget)


def max_gpu_layers(shape: ModelShape, level: str, s: RunSettings, budget: int) -> int:
    """Largest -ngl whose device memory fits (0 when not even the output layer does).

    Device memory only grows with -ngl, so a binary search over 0..n_layer+1.
    """
    lo, hi = 0, shape.n_layer + 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(plan_level(shape, level, s, mid), budget):
            lo = mid
        else:
            hi = mid - 1
    return lo


def max_context(shape: ModelShape, level: str, s: RunSettings, budget: int) -> int:
    """Largest n_ctx (a multiple of 256, at most the training context) that fits fully; 0 if none."""
    hi_ctx = max(padded_ctx(shape.n_ctx), CTX_PAD)
    lo, hi = 0, hi_ctx // CTX_PAD
    while lo < hi:  # binary search: memory grows with the context
        mid = (lo + hi + 1) // 2
        if fits(plan_level(shape, level, replace(s, n_ctx=mid * CTX_PAD), None), budget):
            lo = mid
        else:
            hi = mid - 1
    return lo * CTX_PAD


@dataclass(frozen=True)
class Recommendation:
    level: str | None
    n_gpu_layers: int  # n_layer + 1 when it fits fully
    full: bool
    gpu_bytes: int
    cpu_bytes: int
    reason: str
    n_cpu_moe: int = 0  # MoE: the experts of the first n_cpu_moe layers stay in RAM (plan.moe_fit)


def recommend(shape: ModelShape, plans: dict[str, LevelPlan], s: RunSettings, budget: int) -> Recommendation:
    """Highest-quality level that fits fully; else the level that puts the most layers on the GPU.
    `plans` is best quality first; the levels only for models trained for them (tq1_0...) are
    never recommended unless they are the file's own."""
    plans = {lv: p for lv, p in plans.items()
             if not quant_levels.LEVELS[lv].trained_for or lv == shape.file_quant}
    for level, p in plans.items():
        if fits(p, budget):
            return Recommendation(level, shape.n_layer + 1, True, p.total_gpu, p.weights_cpu + p.output,
                                  f"highest quality that fits, leaving {fmt_gib(budget - p.total_gpu)} free "
                                  f"(safety margin {fmt_gib(budget - usable(budget))})")
    best: tuple[int, str] | None = None
    for level in plans:
        ngl = max_gpu_layers(shape, level, s, budget)
        if ngl and (best is None or ngl > best[0]):
            best = (ngl, level)
    if best is None:
        return Recommendation(None, 0, False, 0, 0, "not even one layer fits; run on the CPU (-ngl 0)")
    ngl, level = best
    p = plan_level(shape, level, s, ngl)
    # The KV of the layers left on the CPU: all layers' minus the offloaded (last) ones'.
    kv_all = kv_bytes(shape, s.n_ctx, s.cache_type, None, s.n_ubatch, s.swa_full)
    cpu = p.weights_cpu + p.output + kv_all - kv_bytes(shape, s.n_ctx, s.cache_type, max(ngl - 1, 0),
                                                       s.n_ubatch, s.swa_full)
    return Recommendation(level, ngl, False, p.total_gpu, cpu,
                          f"no level fits fully; {level} puts the most layers ({ngl} of {shape.n_layer + 1}) on the GPU")


def fmt_gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def check_settings(s: RunSettings) -> None:
    if s.cache_type not in CACHE_TYPES:
        raise UsageError(f"unknown cache type {s.cache_type!r}; choose one of: {', '.join(CACHE_TYPES)}")
    if not 1 <= s.n_ctx <= 1 << 24:
        raise UsageError(f"context {s.n_ctx} is out of range; give 1 to {1 << 24} or 'max'")
    if not 1 <= s.n_batch <= 1 << 16:
        raise UsageError(f"batch {s.n_batch} is out of range; give 1 to 65536")


# --------------------------------------------------------------------------
# Loading (the I/O edge): MODEL argument -> ModelShape
# --------------------------------------------------------------------------


def shape_from_hf(folder, weights=None, name: str | None = None) -> ModelShape:
    """Shape of a Hugging Face folder, with the exact header size convert would write per level.

    `weights` and `name`: a Hub model's tensors (streamed: only headers are read) and name."""
    from pathlib import Path

    from alpaca_local.convert import pipeline as convert  # heavy imports only for this input kind

    folder = Path(folder)
    first = convert.plan_conversion(folder, "f16", weights=weights, name=name)
    shape = shape_from_config(first.config, first.name, "hf")
    # Two header sizes: the converter's own outtypes (no quantization_version) and every
    # llama-quantize level (file type and tensor types are fixed-size fields).
    sizes = {kind: convert.header_nbytes(replace(first, quant=kind)) for kind in ("f16", "q8_0")}
    headers = {lv: sizes["f16" if quant_levels.LEVELS[lv].converter_outtype else "q8_0"] for lv in quant_rules.QUANTS}
    return replace(shape, header_bytes=tuple(headers.items()))


def _shape_from_hub(src) -> ModelShape:
    """A Hub model: exact from its safetensors headers, else (a .bin repo) from config.json alone."""
    from alpaca_local.convert.architectures import CONFIG_DEFAULTS, SUPPORTED
    from alpaca_local.source.config import load_config

    try:
        if src.has_weights:
            return shape_from_hf(src.folder, src.weights(), src.name)
        return shape_from_config(load_config(src.folder, SUPPORTED, CONFIG_DEFAULTS), src.name, "hf")
    finally:
        src.close()


def load_shape(model: str | None) -> ModelShape:
    """MODEL as given on the command line: a GGUF file, a HF folder or a catalog name."""
    from pathlib import Path

    from alpaca_local.plan import catalog
    from alpaca_local.convert.split import read_gguf_model

    from alpaca_local.source.hub import HubSource, resolve_source

    name = model or catalog.DEFAULT_MODEL
    # A Hub id reads small files and safetensors headers only; a missing .gguf path stays a path.
    path = Path(name) if name.endswith(".gguf") else resolve_source(name, metadata_only=True)
    if isinstance(path, HubSource):
        return _shape_from_hub(path)
    if path.is_dir():
        return shape_from_hf(path)
    if path.exists() or name.endswith(".gguf"):
        return shape_from_gguf(read_gguf_model(path))  # a split model: its first part
    return shape_from_config(catalog.load(name), name, "catalog")

"""llama-quantize's per-tensor type choice, ported from src/llama-quant.cpp.

In:  one tensor (GGUF name, numpy shape), its type in the f16 file, the llama_ftype asked
     for, the model facts the rules read, and the running counters of one quantize run.
Out: the type llama-quantize writes for it (`tensor_type`), and whether that type needs an
     importance matrix (`requires_imatrix`).

The order of every if/else-if chain is the C++'s, so each branch can be checked against
it; line numbers refer to the llama.cpp tree vendored in llama-cpp-python 0.3.36. The
callers (`quant_rules.choose_types`) replay tensors in llama-quantize's order, which the
counters (`i_attention_wv`, `i_ffn_down`...) depend on.

Default llama_model_quantize_params throughout: no --output-tensor-type,
--token-embedding-type, --tensor-type or --pure, quantize_output_tensor on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

T = GGMLQuantizationType
F = LlamaFileType


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor: GGUF name and numpy shape (last dim = ggml ne[0])."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelFacts:
    """The hyper-parameters llama-quantize's rules read (llama_hparams).

    `arch` is the GGUF architecture name ("llama", "qwen2", "gemma2"...).
    `n_layer` is block_count (hparams.n_layer_all); `n_head`/`n_head_kv` are
    layer 0's head counts (hparams.n_head()/n_head_kv()); `n_expert` is
    expert_count, 0 for dense models. The expert rules read n_expert and the
    tensor's third dimension (ne[2], experts stacked): MoE models pass both.
    """

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        # llama_hparams::n_gqa (src/llama-hparams.cpp:99)
        return self.n_head // self.n_head_kv if self.n_head_kv else 0


# --------------------------------------------------------------------------
# Architecture facts (one entry each)
# --------------------------------------------------------------------------


def _is_70b_llama(f: ModelFacts) -> bool:
    # llama_model_llama::load_arch_hparams (src/models/llama.cpp:9-28):
    # n_expert == 8 picks 8x7B/8x22B; else 80 layers is 65B (MHA) or 70B (GQA).
    return f.n_expert != 8 and f.n_layer == 80 and f.n_head != f.n_head_kv


# Which models llama.cpp labels LLM_TYPE_70B (only that label matters to the
# quant rules: llama-quant.cpp:593).  Architectures not listed are never 70B
# (e.g. gemma2: src/models/gemma2.cpp:18-21).
_IS_70B: dict[str, Callable[[ModelFacts], bool]] = {
    "llama": _is_70b_llama,
    "qwen2": lambda f: f.n_layer == 80,  # src/models/qwen2.cpp:14
    "deci": lambda f: f.n_layer == 80,  # src/models/deci.cpp:8
    "olmo": lambda f: f.n_layer == 80,  # src/models/olmo.cpp:10
    "jais2": lambda f: f.n_layer == 68,  # src/models/jais2.cpp:8
}


def _never(f: ModelFacts) -> bool:
    return False


# Architectures with their own branches in llama_tensor_get_type_impl.
_FALCON = "falcon"  # LLM_ARCH_FALCON
_GLM5_NEXT = "glm5-next"  # LLM_ARCH_GLM5_NEXT
_BAILINGMOE3 = "bailingmoe3"  # LLM_ARCH_BAILINGMOE3 (src/llama-arch.cpp:113)


# --------------------------------------------------------------------------
# File types: default tensor type and the groups the rules test
# --------------------------------------------------------------------------

# llama_ftype_get_default_type (llama-quant.cpp:881). Keyed by int: gguf 0.19.0 lacks
# MOSTLY_Q2_0 (41) and GGML type Q2_0 (42), which stay absent until it has them.
DEFAULT_TYPE: dict[int, GGMLQuantizationType] = {
    F.MOSTLY_Q4_0: T.Q4_0, F.MOSTLY_Q4_1: T.Q4_1, F.MOSTLY_Q5_0: T.Q5_0, F.MOSTLY_Q5_1: T.Q5_1,
    F.MOSTLY_Q8_0: T.Q8_0, F.MOSTLY_F16: T.F16, F.MOSTLY_BF16: T.BF16, F.ALL_F32: T.F32,
    F.MOSTLY_Q1_0: T.Q1_0, F.MOSTLY_MXFP4_MOE: T.MXFP4,
    F.MOSTLY_Q2_K_S: T.Q2_K, F.MOSTLY_Q2_K: T.Q2_K, F.MOSTLY_IQ3_XS: T.IQ3_S,
    F.MOSTLY_Q3_K_S: T.Q3_K, F.MOSTLY_Q3_K_M: T.Q3_K, F.MOSTLY_Q3_K_L: T.Q3_K,
    F.MOSTLY_Q4_K_S: T.Q4_K, F.MOSTLY_Q4_K_M: T.Q4_K, F.MOSTLY_Q5_K_S: T.Q5_K, F.MOSTLY_Q5_K_M: T.Q5_K,
    F.MOSTLY_Q6_K: T.Q6_K, F.MOSTLY_TQ1_0: T.TQ1_0, F.MOSTLY_TQ2_0: T.TQ2_0,
    F.MOSTLY_IQ2_XXS: T.IQ2_XXS, F.MOSTLY_IQ2_XS: T.IQ2_XS, F.MOSTLY_IQ2_S: T.IQ2_XS,
    F.MOSTLY_IQ2_M: T.IQ2_S, F.MOSTLY_IQ3_XXS: T.IQ3_XXS, F.MOSTLY_IQ1_S: T.IQ1_S,
    F.MOSTLY_IQ1_M: T.IQ1_M, F.MOSTLY_IQ4_NL: T.IQ4_NL, F.MOSTLY_IQ4_XS: T.IQ4_XS,
    F.MOSTLY_IQ3_S: T.IQ3_S, F.MOSTLY_IQ3_M: T.IQ3_S,
}
if hasattr(T, "Q2_0"):
    DEFAULT_TYPE[41] = T.Q2_0  # LLAMA_FTYPE_MOSTLY_Q2_0

# Types that are not "quantized" in the sense of ggml_is_quantized().
FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16, T.F64, T.I8, T.I16, T.I32, T.I64})

# The ftype groups llama_tensor_get_type_impl tests again and again, named once.
_IQ2_OUTPUT = frozenset({F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_IQ1_S,
                         F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ1_M})  # :503-505
_IQ2_FAMILY = frozenset({F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S,
                         F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ1_M})  # :543-544
_IQ2_S_M = frozenset({F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M})
_IQ1 = frozenset({F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M})
_IQ4 = frozenset({F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS})
_TERNARY_EMBD = frozenset({F.MOSTLY_TQ1_0, F.MOSTLY_TQ2_0, 41})  # :535, 41 = MOSTLY_Q2_0
# :671-675: the ftypes whose attn_output an 8-expert model lifts to Q5_K.
_MOE8_ATTN_OUTPUT = frozenset({
    F.MOSTLY_Q2_K, F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_Q3_K_S, F.MOSTLY_Q3_K_M, F.MOSTLY_IQ4_NL,
    F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M, F.MOSTLY_IQ3_S, F.MOSTLY_IQ3_M, F.MOSTLY_IQ4_XS,
})


# --------------------------------------------------------------------------
# Categories and counters
# --------------------------------------------------------------------------

OUTPUT, TOKEN_EMBD = "output", "token_embd"
ATTN_Q, ATTN_K, ATTN_V, ATTN_QKV, ATTN_KV_B = "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_kv_b"
ATTN_OUTPUT, FFN_UP, FFN_GATE, FFN_DOWN, OTHER = "attn_output", "ffn_up", "ffn_gate", "ffn_down", "other"

# tensor_get_category (llama-quant.cpp:119): first substring that matches wins.
_CATEGORY_SUBSTRINGS = (
    ("attn_qkv.weight", ATTN_QKV),
    ("attn_kv_b.weight", ATTN_KV_B),
    ("attn_v.weight", ATTN_V),
    ("attn_k.weight", ATTN_K),
    ("attn_q.weight", ATTN_Q),
    ("attn_output.weight", ATTN_OUTPUT),
    ("ffn_up", FFN_UP),
    ("ffn_gate", FFN_GATE),
    ("ffn_down", FFN_DOWN),
)


def category(name: str) -> str:
    """tensor_get_category (llama-quant.cpp:119) with the exact-name helpers
    tensor_name_match_output_weight / _token_embd (llama-quant.cpp:104-112); the
    substrings also catch the stacked experts (ffn_down_exps, ffn_gate_shexp...)."""
    if name == "output.weight":
        return OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return TOKEN_EMBD
    for needle, cat in _CATEGORY_SUBSTRINGS:
        if needle in name:
            return cat
    return OTHER


def _is_attn_v_like(cat: str) -> bool:
    # category_is_attn_v (llama-quant.cpp:157)
    return cat in (ATTN_V, ATTN_QKV, ATTN_KV_B)


@dataclass
class QuantState:
    """quantize_state_impl (llama-quant.cpp:167), the counters only."""

    n_attention_wv: int = 0
    n_ffn_down: int = 0
    n_ffn_gate: int = 0
    n_ffn_up: int = 0
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
    n_fallback: int = 0
    has_tied_embeddings: bool = True
    has_imatrix: bool = False
    fallbacks: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, names: Sequence[str], facts: ModelFacts, has_imatrix: bool) -> QuantState:
        # init_quantize_state_counters (llama-quant.cpp:927): count every
        # attn_v-like name; any output.weight means untied embeddings; the
        # ffn counters' totals are the layer count, not a tensor count.
        state = cls(has_imatrix=has_imatrix)
        for name in names:
            cat = category(name)
            if _is_attn_v_like(cat):
                state.n_attention_wv += 1
            if cat == OUTPUT:
                state.has_tied_embeddings = False
        state.n_ffn_down = state.n_ffn_gate = state.n_ffn_up = facts.n_layer
        return state


# --------------------------------------------------------------------------
# Which tensors may be quantized at all
# --------------------------------------------------------------------------

# Substrings that stop a tensor from being quantized: tensor_allows_quantization
# (llama-quant.cpp:287-384).  The arch-specific list is separate.
_NEVER_QUANTIZE_SUBSTRINGS = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook", "mm.a.code_embd",
)
_NEVER_QUANTIZE_BY_ARCH: dict[str, tuple[str, ...]] = {
    # llama-quant.cpp:332-347
    _GLM5_NEXT: (
        "hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
        "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight",
        "ssm_g_b.weight", "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight",
        "attn_v_b.weight",
    ),
}
# llama-quant.cpp:319-320: LLM_TN(arch)(POS_EMBD / TOKEN_TYPES, "weight"),
# which is the same string for every architecture.
_NEVER_QUANTIZE_NAMES = frozenset({"position_embd.weight", "token_types.weight"})


def allows_quantization(spec: TensorSpec, arch: str) -> bool:
    """tensor_allows_quantization (llama-quant.cpp:287), default params:
    only_copy = false, quantize_output_tensor = true."""
    if ggml_n_dims(spec.shape) < 2:
        return False
    name = spec.name
    if not name.endswith("weight"):
        return False
    if name in _NEVER_QUANTIZE_NAMES:
        return False
    substrings = _NEVER_QUANTIZE_SUBSTRINGS + _NEVER_QUANTIZE_BY_ARCH.get(arch, ())
    return not any(s in name for s in substrings)


# --------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------


def tensor_type(
    qs: QuantState, spec: TensorSpec, cur_type: GGMLQuantizationType, ftype: int, facts: ModelFacts
) -> GGMLQuantizationType:
    """The preliminary loop of llama_model_quantize_impl (llama-quant.cpp:1111-1127) plus
    llama_tensor_get_type (llama-quant.cpp:717) for one tensor, in llama-quantize's order.

    Raises ValueError where llama-quantize throws (a row length no fallback fits, a layer
    number out of range in an MoE model)."""
    if not allows_quantization(spec, facts.arch):
        return cur_type  # llama-quant.cpp:719/1126: keeps the input file's type
    new_type = DEFAULT_TYPE[ftype]
    if new_type in FLOAT_TYPES:  # ggml_is_quantized(default_type), :745
        return new_type
    new_type = _get_type_impl(qs, spec, new_type, ftype, facts)
    return _fallback(qs, spec, new_type)


def requires_imatrix(name: str, ggml_type: GGMLQuantizationType, ftype: int) -> bool:
    """tensor_requires_imatrix (llama-quant.cpp:858): llama-quantize refuses to write
    `ggml_type` for this tensor without importance data ("the result will be garbage")."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    if ggml_type in (T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S):
        return True
    # "the k-type quantizations don't require imatrix data. the only exception is
    # Q2_K tensors that are part of a Q2_K_S file."
    return ggml_type == T.Q2_K and ftype == F.MOSTLY_Q2_K_S


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    # use_more_bits lambda in llama_tensor_get_type_impl (llama-quant.cpp:452):
    # first and last eighth of the layers, plus every third one in between.
    # C++ int division / remainder; all operands here are >= 0 where it matters.
    return (
        i_layer < n_layers // 8
        or i_layer >= 7 * n_layers // 8
        or _c_mod(i_layer - n_layers // 8, 3) == 2
    )


def _layer_info(counter: int, n_layer: int, name: str, facts: ModelFacts) -> tuple[int, int]:
    # layer_info lambda (llama-quant.cpp:456): dense models use the running
    # counter; MoE models (n_expert > 1) parse the layer out of the name, since
    # their expert tensors are not one per layer in a row.
    if max(1, facts.n_expert) > 1:
        i_layer = _sscanf_blk(name, None)
        if i_layer is None:
            raise ValueError(f"Failed to determine layer for tensor {name}")
        if not 0 <= i_layer < n_layer:
            raise ValueError(f"Bad layer {i_layer} for tensor {name}. Must be in [0, {n_layer})")
        return i_layer, n_layer
    return counter, n_layer


def _get_type_impl(
    qs: QuantState, spec: TensorSpec, new_type: GGMLQuantizationType, ftype: int, facts: ModelFacts
) -> GGMLQuantizationType:
    """llama_tensor_get_type_impl (llama-quant.cpp:446), every ftype, branch for branch."""
    name = spec.name
    cat = category(name)
    arch = facts.arch
    ne0 = spec.shape[-1]
    ne2 = spec.shape[-3] if len(spec.shape) >= 3 else 1
    n_expert = facts.n_expert
    n_gqa = facts.n_gqa
    is_70b = _IS_70B.get(arch, _never)(facts)

    # :473 glm5-next: these stay at least Q8_0 (new_type is quantized here).
    if arch == _GLM5_NEXT and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        if new_type not in (T.F32, T.BF16, T.F16):
            return T.Q8_0

    # :490 output.weight, and token_embd when it doubles as the output.
    if cat == OUTPUT or (qs.has_tied_embeddings and cat == TOKEN_EMBD):
        block = GGML_QUANT_SIZES[new_type][0]
        if ftype == F.MOSTLY_MXFP4_MOE:  # :497
            new_type = T.Q8_0
        elif arch == _FALCON or ne0 % block != 0:  # :500
            new_type = T.Q8_0
        elif ftype in _IQ2_OUTPUT:  # :503
            new_type = T.Q5_K
        elif new_type != T.Q8_0:  # :508: e.g. Q4_0 / Q4_K / Q5_K -> Q6_K
            new_type = T.Q6_K
    elif ftype == F.MOSTLY_MXFP4_MOE:  # :512: expert tensors MXFP4, the rest Q8_0
        # MLA projections are 3-D too, so bailingmoe3 names the expert roles.
        experts = cat in (FFN_UP, FFN_GATE, FFN_DOWN)
        new_type = T.MXFP4 if ne2 > 1 and (arch != _BAILINGMOE3 or experts) else T.Q8_0
    elif cat == TOKEN_EMBD:  # :525
        if ftype in (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M):
            new_type = T.Q2_K
        elif ftype in _IQ2_S_M or ftype == F.MOSTLY_IQ3_XXS:
            new_type = T.IQ3_S
        elif ftype in _TERNARY_EMBD:
            new_type = T.Q4_K
    elif ftype in _IQ2_FAMILY:  # :543
        if _is_attn_v_like(cat):
            if n_gqa >= 4 or n_expert >= 4:
                new_type = T.Q4_K
            else:
                new_type = T.IQ3_S if ftype in _IQ2_S_M else T.Q2_K
            qs.i_attention_wv += 1
        elif n_expert == 8 and cat == ATTN_K:
            new_type = T.Q4_K
        elif cat == FFN_DOWN:  # the plain counter here, even for MoE models
            if qs.i_ffn_down < qs.n_ffn_down // 8:
                new_type = T.IQ3_S if ftype in _IQ2_S_M else T.Q2_K
            qs.i_ffn_down += 1
        elif cat == ATTN_OUTPUT:
            if n_expert == 8:
                new_type = T.Q5_K
            elif ftype in _IQ1:
                new_type = T.IQ2_XXS
            elif ftype in _IQ2_S_M:
                new_type = T.IQ3_S
    elif _is_attn_v_like(cat):  # :567
        if ftype == F.MOSTLY_Q2_K:
            new_type = T.Q4_K if n_gqa >= 4 else T.Q3_K
        elif ftype == F.MOSTLY_Q2_K_S and n_gqa >= 4:
            new_type = T.Q4_K
        elif ftype == F.MOSTLY_IQ3_XXS:
            new_type = T.Q4_K if n_gqa >= 4 else (T.IQ3_S if not qs.has_imatrix else T.IQ3_XXS)
        elif ftype in (F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_S) and n_gqa >= 4:
            new_type = T.Q4_K
        elif ftype == F.MOSTLY_IQ3_M:
            new_type = T.Q4_K
        elif ftype == F.MOSTLY_Q3_K_M:
            new_type = T.Q5_K if qs.i_attention_wv < 2 else T.Q4_K
        elif ftype == F.MOSTLY_Q3_K_L:
            new_type = T.Q5_K
        elif ftype in _IQ4 and n_gqa >= 4:
            new_type = T.Q5_K
        elif ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _use_more_bits(qs.i_attention_wv, qs.n_attention_wv):
            new_type = T.Q6_K
        elif ftype == F.MOSTLY_Q4_K_S and qs.i_attention_wv < 4:
            new_type = T.Q5_K
        # :593: 70B shares attn_v across 8 heads, so more bits cost little.
        if is_70b and new_type in (T.Q3_K, T.Q4_K):
            new_type = T.Q5_K
        if n_expert == 8:  # :599: "trades just ~128MB"
            new_type = T.Q8_0
        qs.i_attention_wv += 1
    elif cat == ATTN_K:  # :605
        if n_expert == 8:
            new_type = T.Q8_0
        elif ftype == F.MOSTLY_IQ3_XS:
            new_type = T.IQ3_XXS
        elif ftype == F.MOSTLY_IQ3_XXS:
            new_type = T.IQ2_S
    elif cat == ATTN_Q:  # :617
        if ftype == F.MOSTLY_IQ3_XS:
            new_type = T.IQ3_XXS
        elif ftype == F.MOSTLY_IQ3_XXS:
            new_type = T.IQ2_S
    elif cat == FFN_DOWN:  # :624
        i_layer, n_layer = _layer_info(qs.i_ffn_down, qs.n_ffn_down, name, facts)
        if ftype == F.MOSTLY_Q2_K:
            new_type = T.Q3_K
        elif ftype == F.MOSTLY_Q2_K_S:
            if i_layer < n_layer // 8:
                new_type = T.Q4_K
        elif ftype == F.MOSTLY_IQ3_XXS and not qs.has_imatrix:
            new_type = T.Q4_K if i_layer < n_layer // 8 else T.Q3_K
        elif ftype == F.MOSTLY_Q3_K_M:
            if i_layer < n_layer // 16:
                new_type = T.Q5_K
            elif arch != _FALCON or _use_more_bits(i_layer, n_layer):
                new_type = T.Q4_K
            else:
                new_type = T.Q3_K
        elif ftype == F.MOSTLY_IQ3_M and (
            i_layer < n_layer // 8 or (n_expert == 8 and _use_more_bits(i_layer, n_layer))
        ):
            new_type = T.Q4_K
        elif ftype == F.MOSTLY_Q3_K_L:
            new_type = T.Q4_K if arch == _FALCON else T.Q5_K
        elif ftype == F.MOSTLY_Q4_K_M:
            if arch == _FALCON:
                if i_layer < n_layer // 16:
                    new_type = T.Q6_K
                elif _use_more_bits(i_layer, n_layer):
                    new_type = T.Q5_K
                else:
                    new_type = T.Q4_K
            elif _use_more_bits(i_layer, n_layer):
                new_type = T.Q6_K
        elif i_layer < n_layer // 8 and ftype in _IQ4 and not qs.has_imatrix:
            new_type = T.Q5_K
        elif ftype == F.MOSTLY_Q5_K_M and _use_more_bits(i_layer, n_layer):
            new_type = T.Q6_K
        elif ftype == F.MOSTLY_Q4_K_S and arch != _FALCON and i_layer < n_layer // 8:
            new_type = T.Q5_K
        elif ftype in (F.MOSTLY_Q4_0, F.MOSTLY_Q5_0) and qs.has_imatrix and i_layer < n_layer // 8:
            # "Guard against craziness in the first few ffn_down layers", only with an
            # imatrix, so that one can always get the same quantization as before it.
            new_type = T.Q4_1 if ftype == F.MOSTLY_Q4_0 else T.Q5_1
        qs.i_ffn_down += 1
    elif cat == ATTN_OUTPUT:  # :669
        if arch != _FALCON:
            if n_expert == 8:
                if ftype in _MOE8_ATTN_OUTPUT:
                    new_type = T.Q5_K
            elif ftype == F.MOSTLY_Q2_K:
                new_type = T.Q3_K
            elif ftype == F.MOSTLY_IQ3_XXS:
                new_type = T.IQ3_S
            elif ftype == F.MOSTLY_Q3_K_M:
                new_type = T.Q4_K
            elif ftype == F.MOSTLY_Q3_K_L:
                new_type = T.Q5_K
            elif ftype == F.MOSTLY_IQ3_M:
                new_type = T.Q4_K
        elif ftype == F.MOSTLY_Q3_K_L:
            new_type = T.Q4_K
    elif cat == ATTN_QKV:  # :689
        if ftype in (F.MOSTLY_Q3_K_M, F.MOSTLY_Q3_K_L, F.MOSTLY_IQ3_M):
            new_type = T.Q4_K
        elif ftype == F.MOSTLY_Q4_K_M:
            new_type = T.Q5_K
        elif ftype == F.MOSTLY_Q5_K_M:
            new_type = T.Q6_K
    elif cat in (FFN_GATE, FFN_UP):  # :696 and :704, the same rule on their own counters
        counter = qs.i_ffn_gate if cat == FFN_GATE else qs.i_ffn_up
        i_layer, n_layer = _layer_info(counter, qs.n_ffn_gate if cat == FFN_GATE else qs.n_ffn_up, name, facts)
        if ftype == F.MOSTLY_IQ3_XS and n_layer // 8 <= i_layer < 7 * n_layer // 8:
            new_type = T.IQ3_XXS
        if cat == FFN_GATE:
            qs.i_ffn_gate += 1
        else:
            qs.i_ffn_up += 1
    return new_type


# tensor_type_fallback (llama-quant.cpp:390): a type whose block does not divide
# the row length falls back to a 32-block type. By name, as gguf may lack Q2_0.
_FALLBACK: dict[str, str] = {
    "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL",
    "IQ2_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL",
    "Q2_0": "Q4_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}


def _fallback(qs: QuantState, spec: TensorSpec, target: GGMLQuantizationType) -> GGMLQuantizationType:
    # tensor_type_fallback (llama-quant.cpp:390)
    ne0 = spec.shape[-1]
    block = GGML_QUANT_SIZES[target][0]
    if ne0 % block == 0:
        return target
    qs.n_fallback += 1
    qs.fallbacks.append(spec.name)
    result: GGMLQuantizationType
    if target.name in _FALLBACK:
        result = GGMLQuantizationType[_FALLBACK[target.name]]
    elif block <= 32:  # :420: already a 32-block type, F16 check below
        result = target
    else:  # e.g. Q1_0 (blocks of 128): llama-quantize stops here
        raise ValueError(f"no tensor type fallback is defined for type {target.name}: {spec.name} has rows of "
                         f"{ne0}, not a multiple of {block}")
    if ne0 % GGML_QUANT_SIZES[result][0] != 0:  # :430-437: "must use F16 due to unusual shape"
        result = T.F16
    return result


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

_BLK_RE = re.compile(r"blk\.\s*([+-]?\d+)")


def _sscanf_blk(name: str, default: int | None) -> int | None:
    # sscanf(name, "blk.%d.", &i) == 1: "%d" skips spaces and takes a sign;
    # the trailing "." need not match for the count to be 1.
    m = _BLK_RE.match(name)
    return int(m.group(1)) if m else default


def layer_of(name: str) -> int:
    """The layer llama.cpp's weight_name_comparer sorts by: sscanf("blk.%d."), -1 without one."""
    layer = _sscanf_blk(name, -1)
    assert layer is not None
    return layer


def _c_mod(a: int, b: int) -> int:
    # C's % truncates toward zero, so the sign follows the dividend.
    r = abs(a) % abs(b)
    return -r if a < 0 else r


def ggml_n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims (ggml/src/ggml.c): 1 + index of the last ne[i] > 1; trailing 1s do
    not count, so numpy (1, 4096) is 1-D to ggml."""
    ne = list(reversed(shape))
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1

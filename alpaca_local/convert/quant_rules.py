"""Which GGML type each tensor gets, and how many bytes it takes.

In:  the GGUF tensor names and numpy shapes of one model, a quant name
     ("f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m") and a few model facts.
Out: one `gguf.GGMLQuantizationType` per tensor, plus byte sizes.

The reference route we must match bit for bit is two programs:

1. ``convert_hf_to_gguf.py --outtype f16`` decides F16 versus F32
   (``ModelBase.prepare_tensors`` in ``conversion/base.py``);
2. ``llama-quantize`` with default parameters re-types the F16 file
   (``llama_tensor_get_type`` and friends in ``src/llama-quant.cpp``).

We do both in one pass, so the final type is ``step2(step1(tensor))``.  For
"f16" the reference is step 1 alone.  Line numbers below refer to the
llama.cpp tree vendored in llama-cpp-python 0.3.36.

Order: llama-quantize iterates ``llama_model_loader::weights_map``, a
``std::map`` ordered by ``weight_name_comparer`` (src/llama-model-loader.h:54):
by the layer number parsed with ``sscanf(name, "blk.%d.")`` (-1 when there is
none), then by name.  Its counters (``i_attention_wv``, ``i_ffn_down``...)
advance in that order, and the quantized file lists its tensors in that order.
`choose_types` therefore accepts the tensors in ANY order (e.g. the order the
f16 file has), replays them in llama.cpp's order, and returns the types in the
caller's order.  `llama_quantize_order` gives that order for the writer.

Only dense LLaMA-family models ("llama") are checked against real output so
far; the facts that differ by architecture are in the tables near the top.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import gguf
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from alpaca_local.errors import UsageError

T = GGMLQuantizationType
F = LlamaFileType

# user name -> llama_ftype written to general.file_type.
QUANTS: dict[str, LlamaFileType] = {
    "f16": F.MOSTLY_F16,
    "q8_0": F.MOSTLY_Q8_0,
    "q4_0": F.MOSTLY_Q4_0,
    "q4_k_m": F.MOSTLY_Q4_K_M,
    "q5_k_m": F.MOSTLY_Q5_K_M,
}

# user name -> the tag in file names such as alpaca-7b.Q4_K_M.gguf.
QUANT_FILE_SUFFIX: dict[str, str] = {name: name.upper() for name in QUANTS}

# llama_ftype_get_default_type (llama-quant.cpp:881): the type a tensor gets
# unless a rule below says otherwise.
_DEFAULT_TYPE: dict[LlamaFileType, GGMLQuantizationType] = {
    F.MOSTLY_F16: T.F16,
    F.MOSTLY_Q8_0: T.Q8_0,
    F.MOSTLY_Q4_0: T.Q4_0,
    F.MOSTLY_Q4_K_M: T.Q4_K,
    F.MOSTLY_Q5_K_M: T.Q5_K,
}

# Types that are not "quantized" in the sense of ggml_is_quantized().
_FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16, T.F64, T.I8, T.I16, T.I32, T.I64})


# --------------------------------------------------------------------------
# Architecture tables (add an entry per architecture)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """The hyper-parameters llama-quantize's rules read (llama_hparams).

    `arch` is the GGUF architecture name ("llama", "qwen2", "gemma2"...).
    `n_layer` is block_count (hparams.n_layer_all); `n_head`/`n_head_kv` are
    layer 0's head counts (hparams.n_head()/n_head_kv()); `n_expert` is
    expert_count, 0 for dense models.
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

# Step 1: tensors convert_hf_to_gguf always keeps in F32 when the arch has
# them (conversion/base.py:1089-1121, matched with match_model_tensor_name).
# Names, not enums, so an older gguf package without some of them still works.
_CONVERT_F32_TENSORS = (
    "FFN_GATE_INP", "FFN_GATE_INP_SHEXP", "POS_EMBD", "TOKEN_TYPES", "SSM_CONV1D",
    "SHORTCONV_CONV", "TIME_MIX_FIRST", "TIME_MIX_W1", "TIME_MIX_W2",
    "TIME_MIX_DECAY_W1", "TIME_MIX_DECAY_W2", "TIME_MIX_LERP_FUSED", "POSNET_NORM1",
    "POSNET_NORM2", "V_ENC_EMBD_POS", "A_ENC_EMBD_POS", "ALTUP_CORRECT_COEF",
    "ALTUP_PREDICT_COEF", "SSM_CONV1D_Q", "SSM_CONV1D_K", "SSM_CONV1D_V", "INDEXER_PROJ",
)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor: GGUF name and numpy shape (last dim = ggml ne[0])."""

    name: str
    shape: tuple[int, ...]


def file_type(quant: str) -> LlamaFileType:
    """The llama_ftype for a user quant name; UsageError if unknown."""
    try:
        return QUANTS[quant]
    except KeyError:
        valid = ", ".join(QUANTS)
        raise UsageError(f"unknown quant type {quant!r}; choose one of: {valid}") from None


def row_nbytes(ggml_type: GGMLQuantizationType, n_per_row: int) -> int:
    """Bytes of one row of `n_per_row` values, as ggml_row_size computes it.

    Raises ValueError when `n_per_row` is not a multiple of the type's block size.
    """
    ggml_type = GGMLQuantizationType(ggml_type)
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    if n_per_row % block:
        raise ValueError(f"row length {n_per_row} is not a multiple of {ggml_type.name}'s block size {block}")
    return n_per_row // block * type_size


def tensor_nbytes(shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> int:
    """Bytes of a tensor's data (no padding), as ggml_nbytes computes it.

    Raises ValueError when the row length (shape[-1]) is not a multiple of
    the type's block size.
    """
    n_rows = 1
    for dim in shape[:-1]:
        n_rows *= dim
    return n_rows * row_nbytes(ggml_type, shape[-1] if shape else 1)


def llama_quantize_order(names: Sequence[str]) -> list[int]:
    """Indices of `names` in the order llama-quantize visits and writes them.

    weight_name_comparer (src/llama-model-loader.h:54): layer from
    sscanf("blk.%d."), -1 without one, then plain byte-wise name order.
    """
    return sorted(range(len(names)), key=lambda i: (_sscanf_blk(names[i], -1), names[i].encode()))


def f16_type(spec: TensorSpec, facts: ModelFacts) -> GGMLQuantizationType:
    """Step 1: the type convert_hf_to_gguf --outtype f16 gives this tensor.

    ModelBase.prepare_tensors (conversion/base.py:1057-1166), with the base
    tensor_force_quant (base.py:746) that returns False for non-FP8 models.
    """
    name = spec.name
    n_dims = len(spec.shape)  # base.py:1080 uses the numpy rank, no squeeze
    # base.py:1084: 1-D tensors and norms are F32.
    if n_dims <= 1 or name.endswith("_norm.weight"):
        return T.F32
    # base.py:1089-1121: always-F32 tensors, and anything that is not a
    # weight (biases...).
    if name[-7:] not in (".weight", ".lora_a", ".lora_b"):
        return T.F32
    if _is_convert_f32_tensor(name, facts.arch):
        return T.F32
    # base.py:1145: ftype MOSTLY_F16 -> F16 (F16 never raises QuantError).
    return T.F16


def choose_types(
    tensors: Sequence[TensorSpec], quant: str, facts: ModelFacts, has_imatrix: bool = False
) -> list[GGMLQuantizationType]:
    """Final GGML type per tensor, in the order given.

    `tensors` must be the model's complete tensor list (the rules count
    attn_v tensors and look for output.weight); any order is accepted, see
    the module docstring. `has_imatrix`: llama-quantize was given an
    importance matrix (qs.has_imatrix), which changes a few choices.
    """
    ftype = file_type(quant)
    step1 = [f16_type(t, facts) for t in tensors]
    if ftype == F.MOSTLY_F16:
        return step1
    state = _QuantState.start([t.name for t in tensors], facts)
    state.has_imatrix = has_imatrix
    result = list(step1)
    for i in llama_quantize_order([t.name for t in tensors]):
        result[i] = _quantize_type(state, tensors[i], step1[i], ftype, facts)
    return result


# --------------------------------------------------------------------------
# Step 2: llama-quantize (src/llama-quant.cpp)
# --------------------------------------------------------------------------

_OUTPUT, _TOKEN_EMBD = "output", "token_embd"
_ATTN_Q, _ATTN_K, _ATTN_V, _ATTN_QKV, _ATTN_KV_B = "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_kv_b"
_ATTN_OUTPUT, _FFN_UP, _FFN_GATE, _FFN_DOWN, _OTHER = "attn_output", "ffn_up", "ffn_gate", "ffn_down", "other"

# tensor_get_category (llama-quant.cpp:119): first substring that matches wins.
_CATEGORY_SUBSTRINGS = (
    ("attn_qkv.weight", _ATTN_QKV),
    ("attn_kv_b.weight", _ATTN_KV_B),
    ("attn_v.weight", _ATTN_V),
    ("attn_k.weight", _ATTN_K),
    ("attn_q.weight", _ATTN_Q),
    ("attn_output.weight", _ATTN_OUTPUT),
    ("ffn_up", _FFN_UP),
    ("ffn_gate", _FFN_GATE),
    ("ffn_down", _FFN_DOWN),
)


def _category(name: str) -> str:
    # tensor_get_category (llama-quant.cpp:119) with the exact-name helpers
    # tensor_name_match_output_weight / _token_embd (llama-quant.cpp:104-112).
    if name == "output.weight":
        return _OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return _TOKEN_EMBD
    for needle, cat in _CATEGORY_SUBSTRINGS:
        if needle in name:
            return cat
    return _OTHER


def _is_attn_v_like(cat: str) -> bool:
    # category_is_attn_v (llama-quant.cpp:157)
    return cat in (_ATTN_V, _ATTN_QKV, _ATTN_KV_B)


@dataclass
class _QuantState:
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
    def start(cls, names: Sequence[str], facts: ModelFacts) -> _QuantState:
        # init_quantize_state_counters (llama-quant.cpp:927): count every
        # attn_v-like name; any output.weight means untied embeddings; the
        # ffn counters' totals are the layer count, not a tensor count.
        state = cls()
        for name in names:
            cat = _category(name)
            if _is_attn_v_like(cat):
                state.n_attention_wv += 1
            if cat == _OUTPUT:
                state.has_tied_embeddings = False
        state.n_ffn_down = state.n_ffn_gate = state.n_ffn_up = facts.n_layer
        return state


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


def _allows_quantization(spec: TensorSpec, arch: str) -> bool:
    # tensor_allows_quantization (llama-quant.cpp:287), default params:
    # only_copy = false, quantize_output_tensor = true.
    if _ggml_n_dims(spec.shape) < 2:
        return False
    name = spec.name
    if not name.endswith("weight"):
        return False
    if name in _NEVER_QUANTIZE_NAMES:
        return False
    substrings = _NEVER_QUANTIZE_SUBSTRINGS + _NEVER_QUANTIZE_BY_ARCH.get(arch, ())
    return not any(s in name for s in substrings)


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
    # counter; MoE models (n_expert > 1) parse the layer out of the name.
    if max(1, facts.n_expert) > 1:
        i_layer = _sscanf_blk(name, None)
        if i_layer is None:
            raise ValueError(f"Failed to determine layer for tensor {name}")
        if not 0 <= i_layer < n_layer:
            raise ValueError(f"Bad layer {i_layer} for tensor {name}. Must be in [0, {n_layer})")
        return i_layer, n_layer
    return counter, n_layer


def _quantize_type(
    state: _QuantState,
    spec: TensorSpec,
    cur_type: GGMLQuantizationType,
    ftype: LlamaFileType,
    facts: ModelFacts,
) -> GGMLQuantizationType:
    # The preliminary loop of llama_model_quantize_impl (llama-quant.cpp:1111-1127)
    # plus llama_tensor_get_type (llama-quant.cpp:717), default params:
    # no --output-tensor-type / --token-embedding-type / --tensor-type,
    # not --pure; with or without an imatrix (state.has_imatrix).
    if not _allows_quantization(spec, facts.arch):
        return cur_type  # llama-quant.cpp:719/1126: keeps the input file's type
    new_type = _DEFAULT_TYPE[ftype]
    if new_type in _FLOAT_TYPES:  # ggml_is_quantized(default_type), :745
        return new_type
    new_type = _get_type_impl(state, spec, new_type, ftype, facts)
    return _fallback(state, spec, new_type)


def _get_type_impl(
    qs: _QuantState,
    spec: TensorSpec,
    new_type: GGMLQuantizationType,
    ftype: LlamaFileType,
    facts: ModelFacts,
) -> GGMLQuantizationType:
    """llama_tensor_get_type_impl (llama-quant.cpp:446), for our ftypes only.

    Branches that only fire for ftypes we do not offer (Q2_K, Q3_K_*, IQ*,
    TQ*, MXFP4_MOE, Q4_K_S...) are left out; the order of the remaining
    if/else-if chain is kept so each can be checked against the C++.
    """
    if ftype not in _DEFAULT_TYPE:  # guard: the chain below is only complete for these
        raise ValueError(f"no type rules for {ftype!r}")
    name = spec.name
    cat = _category(name)
    arch = facts.arch
    ne0 = spec.shape[-1]
    n_expert = facts.n_expert

    # :473 glm5-next: these stay at least Q8_0 (new_type is quantized here).
    if arch == _GLM5_NEXT and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        return T.Q8_0

    # :490 output.weight, and token_embd when it doubles as the output.
    if cat == _OUTPUT or (qs.has_tied_embeddings and cat == _TOKEN_EMBD):
        block = GGML_QUANT_SIZES[new_type][0]
        if arch == _FALCON or ne0 % block != 0:  # :500
            new_type = T.Q8_0
        elif new_type != T.Q8_0:  # :508: e.g. Q4_0 / Q4_K / Q5_K -> Q6_K
            new_type = T.Q6_K
    elif cat == _TOKEN_EMBD:
        pass  # :525: changes only for IQ*/TQ*/Q2_0 ftypes
    elif _is_attn_v_like(cat):  # :567
        if ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _use_more_bits(
            qs.i_attention_wv, qs.n_attention_wv
        ):  # :590
            new_type = T.Q6_K
        # :593: 70B shares attn_v across 8 heads, so more bits cost little.
        if _IS_70B.get(arch, _never)(facts) and new_type in (T.Q3_K, T.Q4_K):
            new_type = T.Q5_K
        if n_expert == 8:  # :599
            new_type = T.Q8_0
        qs.i_attention_wv += 1
    elif cat == _ATTN_K:  # :605
        if n_expert == 8:
            new_type = T.Q8_0
    elif cat == _ATTN_Q:  # :617: changes only for IQ3_XS/IQ3_XXS
        pass
    elif cat == _FFN_DOWN:  # :624
        i_layer, n_layer = _layer_info(qs.i_ffn_down, qs.n_ffn_down, name, facts)
        if ftype == F.MOSTLY_Q4_K_M:  # :646
            if arch == _FALCON:
                if i_layer < n_layer // 16:
                    new_type = T.Q6_K
                elif _use_more_bits(i_layer, n_layer):
                    new_type = T.Q5_K
                else:
                    new_type = T.Q4_K
            elif _use_more_bits(i_layer, n_layer):
                new_type = T.Q6_K
        elif ftype == F.MOSTLY_Q5_K_M and _use_more_bits(i_layer, n_layer):  # :657
            new_type = T.Q6_K
        elif ftype == F.MOSTLY_Q4_0 and qs.has_imatrix and i_layer < n_layer // 8:  # :661
            # "Guard against craziness in the first few ffn_down layers", only with an imatrix.
            new_type = T.Q4_1
        qs.i_ffn_down += 1
    elif cat == _ATTN_OUTPUT:  # :669
        if arch != _FALCON and n_expert == 8 and ftype == F.MOSTLY_Q4_K_M:  # :671-677
            new_type = T.Q5_K
    elif cat == _ATTN_QKV:  # :689
        if ftype == F.MOSTLY_Q4_K_M:
            new_type = T.Q5_K
        elif ftype == F.MOSTLY_Q5_K_M:
            new_type = T.Q6_K
    elif cat == _FFN_GATE:  # :696: only IQ3_XS changes; the counter and the
        _layer_info(qs.i_ffn_gate, qs.n_ffn_gate, name, facts)  # name check still run
        qs.i_ffn_gate += 1
    elif cat == _FFN_UP:  # :704
        _layer_info(qs.i_ffn_up, qs.n_ffn_up, name, facts)
        qs.i_ffn_up += 1
    return new_type


# tensor_type_fallback (llama-quant.cpp:390): a 256-block type whose row
# length does not divide falls back to a 32-block type.
_FALLBACK: dict[str, str] = {
    "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL",
    "IQ2_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL",
    "Q2_0": "Q4_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}


def _fallback(qs: _QuantState, spec: TensorSpec, target: GGMLQuantizationType) -> GGMLQuantizationType:
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
    else:
        raise ValueError(f"no tensor type fallback is defined for type {target.name}")
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


def _c_mod(a: int, b: int) -> int:
    # C's % truncates toward zero, so the sign follows the dividend.
    r = abs(a) % abs(b)
    return -r if a < 0 else r


def _ggml_n_dims(shape: tuple[int, ...]) -> int:
    # ggml_n_dims (ggml/src/ggml.c): 1 + index of the last ne[i] > 1;
    # trailing 1s do not count, so numpy (1, 4096) is 1-D to ggml.
    ne = list(reversed(shape))
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def _is_convert_f32_tensor(name: str, arch: str) -> bool:
    # match_model_tensor_name (conversion/base.py:614) for each key of the
    # always-F32 list; the key only counts when the arch declares it.
    arch_enum = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), None)
    if arch_enum is None:
        return False
    declared = gguf.MODEL_TENSORS.get(arch_enum, ())
    bid = _first_decimal_part(name)
    for key_name in _CONVERT_F32_TENSORS:
        key = getattr(gguf.MODEL_TENSOR, key_name, None)
        if key is None or key not in declared:
            continue
        template = gguf.TENSOR_NAMES[key]
        if "{bid}" in template:
            if bid is None:
                continue
            template = template.format(bid=bid)
        elif bid is not None:
            continue
        if name == template + ".weight":
            return True
    return False


def _first_decimal_part(name: str) -> int | None:
    # base.py:1069: "use the first number-like part of the tensor name as the
    # block id".  Convert reads it from the HF name; for the GGUF names we see
    # the block index lands in the same place ("blk.N.").
    for part in name.split("."):
        if part.isdecimal():
            return int(part)
    return None

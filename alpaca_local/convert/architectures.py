"""Architecture facts, one entry per architecture.

An entry says how a Hugging Face class becomes a GGUF architecture: the GGUF
arch, which source tensors to drop, the tensors it needs with their shapes
(biases included), the per-tensor transforms (the rotary row permutation,
Gemma's norm offset), tensors generated from the config (llama3's rope
frequency factors), the tokenizer kind and the metadata llama.cpp reads.
Adding a model is adding an entry; the stages (read → map → choose types →
quantize → write) stay as they are. Tensor names come from gguf-py's
`TensorNameMap` (the converter's own table). Every fact names the class of
the reference converter (llama.cpp's `conversion/*.py`) it mirrors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from alpaca_local.convert.experts import (
    MIXTRAL_EXPERTS,
    QWEN_MOE_EXPERTS,
    ExpertLayout,
    check_expert_counts,
    check_qwen_moe,
)
from alpaca_local.source.config import ModelConfig
from alpaca_local.errors import InputError, UnsupportedError

T = gguf.MODEL_TENSOR
Shapes = dict[gguf.MODEL_TENSOR, tuple[int, ...]]


def _no_tensors(cfg: ModelConfig) -> Shapes:
    return {}


def _no_extras(cfg: ModelConfig) -> dict[gguf.MODEL_TENSOR, np.ndarray]:
    return {}


def _no_space_prefix_key(folder: Path) -> bool | None:
    return None


def _no_check(cfg: ModelConfig) -> None:
    return None


@dataclass(frozen=True)
class Architecture:
    hf_class: str
    gguf_arch: gguf.MODEL_ARCH
    description: str
    # Source tensors that carry no weights llama.cpp uses (buffers saved by old transformers).
    skip_suffixes: tuple[str, ...]
    # GGUF tensor kinds whose rows are permuted from HF's rotate-half layout to
    # llama.cpp's interleaved rotary layout (LlamaModel.permute in the reference converter).
    rope_permuted: frozenset[gguf.MODEL_TENSOR]
    metadata: Callable[[gguf.GGUFWriter, ModelConfig], None]
    # Shape (numpy order) of every weight kind the architecture needs; a kind
    # that is absent from the result is not needed for this config.
    shapes: Callable[[ModelConfig], Shapes]
    # Same for the ".bias" tensors (Qwen2's q/k/v biases).
    biases: Callable[[ModelConfig], Shapes] = _no_tensors
    # Source tensor names dropped whole (Gemma 2 never uses a saved lm_head).
    skip_names: frozenset[str] = frozenset()
    # Tokenizer: "sentencepiece" (tokenizer.model), "bpe" (tokenizer.json's byte-level
    # BPE: TextModel.set_vocab) or "sentencepiece-or-bpe" (tokenizer.model when present,
    # else the BPE, as LlamaModel.set_vocab / Qwen2Model.set_vocab try them).
    tokenizer: str = "sentencepiece"
    # tokenizer.ggml.add_space_prefix for the folder (None: not written).
    add_space_prefix: Callable[[Path], bool | None] = _no_space_prefix_key
    # Added to every source tensor whose name ends in "norm.weight", in the
    # source's precision (Gemma stores w and computes x * (1 + w); llama.cpp
    # expects 1 + w).
    norm_offset: float = 0.0
    # Tensors computed from the config, as float32 (LlamaModel.generate_extra_tensors).
    extra_tensors: Callable[[ModelConfig], dict[gguf.MODEL_TENSOR, np.ndarray]] = _no_extras
    # Values transformers assumes when config.json leaves them out.
    config_defaults: dict[str, Any] = field(default_factory=dict)
    # ModelConfig fields this architecture cannot do without.
    requires: tuple[str, ...] = ()
    # Another model part in the same checkpoint (a vision tower): source tensors
    # whose name contains one of these are not part of the text model and are
    # dropped with a note (TextModel.filter_tensors).
    other_parts: tuple[str, ...] = ()
    # Removed from source names before mapping: the text model's prefix inside a
    # multimodal checkpoint (ModelBase.filter_tensors drops "language_model.").
    strip_parts: tuple[str, ...] = ()
    # Refuses a config llama.cpp would run differently from the source model.
    check_config: Callable[[ModelConfig], None] = _no_check
    # Mixture of experts: how the source stores one matrix per expert (None: dense).
    experts: ExpertLayout | None = None

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def check(self, cfg: ModelConfig) -> None:
        missing = [name for name in self.requires if getattr(cfg, name) in (None, False)]
        if missing:
            raise InputError(f"config.json of a {self.hf_class} lacks {', '.join(missing)}; it is required")
        self.check_config(cfg)

    def other_part(self, hf_name: str) -> bool:
        """Whether `hf_name` belongs to a part of the checkpoint this converter leaves out."""
        return any(part in hf_name for part in self.other_parts)

    def expected_tensors(self, cfg: ModelConfig) -> dict[str, tuple[gguf.MODEL_TENSOR, tuple[int, ...]]]:
        """Every GGUF tensor name the file gets -> (kind, shape), generated ones included."""
        out: dict[str, tuple[gguf.MODEL_TENSOR, tuple[int, ...]]] = {}
        extras = {kind: arr.shape for kind, arr in self.extra_tensors(cfg).items()}
        for suffix, table in (("weight", self.shapes(cfg)), ("bias", self.biases(cfg)), ("weight", extras)):
            for kind, shape in table.items():
                base = gguf.TENSOR_NAMES[kind]
                names = [base.format(bid=i) for i in range(cfg.n_layer)] if "{bid}" in base else [base]
                out.update({f"{n}.{suffix}": (kind, shape) for n in names})
        return out


# --------------------------------------------------------------------------
# Metadata pieces shared by entries (TextModel.set_gguf_parameters)
# --------------------------------------------------------------------------


def _rope_scaling_metadata(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    # TextModel.set_gguf_parameters (conversion/base.py:1462-1497). "llama3"
    # writes nothing here: its factors are the rope_freqs tensor.
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind is None or kind in ("default", "llama3"):
        return
    if kind == "linear" and scaling.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
        return
    raise UnsupportedError(
        f"rope_scaling type {kind!r} is not supported yet; supported: linear, llama3 (or none)"
    )


def _shape_metadata(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    # The size keys every architecture writes (TextModel.set_gguf_parameters).
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.hidden)
    w.add_feed_forward_length(cfg.intermediate)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)


def _common_metadata(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    # TextModel.set_gguf_parameters, for the keys our configs have.
    _shape_metadata(w, cfg)
    _rope_scaling_metadata(w, cfg)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    if cfg.is_moe:  # conversion/base.py:1517-1522
        w.add_expert_count(cfg.n_expert)
        w.add_expert_used_count(cfg.n_expert_used)
    if cfg.explicit_head_dim:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)


def _attention_shapes(cfg: ModelConfig) -> Shapes:
    q_rows, kv_rows = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    return {
        T.TOKEN_EMBD: (cfg.vocab_size, cfg.hidden),
        T.OUTPUT_NORM: (cfg.hidden,),
        T.ATTN_NORM: (cfg.hidden,),
        T.ATTN_Q: (q_rows, cfg.hidden),
        T.ATTN_K: (kv_rows, cfg.hidden),
        T.ATTN_V: (kv_rows, cfg.hidden),
        T.ATTN_OUT: (cfg.hidden, q_rows),
        T.FFN_GATE: (cfg.intermediate, cfg.hidden),
        T.FFN_UP: (cfg.intermediate, cfg.hidden),
        T.FFN_DOWN: (cfg.hidden, cfg.intermediate),
    }


# --------------------------------------------------------------------------
# LLaMA family: LLaMA 1/2, Alpaca, Mistral, Llama 3.x (conversion/llama.py LlamaModel)
# --------------------------------------------------------------------------


def _llama_metadata(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    # Mirrors TextModel.set_gguf_parameters + LlamaModel.set_gguf_parameters.
    # Mistral's sliding_window is not written: LlamaModel writes none, and
    # llama.cpp's llama architecture has no sliding-window attention.
    _common_metadata(w, cfg)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)


def _moe_ffn(shapes: Shapes, cfg: ModelConfig) -> Shapes:
    """A MoE layer's feed-forward: the router and the stacked experts in place of the dense
    FFN (llama.cpp's load_arch_tensors: ffn_gate_inp {n_embd, n_expert}, ffn_{gate,up}_exps
    {n_embd, n_ff_exp, n_expert}, ffn_down_exps {n_ff_exp, n_embd, n_expert}; numpy order here)."""
    if not cfg.is_moe:
        return shapes
    for kind in (T.FFN_GATE, T.FFN_UP, T.FFN_DOWN):
        del shapes[kind]
    n, ff, h = cfg.n_expert, cfg.expert_ff, cfg.hidden
    shapes.update({T.FFN_GATE_INP: (n, h), T.FFN_GATE_EXP: (n, ff, h), T.FFN_UP_EXP: (n, ff, h),
                   T.FFN_DOWN_EXP: (n, h, ff)})
    return shapes


def _llama_shapes(cfg: ModelConfig) -> Shapes:
    shapes = _attention_shapes(cfg)
    shapes[T.FFN_NORM] = (cfg.hidden,)
    if not cfg.tie_embeddings:
        shapes[T.OUTPUT] = (cfg.vocab_size, cfg.hidden)
    return _moe_ffn(shapes, cfg)  # llama.cpp's llama arch is Mixtral's too (n_expert > 0)


def llama3_rope_factors(cfg: ModelConfig) -> np.ndarray | None:
    """The rope_freqs tensor of llama3 rope scaling, bit for bit as
    LlamaModel.generate_extra_tensors computes it in torch float32.

    torch evaluates `a / tensor` as `tensor.reciprocal() * a`, hence the
    reciprocals. `theta ** x` is computed in float64 and rounded: it equals
    torch's float32 pow for Llama 3's theta 500000 and head sizes 16..128
    (checked in the tests); other values may differ in the last bit.
    """
    scaling = cfg.rope_scaling or {}
    if str(scaling.get("rope_type", "")).lower() != "llama3":
        return None
    f32 = np.float32
    base = float(scaling.get("rope_theta", cfg.rope_theta))
    factor = float(scaling.get("factor", 8.0))
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    dim = cfg.head_dim
    exponent = np.arange(0, dim, 2, dtype=f32) / f32(dim)
    freqs = f32(1) / (np.float64(base) ** exponent.astype(np.float64)).astype(f32)
    wavelen = (f32(1) / freqs) * f32(2 * math.pi)
    with np.errstate(divide="ignore", invalid="ignore"):  # the middle branch is only used where it is finite
        smooth = ((f32(1) / wavelen) * f32(old_ctx) - f32(low)) / f32(high - low)
        middle = f32(1) / ((f32(1) - smooth) / f32(factor) + smooth)
    factors = np.where(
        wavelen < f32(old_ctx / high), f32(1), np.where(wavelen > f32(old_ctx / low), f32(factor), middle)
    )
    return factors.astype(f32)


def _llama_extras(cfg: ModelConfig) -> dict[gguf.MODEL_TENSOR, np.ndarray]:
    factors = llama3_rope_factors(cfg)
    return {} if factors is None else {T.ROPE_FREQS: factors}


def _tokenizer_config_prefix_space(folder: Path) -> bool | None:
    # LlamaModel.set_vocab: tokenizer_config.json's add_prefix_space, when set.
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("add_prefix_space")
    except (ValueError, AttributeError, OSError, RecursionError):
        return None  # vocab.py reports a broken file with its own message
    return value if isinstance(value, bool) else None


_LLAMA_SKIP = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")

LLAMA = Architecture(
    hf_class="LlamaForCausalLM",
    gguf_arch=gguf.MODEL_ARCH.LLAMA,
    description="LLaMA 1/2/3 and fine-tunes such as Alpaca",
    skip_suffixes=_LLAMA_SKIP,
    rope_permuted=frozenset({T.ATTN_Q, T.ATTN_K}),
    metadata=_llama_metadata,
    shapes=_llama_shapes,
    tokenizer="sentencepiece-or-bpe",
    add_space_prefix=_tokenizer_config_prefix_space,
    extra_tensors=_llama_extras,
)

# The reference converter registers MistralForCausalLM on LlamaModel: same
# tensors, permutation and metadata, SentencePiece vocabulary.
MISTRAL = replace(LLAMA, hf_class="MistralForCausalLM", description="Mistral 7B")


# Mixtral 8x7B / 8x22B: the reference registers MixtralForCausalLM on LlamaModel too; the
# per-expert w1/w2/w3 are stacked into ffn_gate/down/up_exps (conversion/llama.py:262-290),
# and llama.cpp's llama arch runs them when expert_count > 0 (src/models/llama.cpp:69-90).
MIXTRAL = replace(
    LLAMA, hf_class="MixtralForCausalLM", description="Mixtral 8x7B / 8x22B (mixture of experts)",
    experts=MIXTRAL_EXPERTS, check_config=lambda cfg: check_expert_counts(cfg, ("num_local_experts",)),
)


# --------------------------------------------------------------------------
# Qwen2 / Qwen2.5 (conversion/qwen.py Qwen2Model): NEOX rope, so no permutation
# --------------------------------------------------------------------------


def _qwen2_metadata(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    _common_metadata(w, cfg)  # Qwen2Model adds nothing for a plain causal LM


def _qwen2_biases(cfg: ModelConfig) -> Shapes:
    kv_rows = cfg.n_kv_head * cfg.head_dim
    return {T.ATTN_Q: (cfg.n_head * cfg.head_dim,), T.ATTN_K: (kv_rows,), T.ATTN_V: (kv_rows,)}


QWEN2 = Architecture(
    hf_class="Qwen2ForCausalLM",
    gguf_arch=gguf.MODEL_ARCH.QWEN2,
    description="Qwen2 / Qwen2.5",
    skip_suffixes=_LLAMA_SKIP,
    rope_permuted=frozenset(),
    metadata=_qwen2_metadata,
    shapes=_llama_shapes,
    biases=_qwen2_biases,
    tokenizer="sentencepiece-or-bpe",
)


# --------------------------------------------------------------------------
# Gemma 2 (conversion/gemma.py Gemma2Model)
# --------------------------------------------------------------------------


def _gemma2_metadata(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    # Gemma2Model.set_gguf_parameters: no rope base (llama.cpp's 10000 is
    # Gemma 2's), no vocab size; head size, soft-capping and window always.
    _shape_metadata(w, cfg)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    assert cfg.attn_softcap is not None and cfg.final_softcap is not None and cfg.sliding_window
    w.add_attn_logit_softcapping(cfg.attn_softcap)
    w.add_final_logit_softcapping(cfg.final_softcap)
    w.add_sliding_window(cfg.sliding_window)


def _gemma2_shapes(cfg: ModelConfig) -> Shapes:
    shapes = _attention_shapes(cfg)
    h = (cfg.hidden,)
    shapes.update({T.ATTN_POST_NORM: h, T.FFN_PRE_NORM: h, T.FFN_POST_NORM: h})
    return shapes  # the output matrix is token_embd (llama.cpp duplicates it at load)


GEMMA2 = Architecture(
    hf_class="Gemma2ForCausalLM",
    gguf_arch=gguf.MODEL_ARCH.GEMMA2,
    description="Gemma 2",
    skip_suffixes=_LLAMA_SKIP,
    skip_names=frozenset({"lm_head.weight"}),  # Gemma2Model.filter_tensors
    rope_permuted=frozenset(),
    metadata=_gemma2_metadata,
    shapes=_gemma2_shapes,
    add_space_prefix=lambda folder: False,  # Gemma2Model.set_vocab
    norm_offset=1.0,
    config_defaults={"tie_word_embeddings": True},
    requires=("attn_softcap", "final_softcap", "sliding_window", "explicit_head_dim"),
)


# --------------------------------------------------------------------------
# Qwen3 (conversion/qwen.py Qwen3Model, a Qwen2Model): per-head q/k RMSNorm, no biases
# --------------------------------------------------------------------------


def _qk_norm_shapes(cfg: ModelConfig) -> Shapes:
    # One RMSNorm weight of head size, shared by every head (Qwen3Attention.q_norm / k_norm).
    return {T.ATTN_Q_NORM: (cfg.head_dim,), T.ATTN_K_NORM: (cfg.head_dim,)}


def _qwen3_shapes(cfg: ModelConfig) -> Shapes:
    return {**_llama_shapes(cfg), **_qk_norm_shapes(cfg)}


QWEN3 = Architecture(
    hf_class="Qwen3ForCausalLM",
    gguf_arch=gguf.MODEL_ARCH.QWEN3,
    description="Qwen3 (dense)",
    skip_suffixes=_LLAMA_SKIP,
    rope_permuted=frozenset(),  # NEOX rope (llama_model_rope_type: LLM_ARCH_QWEN3)
    metadata=_qwen2_metadata,  # Qwen3Model inherits Qwen2Model.set_gguf_parameters
    shapes=_qwen3_shapes,
    tokenizer="sentencepiece-or-bpe",
)


# --------------------------------------------------------------------------
# Qwen3-MoE and Qwen2-MoE (conversion/qwen.py Qwen3MoeModel, Qwen2MoeModel)
# --------------------------------------------------------------------------


def _qwen_moe_metadata(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    # Qwen2MoeModel.set_gguf_parameters (conversion/qwen.py:81-88), which Qwen3MoeModel inherits.
    _common_metadata(w, cfg)
    if cfg.n_ff_exp:
        w.add_expert_feed_forward_length(cfg.n_ff_exp)
    if cfg.n_ff_shexp:
        w.add_expert_shared_feed_forward_length(cfg.n_ff_shexp)


def _qwen2moe_shapes(cfg: ModelConfig) -> Shapes:
    # The shared expert beside the routed ones, and its sigmoid gate (src/models/qwen2moe.cpp:52-57;
    # HF stores shared_expert_gate as [1, n_embd], llama.cpp reads it as {n_embd}).
    shapes = _llama_shapes(cfg)  # the routed experts come with it (_moe_ffn)
    ff, h = cfg.n_ff_shexp, cfg.hidden
    shapes.update({T.FFN_GATE_INP_SHEXP: (1, h), T.FFN_GATE_SHEXP: (ff, h), T.FFN_UP_SHEXP: (ff, h),
                   T.FFN_DOWN_SHEXP: (h, ff)})
    return shapes


def _check_qwen2moe(cfg: ModelConfig) -> None:
    check_qwen_moe(cfg, norm_topk=False, arch_name="qwen2moe")
    if not cfg.n_ff_shexp:
        raise InputError("config.json lacks shared_expert_intermediate_size, the shared expert's width")


# Qwen3's attention and tensors; _llama_shapes puts the experts in (_moe_ffn).
QWEN3MOE = replace(
    QWEN3, hf_class="Qwen3MoeForCausalLM", gguf_arch=gguf.MODEL_ARCH.QWEN3MOE,
    description="Qwen3 MoE (30B-A3B, 235B-A22B)", metadata=_qwen_moe_metadata,
    tokenizer="bpe",  # Qwen2MoeModel keeps TextModel.set_vocab (conversion/base.py:1403)
    check_config=lambda cfg: check_qwen_moe(cfg, norm_topk=True, arch_name="qwen3moe"),
    experts=QWEN_MOE_EXPERTS,
)

QWEN2MOE = replace(
    QWEN3MOE, hf_class="Qwen2MoeForCausalLM", gguf_arch=gguf.MODEL_ARCH.QWEN2MOE,
    description="Qwen1.5-MoE / Qwen2-MoE (shared expert)", shapes=_qwen2moe_shapes, biases=_qwen2_biases,
    check_config=_check_qwen2moe,
)


# --------------------------------------------------------------------------
# Gemma 3 text (conversion/gemma.py Gemma3Model), also inside Gemma3ForConditionalGeneration
# --------------------------------------------------------------------------

# llama.cpp's gemma3 reads no layer pattern from a converted file: every 6th
# layer is global, the others slide (src/models/gemma3.cpp load_swa_pattern(ml, 6);
# hparams.set_swa_pattern: layer il slides when il % 6 < 5).
GEMMA3_SWA_PATTERN = 6

# Gemma3TextConfig's defaults (transformers 4.57): the reference reads the config
# through AutoConfig, so a key config.json leaves out has this value there.
_GEMMA3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262208, "max_position_embeddings": 131072, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "head_dim": 256, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10000.0,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "tie_word_embeddings": True,
}


def _gemma3_rope_thetas(cfg: ModelConfig) -> tuple[float, float | None]:
    """(global, local) rope bases: transformers 5's rope_parameters per layer kind,
    else rope_theta and rope_local_base_freq (TextModel.__init__)."""
    params = cfg.raw.get("rope_parameters")
    params = params if isinstance(params, dict) else {}
    full, sliding = params.get("full_attention"), params.get("sliding_attention")
    global_theta = full.get("rope_theta", cfg.rope_theta) if isinstance(full, dict) else cfg.rope_theta
    local = sliding.get("rope_theta") if isinstance(sliding, dict) else cfg.raw.get("rope_local_base_freq")
    for value in (global_theta, local):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise InputError(f"config.json: rope base {value!r} is not a positive number")
    return float(global_theta), None if local is None else float(local)


def _gemma3_metadata(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    # TextModel.set_gguf_parameters then Gemma3Model.set_gguf_parameters.
    global_theta, local_theta = _gemma3_rope_thetas(cfg)
    _shape_metadata(w, cfg)
    _rope_scaling_metadata(w, cfg)
    w.add_rope_freq_base(global_theta)
    if local_theta is not None:
        w.add_rope_freq_base_swa(local_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    if cfg.final_softcap:
        w.add_final_logit_softcapping(cfg.final_softcap)
    assert cfg.sliding_window
    w.add_sliding_window(cfg.sliding_window)


def _gemma3_check(cfg: ModelConfig) -> None:
    """Refuse what llama.cpp's gemma3 would compute differently from the source model."""
    raw = cfg.raw
    if raw.get("attn_logit_softcapping") is not None:
        raise UnsupportedError("config.json sets attn_logit_softcapping, which Gemma 3 (and llama.cpp's gemma3) do not have")
    expected = ["full_attention" if i % GEMMA3_SWA_PATTERN == GEMMA3_SWA_PATTERN - 1 else "sliding_attention"
                for i in range(cfg.n_layer)]
    layer_types = raw.get("layer_types")
    pattern = raw.get("sliding_window_pattern", raw.get("_sliding_window_pattern", GEMMA3_SWA_PATTERN))
    if (layer_types is not None and layer_types != expected) or pattern != GEMMA3_SWA_PATTERN:
        raise UnsupportedError(
            "config.json's sliding-window layer pattern is not Gemma 3's (5 local layers, then 1 global); "
            "llama.cpp's gemma3 always uses that pattern"
        )
    # llama.cpp scales scores by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the
    # 62-layer 27B (src/models/gemma3.cpp, f_attention_scale); transformers by
    # query_pre_attn_scalar**-0.5.
    scalar = raw.get("query_pre_attn_scalar", cfg.head_dim)
    used = cfg.hidden / cfg.n_head if cfg.n_layer == 62 else cfg.head_dim
    if scalar != used:
        raise UnsupportedError(
            f"config.json: query_pre_attn_scalar {scalar!r} differs from the {used:g} llama.cpp's gemma3 scales by"
        )


def _gemma3_shapes(cfg: ModelConfig) -> Shapes:
    return {**_gemma2_shapes(cfg), **_qk_norm_shapes(cfg)}


GEMMA3 = Architecture(
    hf_class="Gemma3ForCausalLM",
    gguf_arch=gguf.MODEL_ARCH.GEMMA3,
    description="Gemma 3 text (270M, 1B)",
    skip_suffixes=_LLAMA_SKIP,
    rope_permuted=frozenset(),
    metadata=_gemma3_metadata,
    shapes=_gemma3_shapes,
    add_space_prefix=lambda folder: False,  # Gemma3Model.set_vocab (SentencePiece)
    norm_offset=1.0,  # Gemma3Model.norm_shift: every "norm.weight", q/k norms included
    config_defaults=_GEMMA3_DEFAULTS,
    requires=("sliding_window",),
    check_config=_gemma3_check,
)

# The 4B and larger release: the same text model under "language_model", next to
# a SigLIP vision tower and its projector, which llama.cpp reads from a separate
# mmproj file (Gemma3VisionModel); convert writes the text model only.
GEMMA3_MM = replace(
    GEMMA3,
    hf_class="Gemma3ForConditionalGeneration",
    description="Gemma 3 4B+ (text model only; the vision tower is skipped)",
    other_parts=("vision_tower.", "multi_modal_projector."),
    strip_parts=("language_model.",),
)

ARCHITECTURES: dict[str, Architecture] = {
    a.hf_class: a for a in (LLAMA, MISTRAL, MIXTRAL, QWEN2, QWEN3, QWEN3MOE, QWEN2MOE, GEMMA2, GEMMA3, GEMMA3_MM)
}
SUPPORTED = {name: arch.description for name, arch in ARCHITECTURES.items()}
# Architectures convert refuses, with the reason its error gives.
REFUSED = {
    # conversion/gpt_oss.py: the experts ship as MXFP4 blocks + scales (uint8), which the reference
    # repacks bit for bit into an MXFP4_MOE file; on top come attention sinks, biased experts with
    # interleaved gate/up columns and the clamped SwiGLU: none of it is here yet.
    "GptOssForCausalLM": "gpt-oss's experts ship as MXFP4 blocks, which llama.cpp's route repacks into "
                         "an MXFP4_MOE file; use its convert_hf_to_gguf.py (chat and serve run the GGUF it writes)",
}
CONFIG_DEFAULTS = {name: arch.config_defaults for name, arch in ARCHITECTURES.items() if arch.config_defaults}


@dataclass(frozen=True)
class MappedName:
    gguf_name: str
    kind: gguf.MODEL_TENSOR
    layer: int | None


def map_name(arch: Architecture, name_map: gguf.TensorNameMap, hf_name: str) -> MappedName | None:
    """GGUF name of one source tensor; None for tensors to drop; InputError for unknown ones."""
    if arch.other_part(hf_name):
        return None
    for part in arch.strip_parts:
        hf_name = hf_name.replace(part, "")
    if hf_name.endswith(arch.skip_suffixes) or hf_name in arch.skip_names:
        return None
    mapped = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise InputError(
            f"tensor {hf_name!r} has no GGUF name for {arch.hf_class}; "
            "the checkpoint has weights this architecture does not use"
        )
    kind, gguf_name = mapped
    layer = next((int(p) for p in hf_name.split(".") if p.isdecimal()), None)
    return MappedName(gguf_name, kind, layer)

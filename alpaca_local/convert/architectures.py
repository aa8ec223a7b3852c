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
    # Tokenizer: "sentencepiece" (tokenizer.model) or "sentencepiece-or-bpe"
    # (tokenizer.model when present, else tokenizer.json's byte-level BPE, as
    # LlamaModel.set_vocab / Qwen2Model.set_vocab try them).
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

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def check(self, cfg: ModelConfig) -> None:
        missing = [name for name in self.requires if getattr(cfg, name) in (None, False)]
        if missing:
            raise InputError(f"config.json of a {self.hf_class} lacks {', '.join(missing)}; it is required")

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


def _llama_shapes(cfg: ModelConfig) -> Shapes:
    shapes = _attention_shapes(cfg)
    shapes[T.FFN_NORM] = (cfg.hidden,)
    if not cfg.tie_embeddings:
        shapes[T.OUTPUT] = (cfg.vocab_size, cfg.hidden)
    return shapes


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

ARCHITECTURES: dict[str, Architecture] = {a.hf_class: a for a in (LLAMA, MISTRAL, QWEN2, GEMMA2)}
SUPPORTED = {name: arch.description for name, arch in ARCHITECTURES.items()}
CONFIG_DEFAULTS = {name: arch.config_defaults for name, arch in ARCHITECTURES.items() if arch.config_defaults}


@dataclass(frozen=True)
class MappedName:
    gguf_name: str
    kind: gguf.MODEL_TENSOR
    layer: int | None


def map_name(arch: Architecture, name_map: gguf.TensorNameMap, hf_name: str) -> MappedName | None:
    """GGUF name of one source tensor; None for tensors to drop; InputError for unknown ones."""
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

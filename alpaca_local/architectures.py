"""Architecture facts, one entry per architecture.

An entry says how a Hugging Face class becomes a GGUF architecture: the GGUF
arch, which source tensors to drop, which tensors get the rotary row
permutation, and the metadata llama.cpp reads. Adding a model is adding an
entry; the stages (read → map → choose types → quantize → write) stay as they are.
Tensor names come from gguf-py's `TensorNameMap` (the converter's own table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gguf

from .config import ModelConfig
from .errors import InputError


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
    # Shape (numpy order) of every tensor kind the architecture needs; a kind
    # that is absent from the result is not needed for this config.
    shapes: Callable[[ModelConfig], dict[gguf.MODEL_TENSOR, tuple[int, ...]]]

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


def _llama_metadata(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    # Mirrors TextModel.set_gguf_parameters + LlamaModel.set_gguf_parameters.
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.hidden)
    w.add_feed_forward_length(cfg.intermediate)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    if cfg.explicit_head_dim:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)


def _llama_shapes(cfg: ModelConfig) -> dict[gguf.MODEL_TENSOR, tuple[int, ...]]:
    T = gguf.MODEL_TENSOR
    q_rows, kv_rows = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    shapes = {
        T.TOKEN_EMBD: (cfg.vocab_size, cfg.hidden),
        T.OUTPUT_NORM: (cfg.hidden,),
        T.ATTN_NORM: (cfg.hidden,),
        T.ATTN_Q: (q_rows, cfg.hidden),
        T.ATTN_K: (kv_rows, cfg.hidden),
        T.ATTN_V: (kv_rows, cfg.hidden),
        T.ATTN_OUT: (cfg.hidden, q_rows),
        T.FFN_NORM: (cfg.hidden,),
        T.FFN_GATE: (cfg.intermediate, cfg.hidden),
        T.FFN_UP: (cfg.intermediate, cfg.hidden),
        T.FFN_DOWN: (cfg.hidden, cfg.intermediate),
    }
    if not cfg.tie_embeddings:
        shapes[T.OUTPUT] = (cfg.vocab_size, cfg.hidden)
    return shapes


LLAMA = Architecture(
    hf_class="LlamaForCausalLM",
    gguf_arch=gguf.MODEL_ARCH.LLAMA,
    description="LLaMA 1/2 and fine-tunes such as Alpaca",
    skip_suffixes=(".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias"),
    rope_permuted=frozenset({gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K}),
    metadata=_llama_metadata,
    shapes=_llama_shapes,
)

ARCHITECTURES: dict[str, Architecture] = {a.hf_class: a for a in (LLAMA,)}
SUPPORTED = {name: arch.description for name, arch in ARCHITECTURES.items()}


@dataclass(frozen=True)
class MappedName:
    gguf_name: str
    kind: gguf.MODEL_TENSOR
    layer: int | None


def map_name(arch: Architecture, name_map: gguf.TensorNameMap, hf_name: str) -> MappedName | None:
    """GGUF name of one source tensor; None for tensors to drop; InputError for unknown ones."""
    if hf_name.endswith(arch.skip_suffixes):
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

"""Tiny mixture-of-experts checkpoints, written by transformers' own classes.

In:  a folder path, a dtype ("F16" or "BF16") and a shard size. Out: a
`tinyarch.TinyModel` whose folder is what `save_pretrained` writes for
Qwen3MoeForCausalLM, MixtralForCausalLM and Qwen2MoeForCausalLM (transformers
4.57: one matrix per expert and projection, sharded safetensors with their
index), plus the tokenizer files of the family (tinyarch's, trained here).

Weights are re-drawn so activations and routing are far from zero (the
default 0.02 init makes every logit about 0 and every router a tie):
matrices ~ N(0, 1/fan_in), the router ~ N(0, 4/fan_in), norms 1 + 0.1 N(0, 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tinyarch

DTYPES = {"F16": "float16", "BF16": "bfloat16"}


def _reinit(model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                scale = (2.0 if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")) else 1.0)
                p.copy_(scale * torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[-1]))


def _save(model, dirpath: Path, dtype: str, shard: str) -> tinyarch.TinyModel:
    """save_pretrained in `dtype`, sharded; the stored values as float32 numpy arrays."""
    import torch

    model = model.to(getattr(torch, DTYPES[dtype]))
    model.save_pretrained(dirpath, max_shard_size=shard, safe_serialization=True)
    weights = {n: t.detach().to(torch.float32).numpy() for n, t in model.state_dict().items()}
    cfg = json.loads((dirpath / "config.json").read_text())
    tokenizer = "sentencepiece" if (dirpath / "tokenizer.model").is_file() else "bpe"
    return tinyarch.TinyModel(dirpath, cfg, weights, tokenizer, "qwen2" if tokenizer == "bpe" else None)


def build_qwen3moe(dirpath: str | Path, *, dtype: str = "BF16", shard: str = "400KB", seed: int = 21,
                   n_expert: int = 6, n_used: int = 2, n_layer: int = 2, moe_ff: int = 128,
                   **config) -> tinyarch.TinyModel:
    """Qwen3-30B-A3B's layout: head_dim != hidden/heads, q/k norms, 128 experts of width 768
    there (here `n_expert` of `moe_ff`: rows of 128 make Q4_K fall back to Q5_0), norm_topk_prob."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    n_vocab, ids = tinyarch.qwen3_tokenizer(dirpath)
    cfg = Qwen3MoeConfig(
        vocab_size=n_vocab, hidden_size=256, intermediate_size=512, moe_intermediate_size=moe_ff,
        num_hidden_layers=n_layer, num_attention_heads=4, num_key_value_heads=2, head_dim=96,
        num_experts=n_expert, num_experts_per_tok=n_used, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        **config,
    )
    model = Qwen3MoeForCausalLM(cfg)
    _reinit(model, seed)
    return _save(model, dirpath, dtype, shard)


def build_mixtral(dirpath: str | Path, *, dtype: str = "F16", shard: str = "1MB", seed: int = 22,
                  n_expert: int = 8, n_used: int = 2, n_layer: int = 2, **config) -> tinyarch.TinyModel:
    """Mixtral 8x7B's layout: 8 experts (llama-quantize's n_expert == 8 rules: attn_k/attn_v Q8_0,
    attn_output Q5_K at Q4_K_M), block_sparse_moe.experts.N.w1/w2/w3, GQA, the Mistral tokenizer."""
    from transformers import MixtralConfig, MixtralForCausalLM

    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    n_vocab = tinyarch.mistral_tokenizer(dirpath)
    cfg = MixtralConfig(
        vocab_size=n_vocab, hidden_size=256, intermediate_size=256, num_hidden_layers=n_layer,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=n_expert,
        num_experts_per_tok=n_used, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5,
        sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **config,
    )
    model = MixtralForCausalLM(cfg)
    _reinit(model, seed)
    return _save(model, dirpath, dtype, shard)


def build_qwen2moe(dirpath: str | Path, *, dtype: str = "F16", shard: str = "400KB", seed: int = 23,
                   n_expert: int = 4, n_used: int = 2, **config) -> tinyarch.TinyModel:
    """Qwen1.5-MoE-A2.7B's layout: q/k/v biases, routed experts plus a shared expert with its
    sigmoid gate ([1, hidden]), norm_topk_prob false."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    n_vocab, ids = tinyarch.qwen3_tokenizer(dirpath)
    cfg = Qwen2MoeConfig(
        vocab_size=n_vocab, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
        shared_expert_intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        num_experts=n_expert, num_experts_per_tok=n_used, norm_topk_prob=False, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=8192, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], **config,
    )
    model = Qwen2MoeForCausalLM(cfg)
    _reinit(model, seed)
    return _save(model, dirpath, dtype, shard)


ARCHS = ("qwen3moe", "qwen3moe-f16", "mixtral", "mixtral-bf16", "qwen2moe")
BUILDERS = {
    "qwen3moe": build_qwen3moe,
    "qwen3moe-f16": lambda d: build_qwen3moe(d, dtype="F16", shard="10MB"),
    "mixtral": build_mixtral,
    "mixtral-bf16": lambda d: build_mixtral(d, dtype="BF16", shard="10MB", n_expert=4),
    "qwen2moe": build_qwen2moe,
}


def hf_logits(path: Path, ids: list[int]) -> np.ndarray:
    """transformers' own forward pass over the saved folder, in float32: [len(ids), vocab]."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy().astype(np.float64)

"""Reference LLaMA forward pass in plain numpy (float64).

In:  HF-named weights (any float dtype), an HF config dict, token ids.
Out: logits [n_tokens, vocab] as float64, computed the way transformers'
LlamaForCausalLM does (modeling_llama.py): RMSNorm, rotary embeddings in the
rotate_half layout that HF checkpoints are stored in, causal grouped-query
attention, SiLU-gated MLP, optional tied embeddings.

llama.cpp's converter permutes q_proj/k_proj rows into the interleaved (GPT-J)
rope layout; `permute_qk` does the same, and `forward(..., rope="interleaved")`
runs rope in that layout, so tests can check the permute against this reference.
"""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x * rsqrt(mean(x^2) + eps) * w, as LlamaRMSNorm."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def rope_angles(config: dict, n_pos: int, head_dim: int) -> np.ndarray:
    """Angles [n_pos, head_dim/2]: pos * theta^(-2i/d), as LlamaRotaryEmbedding."""
    theta = float(config.get("rope_theta", 10000.0))
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    pos = np.arange(n_pos, dtype=np.float64)
    scaling = config.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "linear":
            raise NotImplementedError(f"rope_scaling type {kind!r}: only 'linear' is modelled")
        pos = pos / float(scaling["factor"])
    return pos[:, None] * inv_freq[None, :]


def apply_rope(x: np.ndarray, angles: np.ndarray, layout: str = "half") -> np.ndarray:
    """Rotate x [n_pos, n_heads, head_dim].

    layout="half": HF's rotate_half, dimension i pairs with i + d/2.
    layout="interleaved": llama.cpp / Meta's original, dimension 2i pairs with 2i+1.
    """
    cos = np.cos(angles)[:, None, :]
    sin = np.sin(angles)[:, None, :]
    if layout == "half":
        d2 = x.shape[-1] // 2
        x1, x2 = x[..., :d2], x[..., d2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    if layout == "interleaved":
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x2 * cos + x1 * sin
        return out
    raise ValueError(f"rope layout {layout!r}: expected 'half' or 'interleaved'")


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate_half rows -> interleaved rows, as llama.cpp convert_hf_to_gguf's
    LlamaModel.permute: reshape(n_head, 2, d/2, in).swapaxes(1, 2)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def attention(
    h: np.ndarray, weights: dict[str, np.ndarray], prefix: str, config: dict, angles: np.ndarray, rope: str
) -> np.ndarray:
    n = h.shape[0]
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    hd = _head_dim(config)
    w = lambda name: np.asarray(weights[prefix + name], dtype=np.float64)  # noqa: E731
    q = (h @ w("q_proj.weight").T).reshape(n, n_head, hd)
    k = (h @ w("k_proj.weight").T).reshape(n, n_kv, hd)
    v = (h @ w("v_proj.weight").T).reshape(n, n_kv, hd)
    q = apply_rope(q, angles, rope)
    k = apply_rope(k, angles, rope)
    # repeat_kv: query head j reads kv head j // (n_head / n_kv)
    group = n_head // n_kv
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
    mask = np.triu(np.ones((n, n), dtype=bool), k=1)
    scores = np.where(mask[None], -np.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", p, v).reshape(n, n_head * hd)
    return out @ w("o_proj.weight").T


def hidden_states(
    weights: dict[str, np.ndarray], config: dict, token_ids: list[int], *, rope: str = "half"
) -> np.ndarray:
    """Final-normed hidden states [n_tokens, hidden] (float64)."""
    eps = float(config.get("rms_norm_eps", 1e-6))
    f64 = lambda name: np.asarray(weights[name], dtype=np.float64)  # noqa: E731
    x = f64("model.embed_tokens.weight")[np.asarray(token_ids, dtype=np.int64)]
    angles = rope_angles(config, len(token_ids), _head_dim(config))
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, f64(p + "input_layernorm.weight"), eps)
        x = x + attention(h, weights, p + "self_attn.", config, angles, rope)
        h = rms_norm(x, f64(p + "post_attention_layernorm.weight"), eps)
        gate = h @ f64(p + "mlp.gate_proj.weight").T
        up = h @ f64(p + "mlp.up_proj.weight").T
        x = x + (silu(gate) * up) @ f64(p + "mlp.down_proj.weight").T
    return rms_norm(x, f64("model.norm.weight"), eps)


def forward(
    weights: dict[str, np.ndarray], config: dict, token_ids: list[int], *, rope: str = "half"
) -> np.ndarray:
    """Logits [n_tokens, vocab] (float64) for `token_ids` starting at position 0.

    `rope="interleaved"` is only for weights whose q/k rows went through `permute_qk`.
    """
    if len(token_ids) == 0:
        raise ValueError("token_ids is empty")
    x = hidden_states(weights, config, token_ids, rope=rope)
    # tied: HF's lm_head *is* embed_tokens, whatever a stray lm_head.weight holds
    tied = config.get("tie_word_embeddings", False)
    head = weights["model.embed_tokens.weight" if tied else "lm_head.weight"]
    return x @ np.asarray(head, dtype=np.float64).T


def greedy(weights: dict[str, np.ndarray], config: dict, token_ids: list[int], n_new: int) -> list[int]:
    """Greedy continuation: `n_new` argmax tokens (recomputes the prefix each step)."""
    ids = list(token_ids)
    for _ in range(n_new):
        ids.append(int(np.argmax(forward(weights, config, ids)[-1])))
    return ids[len(token_ids):]

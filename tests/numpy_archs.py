"""Reference forward passes in plain numpy (float64) for Mistral, Llama 3, Qwen2/3 and Gemma 2/3.

In:  HF-named weights, an HF config dict, token ids. Out: logits [n_tokens, vocab].
Each follows its transformers modeling file, written independently of the
converter (no GGUF names, no permutation):

- Mistral: LLaMA's forward (numpy_llama), rotate-half rope.
- Llama 3: LLaMA's forward with llama3 rope scaling (modeling_rope_utils
  `_compute_llama3_parameters`) and tied embeddings.
- Qwen2: LLaMA's forward with q/k/v biases. Qwen3: without biases, with an
  RMSNorm over each query and key head before rope.
- Gemma 2 (modeling_gemma2): embeddings times sqrt(hidden), RMSNorm with
  (1 + w), four norms per layer, GELU-tanh MLP, attention scores scaled by
  query_pre_attn_scalar**-0.5 and soft-capped, sliding-window attention on
  even layers, soft-capped logits from the tied embedding.
- Gemma 3 (modeling_gemma3): Gemma 2 without soft-capping, with (1 + w) q/k
  head norms, sliding layers by layer_types using rope_local_base_freq, global
  layers using rope_theta and rope_scaling.
"""

from __future__ import annotations

import math

import numpy as np
import numpy_llama
from numpy_llama import apply_rope, rms_norm, silu


def llama3_inv_freq(config: dict, head_dim: int) -> np.ndarray:
    """transformers' _compute_llama3_parameters, in float64."""
    base = float(config.get("rope_theta", 10000.0))
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    rs = config["rope_scaling"]
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return np.where(medium, smoothed, scaled)


def _angles(config: dict, n_pos: int, head_dim: int) -> np.ndarray:
    rs = config.get("rope_scaling") or {}
    if rs.get("rope_type") == "llama3":
        return np.arange(n_pos, dtype=np.float64)[:, None] * llama3_inv_freq(config, head_dim)[None, :]
    return numpy_llama.rope_angles(config, n_pos, head_dim)


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _attention(h, weights, prefix, config, angles, *, scale, softcap=None, window=None, norm_offset=0.0):
    n = h.shape[0]
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    hd = _head_dim(config)

    def proj(name: str) -> np.ndarray:
        out = h @ np.asarray(weights[prefix + name + ".weight"], dtype=np.float64).T
        if prefix + name + ".bias" in weights:
            out = out + np.asarray(weights[prefix + name + ".bias"], dtype=np.float64)
        return out

    q, k = proj("q_proj").reshape(n, n_head, hd), proj("k_proj").reshape(n, n_kv, hd)
    if prefix + "q_norm.weight" in weights:  # Qwen3 / Gemma 3: RMSNorm over each head, before rope
        eps = float(config.get("rms_norm_eps", 1e-6))
        w = lambda name: norm_offset + np.asarray(weights[prefix + name], dtype=np.float64)
        q, k = rms_norm(q, w("q_norm.weight"), eps), rms_norm(k, w("k_norm.weight"), eps)
    q, k = apply_rope(q, angles), apply_rope(k, angles)
    v = proj("v_proj").reshape(n, n_kv, hd)
    k = np.repeat(k, n_head // n_kv, axis=1)
    v = np.repeat(v, n_head // n_kv, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) * scale
    if softcap:
        scores = np.tanh(scores / softcap) * softcap
    pos = np.arange(n)
    masked = pos[None, :] > pos[:, None]
    if window:
        masked |= pos[:, None] - pos[None, :] >= window
    scores = np.where(masked[None], -np.inf, scores)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", p, v).reshape(n, n_head * hd)
    return out @ np.asarray(weights[prefix + "o_proj.weight"], dtype=np.float64).T


def _llama_like(weights, config, ids) -> np.ndarray:
    """Mistral, Llama 3, Qwen2: LLaMA's block, with whatever biases the weights have."""
    eps = float(config.get("rms_norm_eps", 1e-6))
    f64 = lambda name: np.asarray(weights[name], dtype=np.float64)
    x = f64("model.embed_tokens.weight")[np.asarray(ids)]
    hd = _head_dim(config)
    angles = _angles(config, len(ids), hd)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, f64(p + "input_layernorm.weight"), eps)
        x = x + _attention(h, weights, p + "self_attn.", config, angles, scale=hd**-0.5)
        h = rms_norm(x, f64(p + "post_attention_layernorm.weight"), eps)
        x = x + (silu(h @ f64(p + "mlp.gate_proj.weight").T) * (h @ f64(p + "mlp.up_proj.weight").T)) @ f64(
            p + "mlp.down_proj.weight"
        ).T
    x = rms_norm(x, f64("model.norm.weight"), eps)
    head = "model.embed_tokens.weight" if config.get("tie_word_embeddings") else "lm_head.weight"
    return x @ f64(head).T


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _gemma(weights, config, ids, layers: list[dict]) -> np.ndarray:
    """Gemma 2/3's stack: embeddings times sqrt(hidden), (1 + w) norms before and after
    attention and the GELU-tanh MLP, tied output, optional final soft-capping.
    `layers[i]`: layer i's attention keywords (angles, window, softcap, norm_offset)."""
    eps = float(config.get("rms_norm_eps", 1e-6))
    f64 = lambda name: np.asarray(weights[name], dtype=np.float64)
    norm = lambda x, name: rms_norm(x, 1.0 + f64(name), eps)
    embed = f64("model.embed_tokens.weight")
    x = embed[np.asarray(ids)] * math.sqrt(config["hidden_size"])
    scale = float(config["query_pre_attn_scalar"]) ** -0.5
    for i, attention in enumerate(layers):
        p = f"model.layers.{i}."
        h = norm(x, p + "input_layernorm.weight")
        h = _attention(h, weights, p + "self_attn.", config, scale=scale, **attention)
        x = x + norm(h, p + "post_attention_layernorm.weight")
        h = norm(x, p + "pre_feedforward_layernorm.weight")
        h = (gelu_tanh(h @ f64(p + "mlp.gate_proj.weight").T) * (h @ f64(p + "mlp.up_proj.weight").T)) @ f64(
            p + "mlp.down_proj.weight"
        ).T
        x = x + norm(h, p + "post_feedforward_layernorm.weight")
    logits = norm(x, "model.norm.weight") @ embed.T
    cap = config.get("final_logit_softcapping")
    return np.tanh(logits / cap) * cap if cap else logits


def _gemma2(weights, config, ids) -> np.ndarray:
    angles = numpy_llama.rope_angles(config, len(ids), _head_dim(config))
    softcap = config.get("attn_logit_softcapping")
    layers = [  # Gemma2DecoderLayer.is_sliding: even layers
        {"angles": angles, "softcap": softcap, "window": config["sliding_window"] if i % 2 == 0 else None}
        for i in range(config["num_hidden_layers"])
    ]
    return _gemma(weights, config, ids, layers)


def _gemma3(weights, config, ids) -> np.ndarray:
    """modeling_gemma3: Gemma 2's block without soft-capping, plus q/k norms (1 + w);
    layer_types picks sliding layers, which use rope_local_base_freq unscaled, while
    global layers use rope_theta with rope_scaling."""
    config = {"rope_theta": 1_000_000.0, **config}  # Gemma3TextConfig's default
    hd = _head_dim(config)
    local = {"rope_theta": config.get("rope_local_base_freq", 10000.0)}
    angles = {"full_attention": numpy_llama.rope_angles(config, len(ids), hd),
              "sliding_attention": numpy_llama.rope_angles(local, len(ids), hd)}
    layers = [
        {"angles": angles[kind], "norm_offset": 1.0,
         "window": config["sliding_window"] if kind == "sliding_attention" else None}
        for kind in config["layer_types"]
    ]
    return _gemma(weights, config, ids, layers)


def forward(weights: dict[str, np.ndarray], config: dict, token_ids: list[int]) -> np.ndarray:
    """Logits [n_tokens, vocab] (float64) for `token_ids` from position 0."""
    if not token_ids:
        raise ValueError("token_ids is empty")
    arch = config["architectures"][0]
    if arch == "Gemma2ForCausalLM":
        return _gemma2(weights, config, token_ids)
    if arch in ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"):
        if "layer_types" not in config:  # Gemma3TextConfig's default: every 6th layer global
            config = {**config, "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                                for i in range(config["num_hidden_layers"])]}
        return _gemma3(weights, config, token_ids)
    if arch in ("MistralForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        return _llama_like(weights, config, token_ids)
    raise ValueError(f"no numpy forward for {arch}")

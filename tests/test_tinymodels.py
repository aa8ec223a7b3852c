"""Self-tests of the tiny-model builders and the numpy reference forward."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

import numpy_llama
import tinymodels
from tinymodels import VARIED_CORPUS, build_llama, expected_files, read_safetensors_f32

spm = pytest.importorskip("sentencepiece")


# --------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    path = tinymodels.train_sentencepiece(tmp_path_factory.mktemp("sp"))
    return spm.SentencePieceProcessor(model_file=str(path))


def test_sentencepiece_llama_layout(sp):
    assert sp.get_piece_size() == 512
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.is_control(1) and sp.is_control(2) and sp.is_unknown(0)
    for b in range(256):
        assert sp.id_to_piece(3 + b) == f"<0x{b:02X}>"
        assert sp.is_byte(3 + b)


def test_sentencepiece_llama_normalization(sp):
    # newline is never a piece: dummy prefix then <0x0A>, as LLaMA's [29871, 13]
    assert sp.encode("\n", out_type=str) == ["▁", "<0x0A>"]
    assert all(len(p.strip("▁")) <= 1 for p in sp.encode("12345", out_type=str))  # split_digits
    assert sp.encode("  a", out_type=str)[0].startswith("▁▁")  # dummy prefix + kept spaces
    assert any(sp.is_byte(i) for i in sp.encode("𝔘"))  # not in training: byte fallback
    assert sp.encode("</s>") != [2]  # literal text, not the control token


@pytest.mark.parametrize("text", VARIED_CORPUS)
def test_sentencepiece_round_trips(sp, text):
    ids = sp.encode(text)
    assert 0 not in ids  # byte fallback means no <unk>
    assert sp.decode(ids) == text


def test_sentencepiece_is_cached_and_deterministic():
    first = tinymodels.sentencepiece_model_bytes(512)
    t = time.perf_counter()
    again = tinymodels.sentencepiece_model_bytes(512)
    assert again is first and time.perf_counter() - t < 0.01
    tinymodels._SP_CACHE.pop((512, "bpe"))
    try:
        assert tinymodels.sentencepiece_model_bytes(512) == first
    finally:
        tinymodels._SP_CACHE[(512, "bpe")] = first


# --------------------------------------------------------------------------- folders


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"dtype": "BF16", "shards": 3},
        {"dtype": "F32", "add_pad": False, "tie_embeddings": True},
        {"dtype": "F16", "shards": 2, "n_kv_head": 4, "chat_template": "{{ messages }}"},
    ],
    ids=["f16", "bf16-3shards", "f32-nopad-tied", "f16-2shards-mha-template"],
)
def test_folder_layout(tmp_path, opts):
    m = build_llama(tmp_path / "m", **opts)
    names = {p.name for p in m.path.iterdir()}
    assert names == expected_files(add_pad=opts.get("add_pad", True), shards=opts.get("shards", 1))

    cfg = json.loads((m.path / "config.json").read_text())
    assert cfg == m.config
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["torch_dtype"] == {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}[opts.get("dtype", "F16")]
    assert cfg["vocab_size"] == m.sp_vocab_size + (1 if opts.get("add_pad", True) else 0)
    assert cfg["num_key_value_heads"] == opts.get("n_kv_head", 2)

    tok = json.loads((m.path / "tokenizer_config.json").read_text())
    assert tok["add_bos_token"] is True and tok["add_eos_token"] is False
    assert tok.get("chat_template") == opts.get("chat_template")
    if opts.get("add_pad", True):
        assert m.pad_id == m.sp_vocab_size
        assert tok["pad_token"] == "[PAD]"
        assert tok["added_tokens_decoder"][str(m.pad_id)]["content"] == "[PAD]"
        assert json.loads((m.path / "added_tokens.json").read_text()) == {"[PAD]": m.pad_id}
    else:
        assert m.pad_id is None and str(m.sp_vocab_size) not in tok["added_tokens_decoder"]

    stored = read_safetensors_f32(m.path)
    assert stored.keys() == m.weights.keys()
    assert ("lm_head.weight" in stored) != opts.get("tie_embeddings", False)
    for name, shape in tinymodels.tensor_shapes(cfg).items():
        assert stored[name].shape == shape
        np.testing.assert_array_equal(stored[name], m.weights[name])  # exact: values as stored
    assert stored["model.embed_tokens.weight"].shape == (cfg["vocab_size"], cfg["hidden_size"])
    assert stored["model.layers.0.self_attn.k_proj.weight"].shape == (cfg["num_key_value_heads"] * 64, 256)


@pytest.mark.parametrize("dtype", ["F16", "F32"])
def test_safetensors_library_reads_our_files(tmp_path, dtype):
    from safetensors.numpy import load_file

    m = build_llama(tmp_path, dtype=dtype)
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert loaded["model.norm.weight"].dtype == np.dtype(dtype.lower().replace("f", "float"))
    for name, w in m.weights.items():
        np.testing.assert_array_equal(loaded[name].astype(np.float32), w)


def test_bf16_file_decodes_to_returned_values(tmp_path):
    m = build_llama(tmp_path, dtype="BF16")
    from safetensors import safe_open  # the library accepts our hand-written header

    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        assert set(f.keys()) == set(m.weights)
        assert f.metadata() == {"format": "pt"}
    raw = (tmp_path / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    stored = read_safetensors_f32(tmp_path)
    for name, w in m.weights.items():
        np.testing.assert_array_equal(stored[name], w)
        assert not (w.view(np.uint32) & 0xFFFF).any()  # really bf16-representable


def test_bf16_rounding_is_nearest_even():
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.0, 1 + 2**-8 + 2**-20], dtype=np.float32)
    assert tinymodels.f32_to_bf16_bits(x).tolist() == [0x3F80, 0x3F80, 0x3F82, 0xC000, 0x3F81]


@pytest.mark.parametrize("shards", [2, 3, 7])
def test_shard_index_covers_every_tensor_once(tmp_path, shards):
    m = build_llama(tmp_path, shards=shards, n_layer=3)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    assert set(wm) == set(m.weights)
    assert set(wm.values()) == {f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)}
    assert index["metadata"]["total_size"] == sum(w.size * 2 for w in m.weights.values())
    from safetensors import safe_open

    seen: list[str] = []
    for fname in sorted(set(wm.values())):
        with safe_open(str(tmp_path / fname), framework="numpy") as f:
            keys = list(f.keys())
        assert keys and all(wm[k] == fname for k in keys)
        seen += keys
    assert sorted(seen) == sorted(m.weights)


def test_bin_format(tmp_path):
    pytest.importorskip("torchbin_writer")
    m = build_llama(tmp_path, fmt="bin", shards=2)
    assert {p.name for p in tmp_path.iterdir()} == expected_files(fmt="bin", shards=2)
    index = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())
    assert set(index["weight_map"]) == set(m.weights)


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    a = build_llama(tmp_path / "a", seed=3)
    build_llama(tmp_path / "b", seed=3)
    c = build_llama(tmp_path / "c", seed=4)
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    assert not np.array_equal(a.weights["model.norm.weight"], c.weights["model.norm.weight"])
    assert (tmp_path / "a/tokenizer.model").read_bytes() == (tmp_path / "c/tokenizer.model").read_bytes()


def test_build_is_fast(tmp_path):
    tinymodels.sentencepiece_model_bytes(512)  # trained once per session anyway
    t = time.perf_counter()
    build_llama(tmp_path)
    assert time.perf_counter() - t < 1.0


# --------------------------------------------------------------------------- forward


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_llama(tmp_path_factory.mktemp("fw"), n_layer=2, seed=1)


IDS = [1, 300, 17, 45, 400, 260, 3, 99, 511, 2, 270, 280]


def test_forward_shape_and_spread(model):
    logits = numpy_llama.forward(model.weights, model.config, IDS)
    assert logits.shape == (len(IDS), model.config["vocab_size"]) and logits.dtype == np.float64
    assert np.isfinite(logits).all()
    assert 0.5 < logits.std() < 10  # not degenerate
    assert len(set(logits.argmax(-1).tolist())) > 3


def test_forward_is_causal(model):
    full = numpy_llama.forward(model.weights, model.config, IDS)
    for n in (1, 5, len(IDS) - 1):
        np.testing.assert_allclose(numpy_llama.forward(model.weights, model.config, IDS[:n]), full[:n], rtol=1e-12, atol=1e-12)
    changed = numpy_llama.forward(model.weights, model.config, IDS[:-1] + [7])
    np.testing.assert_allclose(changed[:-1], full[:-1], rtol=1e-12, atol=1e-12)
    assert not np.allclose(changed[-1], full[-1])


def _expand_kv(weights: dict, config: dict) -> tuple[dict, dict]:
    """The same model with every kv head repeated: n_kv_head == n_head (plain MHA)."""
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config["hidden_size"] // n_head
    out = dict(weights)
    for name, w in weights.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            out[name] = np.repeat(w.reshape(n_kv, hd, -1), n_head // n_kv, axis=0).reshape(n_head * hd, -1)
    return out, {**config, "num_key_value_heads": n_head}


def test_gqa_equals_mha_with_repeated_kv_heads(model):
    assert model.config["num_key_value_heads"] < model.config["num_attention_heads"]
    w2, cfg2 = _expand_kv(model.weights, model.config)
    np.testing.assert_allclose(
        numpy_llama.forward(w2, cfg2, IDS), numpy_llama.forward(model.weights, model.config, IDS), rtol=1e-10, atol=1e-10
    )


def test_mha_matches_naive_loop(tmp_path):
    """Vectorised attention vs a per-head, per-position loop (plain MHA, one layer)."""
    m = build_llama(tmp_path, n_layer=1, n_head=4, n_kv_head=4, hidden=64, intermediate=96, seed=2)
    w, cfg, ids = m.weights, m.config, IDS[:6]
    f = lambda n: w[n].astype(np.float64)  # noqa: E731
    eps, hd = cfg["rms_norm_eps"], 16
    x = f("model.embed_tokens.weight")[ids]
    h = x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * f("model.layers.0.input_layernorm.weight")
    q, k, v = (h @ f(f"model.layers.0.self_attn.{p}_proj.weight").T for p in "qkv")

    def rot(vec, pos):  # HF rotate_half on one head vector
        ang = pos * 10000.0 ** (-np.arange(0, hd, 2) / hd)
        c, s = np.concatenate([np.cos(ang)] * 2), np.concatenate([np.sin(ang)] * 2)
        return vec * c + np.concatenate([-vec[hd // 2 :], vec[: hd // 2]]) * s

    attn = np.zeros_like(q)
    for hh in range(4):
        sl = slice(hh * hd, (hh + 1) * hd)
        for i in range(len(ids)):
            sc = np.array([rot(q[i, sl], i) @ rot(k[j, sl], j) / np.sqrt(hd) for j in range(i + 1)])
            p = np.exp(sc - sc.max())
            attn[i, sl] = (p / p.sum()) @ v[: i + 1, sl]
    x = x + attn @ f("model.layers.0.self_attn.o_proj.weight").T
    h = x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * f("model.layers.0.post_attention_layernorm.weight")
    g = h @ f("model.layers.0.mlp.gate_proj.weight").T
    x = x + (g / (1 + np.exp(-g)) * (h @ f("model.layers.0.mlp.up_proj.weight").T)) @ f("model.layers.0.mlp.down_proj.weight").T
    x = x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * f("model.norm.weight")
    np.testing.assert_allclose(numpy_llama.forward(w, cfg, ids), x @ f("lm_head.weight").T, rtol=1e-10, atol=1e-10)


def test_permuted_qk_with_interleaved_rope_matches(model):
    """llama.cpp's q/k permute + interleaved rope == HF weights + rotate_half."""
    n_head, n_kv = model.config["num_attention_heads"], model.config["num_key_value_heads"]
    w2 = dict(model.weights)
    for name, w in model.weights.items():
        if name.endswith("q_proj.weight"):
            w2[name] = numpy_llama.permute_qk(w, n_head)
        elif name.endswith("k_proj.weight"):
            w2[name] = numpy_llama.permute_qk(w, n_kv)
    ref = numpy_llama.forward(model.weights, model.config, IDS)
    np.testing.assert_allclose(numpy_llama.forward(w2, model.config, IDS, rope="interleaved"), ref, rtol=1e-10, atol=1e-10)
    assert not np.allclose(numpy_llama.forward(w2, model.config, IDS), ref)  # layout matters


def test_tied_embeddings_use_embed_tokens(tmp_path):
    m = build_llama(tmp_path, tie_embeddings=True, n_layer=1)
    assert "lm_head.weight" not in m.weights
    x = numpy_llama.hidden_states(m.weights, m.config, IDS)
    np.testing.assert_allclose(
        numpy_llama.forward(m.weights, m.config, IDS), x @ m.weights["model.embed_tokens.weight"].astype(np.float64).T
    )


def test_greedy_matches_forward_argmax(model):
    out = numpy_llama.greedy(model.weights, model.config, IDS[:4], 3)
    assert out[0] == int(numpy_llama.forward(model.weights, model.config, IDS[:4])[-1].argmax())
    assert len(out) == 3

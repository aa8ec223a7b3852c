"""convert: exact against llama.cpp's own pipeline, loads, tokenizes and computes like the source."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

import numpy_llama
import reference
import tinymodels
from alpaca_local.cli.main import main
from alpaca_local.convert.pipeline import convert, plan_conversion
from alpaca_local.template import ALPACA_CHAT_TEMPLATE

QUANTS = ["f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m"]

# Model shapes that exercise llama.cpp's per-tensor rules: GQA + [PAD] (the
# default), 8 layers (use_more_bits picks some attn_v/ffn_down layers for Q6_K),
# rows that are not a multiple of 256 (K-quant fallbacks to Q5_0/Q5_1/Q8_0),
# shards, and a pytorch .bin checkpoint.
VARIANTS = {
    "gqa-pad": {},
    "8-layers-mha": {"n_layer": 8, "n_kv_head": 4, "shards": 3},
    "rows-320": {"hidden": 320, "n_head": 5, "n_kv_head": 1, "intermediate": 640},
    "bin": {"fmt": "bin", "shards": 2},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory) -> tuple[tinymodels.TinyLlama, Path]:
    work = tmp_path_factory.mktemp(request.param)
    model = tinymodels.build_llama(work / "model", **VARIANTS[request.param])
    return model, work


@pytest.mark.reference
@pytest.mark.parametrize("quant", QUANTS)
def test_tensors_equal_reference_pipeline(variant, quant):
    """For an f16 source every tensor (order, name, type, shape, data offset, bytes) equals
    llama.cpp's two-step route."""
    model, work = variant
    ref = reference.reference_file(model.path, work, quant)
    ours = convert(model.path, work / f"ours.{quant}.gguf", quant, force=True).output
    reference.assert_same_tensors(ours, ref)


def test_quantized_order_is_llama_cpp_order(tiny_model, tmp_path):
    """Quantized files list tensors as llama.cpp's quantize writes them: by layer, then name."""
    out = convert(tiny_model.path, tmp_path / "x.gguf", "q4_k_m").output
    names = [t.name for t in gguf.GGUFReader(out).tensors]
    assert names[:3] == ["output.weight", "output_norm.weight", "token_embd.weight"]
    assert names[3:] == sorted(names[3:], key=lambda n: (int(n.split(".")[1]), n))


def _kv(reader: gguf.GGUFReader, key: str):
    field = reader.fields[key]
    return field.contents()


def test_metadata(tiny_model, tiny_gguf_f16):
    r = gguf.GGUFReader(tiny_gguf_f16)
    cfg = tiny_model.config
    assert _kv(r, "general.architecture") == "llama"
    assert _kv(r, "general.name") == "tiny-llama"
    assert _kv(r, "general.size_label") == gguf.size_label(sum(tiny_model.weights[k].size for k in tiny_model.weights), 0, 0, 0)
    assert _kv(r, "llama.block_count") == cfg["num_hidden_layers"]
    assert _kv(r, "llama.context_length") == cfg["max_position_embeddings"]
    assert _kv(r, "llama.embedding_length") == cfg["hidden_size"]
    assert _kv(r, "llama.feed_forward_length") == cfg["intermediate_size"]
    assert _kv(r, "llama.attention.head_count") == cfg["num_attention_heads"]
    assert _kv(r, "llama.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert _kv(r, "llama.rope.dimension_count") == cfg["hidden_size"] // cfg["num_attention_heads"]
    assert _kv(r, "llama.rope.freq_base") == pytest.approx(cfg["rope_theta"])
    assert _kv(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg["rms_norm_eps"])
    assert _kv(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    tokens = _kv(r, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg["vocab_size"] == tiny_model.sp_vocab_size + 1
    assert tokens[tiny_model.pad_id] == "[PAD]"
    assert _kv(r, "tokenizer.ggml.padding_token_id") == tiny_model.pad_id
    assert _kv(r, "tokenizer.ggml.bos_token_id") == 1
    assert _kv(r, "tokenizer.ggml.eos_token_id") == 2
    assert _kv(r, "tokenizer.ggml.add_bos_token") is True
    types = _kv(r, "tokenizer.ggml.token_type")
    assert types[3] == gguf.TokenType.BYTE and types[1] == gguf.TokenType.CONTROL
    # No template in the source: the Stanford Alpaca one is embedded.
    assert _kv(r, "tokenizer.chat_template") == ALPACA_CHAT_TEMPLATE


def test_source_chat_template_is_kept(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    model = tinymodels.build_llama(tmp_path / "m", chat_template=template)
    out = convert(model.path, tmp_path / "m.gguf", "q8_0").output
    assert _kv(gguf.GGUFReader(out), "tokenizer.chat_template") == template


def _load(path: Path, n_ctx: int = 128, logits_all: bool = False):
    from alpaca_local.run.chat import load_llama  # the one loader: weights placed as users get them

    return load_llama(path, n_ctx, n_threads=2, logits_all=logits_all, seed=0)


def test_tokenization_matches_sentencepiece(tiny_model, tiny_gguf):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_model.path / "tokenizer.model"))
    llm = _load(tiny_gguf)
    for text in tinymodels.VARIED_CORPUS:
        expected = [sp.bos_id()] + sp.encode(text)
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == expected, repr(text)


# f16 weights computed in f32 by ggml against a float64 numpy forward of the very
# values stored: differences are accumulation order and f16 rounding of
# activations in ggml's matmuls (~1e-3 here); 0.02 is an order of magnitude above
# that and far below what a wrong permutation or swapped tensor gives (~1).
LOGIT_ATOL = 0.02


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
def test_logits_match_numpy_forward(tmp_path, dtype):
    model = tinymodels.build_llama(tmp_path / "m", dtype=dtype)
    out = convert(model.path, tmp_path / "m.gguf", "f16").output
    llm = _load(out, logits_all=True)
    ids = llm.tokenize("Below is an instruction. Say hello, llama! 123".encode(), add_bos=True)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float64)
    weights = model.weights
    if dtype != "F16":
        # The f16 file holds f16-rounded values of the f32/bf16 source.
        weights = {k: v.astype(np.float16).astype(np.float32) for k, v in weights.items()}
    want = numpy_llama.forward(weights, model.config, ids)
    assert np.abs(got - want).max() < LOGIT_ATOL
    # Same top token wherever the reference's top two are not within the tolerance.
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * LOGIT_ATOL
    assert (got.argmax(-1) == want.argmax(-1))[clear].all()


# RMS logit error relative to the logits' spread. Random tiny models amplify
# quantization error (no outlier structure, 256-wide rows, and llama.cpp also
# quantizes activations for the matmul); measured on this test's model and text with
# llama-cpp-python 0.3.36 on x86 (2 threads): q8_0 0.0273, q4_k_m 0.2586 (q5_k_m 0.143,
# q4_0 0.323). Bounds are ~1.5x those; a broken tensor gives ~1.0.
QUANT_REL_RMS = {"q8_0": 0.041, "q4_k_m": 0.39}


@pytest.mark.parametrize("quant", sorted(QUANT_REL_RMS))
def test_quantized_logits_stay_close(tiny_model, tmp_path, quant):
    """Quantized files load and compute close to the numpy forward of the source."""
    out = convert(tiny_model.path, tmp_path / "m.gguf", quant).output
    llm = _load(out, logits_all=True)
    ids = llm.tokenize(b"Hello world, this is a test", add_bos=True)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    want = numpy_llama.forward(tiny_model.weights, tiny_model.config, ids)
    rel_rms = np.sqrt(((got - want) ** 2).mean()) / want.std()
    assert rel_rms < QUANT_REL_RMS[quant]


def _weights_f16_cannot_hold(make_weights, dtype: str):
    """`tinymodels.make_weights` with rows of ffn_down that float16 cannot hold exactly:
    row 0 tiny (~4e-6: f16 subnormal, 2**-24 steps, keeps fewer bits than bf16's 8),
    row 1 huge (~4e5: past f16's 65504, inf). Rounded to `dtype` as stored."""

    def patched(config: dict, seed: int = 0, dtype: str = dtype) -> dict[str, np.ndarray]:
        weights = make_weights(config, seed=seed, dtype=dtype)
        w = weights["model.layers.0.mlp.down_proj.weight"].copy()
        w[0] *= 1e-4
        w[1] *= 1e7
        weights["model.layers.0.mlp.down_proj.weight"] = tinymodels.decode_dtype(tinymodels.encode_dtype(w, dtype), dtype)
        return weights

    return patched


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_full_precision_sources_quantize_from_full_precision(tmp_path, dtype, monkeypatch):
    """f32/bf16 sources are quantized from their own values, not from an f16 copy: the bytes equal
    gguf-py's Q8_0 of the source values (what `convert_hf_to_gguf.py --outtype q8_0` writes) and
    differ from the f16-first route (convert to f16, then quantize)."""
    monkeypatch.setattr(tinymodels, "make_weights", _weights_f16_cannot_hold(tinymodels.make_weights, dtype))
    model = tinymodels.build_llama(tmp_path / "m", dtype=dtype)
    out = convert(model.path, tmp_path / "m.gguf", "q8_0").output
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    got = np.asarray(tensors["blk.0.ffn_down.weight"].data).tobytes()
    src = model.weights["model.layers.0.mlp.down_proj.weight"].astype(np.float32)
    with np.errstate(over="ignore"):
        via_f16 = src.astype(np.float16).astype(np.float32)
    assert not np.array_equal(via_f16, src)  # the case can tell the two routes apart
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    assert got == gguf.quants.quantize(src, q8_0).tobytes()
    with np.errstate(invalid="ignore", over="ignore"):
        assert got != gguf.quants.quantize(via_f16, q8_0).tobytes()


def test_bin_and_safetensors_give_identical_files(tmp_path):
    a = tinymodels.build_llama(tmp_path / "st", fmt="safetensors")
    b = tinymodels.build_llama(tmp_path / "bin", fmt="bin", shards=2)
    ta = reference.tensor_table(convert(a.path, tmp_path / "a.gguf", "q4_0").output)
    tb = reference.tensor_table(convert(b.path, tmp_path / "b.gguf", "q4_0").output)
    assert ta == tb


def test_default_output_name(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["convert", str(tiny_model.path), "--quant", "q4_0", "--json"]) == 0
    assert (tmp_path / "models" / "tiny-llama.Q4_0.gguf").is_file()


def test_cli_summary_json(tiny_model, tmp_path, capsys):
    out = tmp_path / "o.gguf"
    assert main(["convert", str(tiny_model.path), "-o", str(out), "-q", "Q8_0", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["output"] == str(out)
    assert summary["quant"] == "q8_0"
    assert summary["size_bytes"] == out.stat().st_size
    assert summary["tensors"] == 2 + 1 + 9 * tiny_model.config["num_hidden_layers"]
    assert summary["peak_memory_bytes"] > 0


def test_plan_knows_sizes_before_writing(tiny_model, tmp_path):
    """The plan's tensor bytes are exactly what lands in the file after the header."""
    plan = plan_conversion(tiny_model.path, "q4_k_m")
    out = convert(tiny_model.path, tmp_path / "o.gguf", "q4_k_m", plan=plan).output
    r = gguf.GGUFReader(out)
    data_start = min(t.data_offset for t in r.tensors)
    assert out.stat().st_size - data_start == plan.tensor_bytes

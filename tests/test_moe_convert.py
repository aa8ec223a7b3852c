"""convert for mixture-of-experts models (Qwen3-MoE, Mixtral, Qwen2-MoE): exact against llama.cpp's
own pipeline at every level, tokenizes like the source tokenizer, computes like transformers, streams
its experts, and refuses broken expert configs and checkpoints in one line.

The checkpoints are written by transformers' own classes (tests/tinymoe.py: save_pretrained,
sharded, F16 and BF16)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import test_architectures as ta
import tinymoe
from helpers import cli, leftovers, one_line, write_config

from alpaca_local.convert import pipeline
from alpaca_local.convert.pipeline import convert, plan_conversion
from alpaca_local.source.tensors import TensorRef

QUANTS = ta.QUANTS

# As test_architectures.KNOWN_DIFFERENCES for the same tokenizers (Mistral's SentencePiece for Mixtral,
# Qwen3's BPE for the Qwen MoE models): the model name, the unnamed BPE pre-tokenizer, SentencePiece's
# added-token scores, and the quantization version the reference writes into f16 files.
_SP = {
    "tokenizer.ggml.scores": {i: (0.0, -1000.0) for i in range(10)},
    "tokenizer.ggml.token_type": {0: (gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL)},
    "tokenizer.ggml.unknown_token_id": (0, None),
}
_BPE = {"tokenizer.ggml.pre": ("qwen2", ta.UNNAMED_PRE)}
_NAMES = {"qwen3moe": "Tiny Qwen3Moe", "qwen3moe-f16": "Tiny Qwen3Moe F16", "mixtral": "Tiny Mixtral",
          "mixtral-bf16": "Tiny Mixtral Bf16", "qwen2moe": "Tiny Qwen2Moe"}


def _known(kind: str) -> dict:
    return {"general.name": (f"tiny-{kind}", _NAMES[kind]), "general.quantization_version": (None, gguf.GGML_QUANT_VERSION),
            **(_SP if kind.startswith("mixtral") else _BPE)}


@pytest.fixture(scope="module", params=tinymoe.ARCHS)
def moe_model(request, tmp_path_factory):
    work = tmp_path_factory.mktemp(request.param)
    return tinymoe.BUILDERS[request.param](work / f"tiny-{request.param}"), work


def _kind(model) -> str:
    return model.path.name.removeprefix("tiny-")


@pytest.mark.reference
@pytest.mark.parametrize("quant", QUANTS)
def test_tensors_equal_reference_pipeline(moe_model, quant):
    """Every tensor (order, name, type, shape, data offset, bytes) equals convert_hf_to_gguf.py +
    llama-quantize: the stacked experts, the routers, Mixtral's 8-expert type rules."""
    model, work = moe_model
    ref = ta._reference_file(model, work, quant)
    ours = convert(model.path, work / f"ours.{quant}.gguf", quant, force=True).output
    ta.reference.assert_same_tensors(ours, ref)


@pytest.mark.reference
def test_metadata_equals_reference(moe_model):
    """Every key (expert counts and widths, the "NxM" size label included) equals the reference's,
    except the differences pinned by value."""
    model, work = moe_model
    ref = ta._kv(ta._reference_file(model, work, "f16"))
    ours = ta._kv(convert(model.path, work / "ours.f16.gguf", "f16", force=True).output)
    assert ta._differences(ours, ref) == _known(_kind(model))


def _tensor(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    t = next(t for t in reader.tensors if t.name == name)
    return np.asarray(t.data).reshape([int(n) for n in reversed(t.shape)])


def test_experts_are_stacked_per_projection(moe_model):
    """Independently of the reference: ffn_{gate,up,down}_exps[e] is expert e's own matrix, the
    router and the expert keys are there, and no per-expert tensor is left."""
    model, work = moe_model
    cfg, kind = model.config, _kind(model)
    out = convert(model.path, work / "stack.f16.gguf", "f16", force=True).output
    reader = gguf.GGUFReader(out)
    arch = reader.fields["general.architecture"].contents()
    kv = ta._kv(out)
    n = cfg.get("num_local_experts", cfg.get("num_experts"))
    assert arch == {"mixtral": "llama", "qwen2moe": "qwen2moe"}.get(kind.split("-")[0], "qwen3moe")
    assert kv[f"{arch}.expert_count"] == n and kv[f"{arch}.expert_used_count"] == cfg["num_experts_per_tok"]
    if arch != "llama":
        assert kv[f"{arch}.expert_feed_forward_length"] == cfg["moe_intermediate_size"]
    names = {t.name for t in reader.tensors}
    assert not any("experts" in t for t in names)
    w = {"llama": ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3", "block_sparse_moe.experts.{e}.w2")}
    gate, up, down = w.get(arch, ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj"))
    for layer in range(cfg["num_hidden_layers"]):
        for gguf_name, hf in (("ffn_gate_exps", gate), ("ffn_up_exps", up), ("ffn_down_exps", down)):
            stacked = _tensor(reader, f"blk.{layer}.{gguf_name}.weight")
            assert stacked.shape[0] == n
            for e in range(n):
                source = model.weights[f"model.layers.{layer}.{hf.format(e=e)}.weight"]
                assert np.array_equal(stacked[e].astype(np.float32), source.astype(np.float16).astype(np.float32))
        router = "block_sparse_moe.gate" if arch == "llama" else "mlp.gate"
        assert np.array_equal(_tensor(reader, f"blk.{layer}.ffn_gate_inp.weight"),
                              model.weights[f"model.layers.{layer}.{router}.weight"])
    if arch == "qwen2moe":
        assert kv["qwen2moe.expert_shared_feed_forward_length"] == cfg["shared_expert_intermediate_size"]
        assert {"blk.1.ffn_gate_inp_shexp.weight", "blk.1.ffn_down_shexp.weight", "blk.1.attn_q.bias"} <= names


def test_tokenization_matches_source_tokenizer(moe_model):
    model, work = moe_model
    llm = ta._load(convert(model.path, work / "tok.q8_0.gguf", "q8_0", force=True).output)
    if model.tokenizer == "sentencepiece":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(model.path / "tokenizer.model"))
        expected = lambda text: [sp.bos_id()] + sp.encode(text)  # noqa: E731
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model.path, local_files_only=True)
        expected = lambda text: tok.encode(text, add_special_tokens=True)  # noqa: E731
    for text in ta.tinymodels.VARIED_CORPUS:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == expected(text), repr(text)
    if model.tokenizer == "bpe":
        text = ta.SPECIAL_TEXT["qwen3"]
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == expected(text)


# Measured max errors against transformers' float32 forward: 0.003-0.0075 on these models (f16 weights,
# activations rounded to f16 by ggml's CPU matmul). Stacking an expert in the wrong slot, swapping
# gate and up, or renormalising Qwen2-MoE's top-k weights moves them by 0.3 and more.
LOGIT_ATOL = 0.02


def test_logits_match_transformers(moe_model):
    model, work = moe_model
    llm = ta._load(convert(model.path, work / "logits.f16.gguf", "f16", force=True).output, logits_all=True)
    text = "Below is an instruction. Say hello, llama! 123 The quick brown fox jumps over the lazy dog"
    ids = llm.tokenize(text.encode(), add_bos=True)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float64)
    want = tinymoe.hf_logits(model.path, ids)
    assert np.abs(got - want).max() < LOGIT_ATOL
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * LOGIT_ATOL
    assert clear.mean() > 0.8 and (got.argmax(-1) == want.argmax(-1))[clear].all()


@pytest.mark.parametrize("level", ["f16", "q4_k_m"])
def test_planner_predicts_the_written_size(moe_model, level):
    from alpaca_local.convert.gguf_read import read_gguf_header
    from alpaca_local.plan import memory as plan

    model, work = moe_model
    shape = plan.shape_from_hf(model.path)
    out = convert(model.path, work / f"size.{level}.gguf", level, force=True).output
    assert plan.file_size(shape, level) == (out.stat().st_size, True)
    from_file = plan.shape_from_gguf(read_gguf_header(out))
    assert (from_file.n_expert, from_file.n_expert_used, from_file.expert_ff) == (
        shape.n_expert, shape.n_expert_used, shape.expert_ff)
    predicted = [(t.name, t.ggml_type, t.nbytes) for t in plan.tensors_for(from_file, "q8_0")]
    assert predicted == [(t.name, t.ggml_type, t.nbytes) for t in plan.tensors_for(shape, "q8_0")]


# ---------------------------------------------------------------------------------------
# Streaming: a layer's experts are never read whole
# ---------------------------------------------------------------------------------------


def test_experts_stream_in_file_order_a_chunk_at_a_time(tmp_path, monkeypatch):
    """Each read is at most one chunk of one expert matrix, and each file is read front to back
    (what a streamed Hub file needs), although the output stacks experts that lie apart."""
    model = tinymoe.build_qwen3moe(tmp_path / "m", shard="10MB", n_expert=8, moe_ff=256)
    reads: list[tuple[str, int, int]] = []
    real = TensorRef.read_raw_rows

    def spy(self, start, stop, anywhere=False):
        reads.append((str(self.path), self.offset + start * self.shape[-1] * 2, (stop - start) * self.shape[-1]))
        return real(self, start, stop, anywhere)

    monkeypatch.setattr(TensorRef, "read_raw_rows", spy)
    monkeypatch.setattr(pipeline, "CHUNK_ELEMENTS", 256 * 64)  # several chunks per expert matrix
    convert(model.path, tmp_path / "o.gguf", "q4_k_m")
    assert max(n for *_, n in reads) <= 256 * 64
    for path in {p for p, *_ in reads}:
        offsets = [o for p, o, _ in reads if p == path]
        assert offsets == sorted(offsets)
    expert_reads = [n for p, o, n in reads if n == 256 * 64]
    assert len(expert_reads) >= 2 * 3 * 8 * 2  # 2 layers x 3 projections x 8 experts x 2 chunks


# ---------------------------------------------------------------------------------------
# Hostile configs and checkpoints: one line each, nothing written
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3moe_src(tmp_path_factory):
    return tinymoe.build_qwen3moe(tmp_path_factory.mktemp("hostile") / "src", shard="10MB", n_layer=1)


@pytest.fixture
def broken(qwen3moe_src, tmp_path):
    """A fresh copy of the 1-layer Qwen3-MoE folder to break."""
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(qwen3moe_src.path, dst)
    return dst


def _convert_fails(capsys, tmp_path: Path, model: Path, *needles: str) -> str:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    rc, err = cli(capsys, "convert", str(model), "-o", str(out / "m.gguf"), "-q", "q4_k_m")
    line = one_line(rc, err, 1, *needles)
    assert leftovers(out) == []
    return line


@pytest.mark.parametrize("change, needles", [
    ({"num_experts": 0}, ("num_experts = 0", "at least 1 expert")),
    ({"num_experts_per_tok": 7}, ("num_experts_per_tok = 7", "6 experts", "from 1 to 6")),
    ({"num_experts_per_tok": 0}, ("num_experts_per_tok = 0",)),
    ({"num_experts": 5000}, ("num_experts = 5000", "between 0 and 1024")),
    ({"moe_intermediate_size": None}, ("moe_intermediate_size",)),
    ({"mlp_only_layers": [0]}, ("dense", "experts in every layer")),
    ({"decoder_sparse_step": 2}, ("decoder_sparse_step 2",)),
    ({"norm_topk_prob": False}, ("norm_topk_prob = False", "qwen3moe")),
])
def test_hostile_expert_config_is_one_line(broken, tmp_path, capsys, change, needles):
    write_config(broken, **change)
    _convert_fails(capsys, tmp_path, broken, *needles)


def _rewrite(model: Path, edit) -> None:
    """Apply `edit(tensors)` to the single safetensors file (the index, if any, follows)."""
    from safetensors.torch import load_file, save_file  # torch: numpy has no bfloat16

    files = sorted(model.glob("model*.safetensors"))
    assert len(files) == 1
    tensors = {k: v for k, v in load_file(str(files[0])).items()}
    edit(tensors)
    save_file(tensors, str(files[0]), metadata={"format": "pt"})
    index = model / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: files[0].name for k in tensors}
        index.write_text(json.dumps(data))


def test_missing_expert_is_one_line(broken, tmp_path, capsys):
    _rewrite(broken, lambda t: t.pop("model.layers.0.mlp.experts.3.up_proj.weight"))
    _convert_fails(capsys, tmp_path, broken, "layer 0 lacks expert 3's up_proj", "5 of 6")


def test_extra_expert_is_one_line(broken, tmp_path, capsys):
    def add(t):
        t["model.layers.0.mlp.experts.6.up_proj.weight"] = t["model.layers.0.mlp.experts.0.up_proj.weight"].clone()
    _rewrite(broken, add)
    _convert_fails(capsys, tmp_path, broken, "experts.6.up_proj", "expert 6", "6 experts")


def test_mismatched_expert_shape_is_one_line(broken, tmp_path, capsys):
    def shrink(t):
        t["model.layers.0.mlp.experts.2.down_proj.weight"] = t["model.layers.0.mlp.experts.2.down_proj.weight"][:, :64].clone()
    _rewrite(broken, shrink)
    _convert_fails(capsys, tmp_path, broken, "experts.2.down_proj", "[256, 64]", "expert 0's down_proj", "[256, 128]")


def test_experts_of_the_wrong_width_for_the_config_are_one_line(broken, tmp_path, capsys):
    write_config(broken, moe_intermediate_size=64)
    _convert_fails(capsys, tmp_path, broken, "experts.{0..5}.down_proj", "[6, 256, 128]", "[6, 256, 64]")


def test_gpt_oss_is_refused_with_the_reason(tmp_path, capsys):
    from transformers import GptOssConfig

    model = tmp_path / "gpt-oss"
    cfg = GptOssConfig(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)
    cfg.architectures = ["GptOssForCausalLM"]  # as the released config.json names it
    cfg.save_pretrained(model)
    _convert_fails(capsys, tmp_path, model, "GptOssForCausalLM is not supported yet", "MXFP4",
                   "convert_hf_to_gguf.py", "Qwen3MoeForCausalLM")

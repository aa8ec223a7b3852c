"""`imatrix`: the statistics we collect through llama.cpp's eval callback equal a numpy forward pass
that records the input of every weight matrix, and equal llama.cpp's own `llama-imatrix`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

import numpy_llama
from alpaca_local.convert.imatrix_file import read_imatrix
from alpaca_local.measure.imatrix import ImatrixRun, default_text

N_CTX, N_CHUNKS = 64, 3


def numpy_imatrix(weights: dict, config: dict, chunks: list[list[int]]) -> dict[str, tuple[np.ndarray, int]]:
    """GGUF weight name -> (sum over tokens of x**2 per input column, tokens), from a float64 forward
    pass (numpy_llama's) that records what each matrix multiplies."""
    eps = float(config.get("rms_norm_eps", 1e-6))
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config["hidden_size"] // n_head
    f64 = lambda name: np.asarray(weights[name], dtype=np.float64)  # noqa: E731
    out: dict[str, list] = {}

    def record(name: str, x: np.ndarray) -> None:
        sums, count = out.get(name, (0.0, 0))
        out[name] = (sums + (x * x).sum(axis=0), count + x.shape[0])

    for ids in chunks:
        n = len(ids)
        x = f64("model.embed_tokens.weight")[np.asarray(ids)]
        angles = numpy_llama.rope_angles(config, n, hd)
        for i in range(config["num_hidden_layers"]):
            p, b = f"model.layers.{i}.", f"blk.{i}."
            h = numpy_llama.rms_norm(x, f64(p + "input_layernorm.weight"), eps)
            for w in ("attn_q", "attn_k", "attn_v"):
                record(b + w + ".weight", h)
            q = numpy_llama.apply_rope((h @ f64(p + "self_attn.q_proj.weight").T).reshape(n, n_head, hd), angles)
            k = numpy_llama.apply_rope((h @ f64(p + "self_attn.k_proj.weight").T).reshape(n, n_kv, hd), angles)
            v = (h @ f64(p + "self_attn.v_proj.weight").T).reshape(n, n_kv, hd)
            k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
            scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
            scores = np.where(np.triu(np.ones((n, n), bool), 1)[None], -np.inf, scores)
            prob = np.exp(scores - scores.max(-1, keepdims=True))
            prob /= prob.sum(-1, keepdims=True)
            attn = np.einsum("hqk,khd->qhd", prob, v).reshape(n, n_head * hd)
            record(b + "attn_output.weight", attn)
            x = x + attn @ f64(p + "self_attn.o_proj.weight").T
            h = numpy_llama.rms_norm(x, f64(p + "post_attention_layernorm.weight"), eps)
            record(b + "ffn_gate.weight", h)
            record(b + "ffn_up.weight", h)
            act = numpy_llama.silu(h @ f64(p + "mlp.gate_proj.weight").T) * (h @ f64(p + "mlp.up_proj.weight").T)
            record(b + "ffn_down.weight", act)
            x = x + act @ f64(p + "mlp.down_proj.weight").T
    return out


def llama_imatrix(model: Path, tmp_path: Path):
    """llama.cpp's own llama-imatrix on `model` with our chunking: -c = -b = -ub (one sequence per decode)."""
    from llama_tools import llama_tool

    text = tmp_path / "calibration.txt"
    text.write_text(default_text(), encoding="utf-8")
    out = tmp_path / "ref.imatrix.gguf"
    cmd = [str(llama_tool("llama-imatrix")), "-m", str(model), "-f", str(text), "-o", str(out),
           "-c", str(N_CTX), "-b", str(N_CTX), "-ub", str(N_CTX), "--chunks", str(N_CHUNKS), "--no-ppl", "-t", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_imatrix(out)


def assert_same_statistics(ours, ref) -> None:
    assert set(ref.entries) == set(ours.entries)
    assert (ref.chunk_count, ref.chunk_size) == (ours.chunk_count, ours.chunk_size)
    for name, e in ref.entries.items():
        assert e.counts.tolist() == ours.entries[name].counts.tolist(), name
        np.testing.assert_allclose(ours.entries[name].sums, e.sums, rtol=2e-5, err_msg=name)


@pytest.fixture(scope="module")
def collected(tiny_model, tiny_gguf_f16):
    run = ImatrixRun(tiny_gguf_f16, N_CTX)
    try:
        chunks = run.chunks(default_text(), N_CHUNKS)
        run.run(chunks)
        return chunks, run.result(["calibration"])
    finally:
        run.close()


def test_every_weight_matmul_is_collected_with_its_token_count(tiny_model, collected):
    chunks, imatrix = collected
    n_layer = tiny_model.config["num_hidden_layers"]
    names = {f"blk.{i}.{w}.weight" for i in range(n_layer)
             for w in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(imatrix.entries) == names  # output.weight only with process_output, as llama-imatrix
    for e in imatrix.entries.values():
        assert e.counts.tolist() == [N_CHUNKS * N_CTX]
    assert (imatrix.chunk_count, imatrix.chunk_size) == (N_CHUNKS, N_CTX)
    assert all(c[0] == chunks[0][0] for c in chunks)  # every chunk starts with BOS


def test_sums_equal_a_numpy_forward_pass(tiny_model, collected):
    """llama.cpp runs the f16 weights with f16 dot products; float64 numpy agrees to about 2e-3
    (layer 0's attention inputs, which see no f16 matmul yet, to 4e-7)."""
    chunks, imatrix = collected
    want = numpy_imatrix(tiny_model.weights, tiny_model.config, chunks)
    assert set(want) == set(imatrix.entries)
    for name, (sums, count) in want.items():
        got = imatrix.entries[name]
        assert int(got.counts[0]) == count
        np.testing.assert_allclose(got.sums[0], sums, rtol=5e-3, err_msg=name)


@pytest.mark.integration
def test_equal_to_llama_imatrix(tiny_gguf_f16, collected, tmp_path):
    """llama.cpp's own tool, built from the vendored sources, on the same file, text and chunking
    (-b = -c: one sequence per decode, as ours; measured: 5e-6 apart. With llama-imatrix's default
    -b 2048 it packs many chunks per decode and the attention rounds differently: 1e-3.)"""
    _, ours = collected
    assert_same_statistics(ours, llama_imatrix(tiny_gguf_f16, tmp_path))


@pytest.mark.integration
@pytest.mark.reference
def test_llama_quantize_reads_our_file_and_agrees_with_convert(tiny_model, tiny_gguf_f16, collected, tmp_path):
    """`llama-quantize --imatrix OURS` on the reference converter's f16 writes the same tensors
    as `convert --imatrix OURS`: llama.cpp's own loader reads our imatrix file as we meant it."""
    import reference
    from llama_tools import llama_tool

    from alpaca_local.convert.imatrix_file import write_imatrix
    from alpaca_local.convert.pipeline import convert

    _, ours = collected
    imatrix = tmp_path / "ours.imatrix.gguf"
    write_imatrix(ours, imatrix)
    f16 = reference.reference_f16(tiny_model.path, tmp_path / "ref.F16.gguf")
    out = tmp_path / "ref.Q4_K_M.gguf"
    proc = subprocess.run([str(llama_tool("llama-quantize")), "--imatrix", str(imatrix), str(f16), str(out), "q4_k_m"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded 14 importance matrix entries" in proc.stdout + proc.stderr
    mine = convert(tiny_model.path, tmp_path / "ours.Q4_K_M.gguf", "q4_k_m", imatrix=imatrix).output
    assert reference.tensor_table(mine) == reference.tensor_table(out)


# -- mixture of experts: MUL_MAT_ID, one slice and one count per expert --------------------------

N_EXPERT, N_USED = 4, 2


def moe_gguf(dense: Path, out: Path) -> Path:
    """`dense` (a tiny llama f16 GGUF) with each layer's FFN replaced by 4 experts, 2 used per
    token (Mixtral's layout in llama.cpp: ffn_gate_inp, ffn_{gate,up,down}_exps)."""
    import gguf

    reader = gguf.GGUFReader(dense)
    writer = gguf.GGUFWriter(out, "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        writer.add_key_value(key, field.contents(), vtype,
                             sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    writer.add_expert_count(N_EXPERT)
    writer.add_expert_used_count(N_USED)
    rng = np.random.default_rng(5)
    for t in reader.tensors:
        values = np.asarray(t.data)
        if ".ffn_" not in t.name or t.name.endswith("ffn_norm.weight"):
            writer.add_tensor(t.name, values)
            continue
        if t.name.endswith("ffn_gate.weight"):
            layer = t.name.split(".")[1]
            n_ff, n_embd = values.shape
            writer.add_tensor(f"blk.{layer}.ffn_gate_inp.weight",
                              rng.standard_normal((N_EXPERT, n_embd), dtype=np.float32))
            for kind, shape in (("gate", (n_ff, n_embd)), ("up", (n_ff, n_embd)), ("down", (n_embd, n_ff))):
                w = rng.standard_normal((N_EXPERT, *shape), dtype=np.float32) / np.sqrt(shape[1])
                writer.add_tensor(f"blk.{layer}.ffn_{kind}_exps.weight", w.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def moe(tiny_gguf_f16, tmp_path_factory):
    path = moe_gguf(tiny_gguf_f16, tmp_path_factory.mktemp("moe") / "tiny-moe.F16.gguf")
    run = ImatrixRun(path, N_CTX)
    try:
        run.run(run.chunks(default_text(), N_CHUNKS))
        return path, run.result(["calibration"])
    finally:
        run.close()


def test_moe_experts_get_their_own_sums_and_counts(moe):
    _, imatrix = moe
    n_tokens = N_CHUNKS * N_CTX
    for layer in range(2):
        router = imatrix.entries[f"blk.{layer}.ffn_gate_inp.weight"]  # a plain MUL_MAT
        assert router.counts.tolist() == [n_tokens]
        for kind in ("gate", "up", "down"):
            e = imatrix.entries[f"blk.{layer}.ffn_{kind}_exps.weight"]
            assert e.sums.shape[0] == N_EXPERT and len(e.counts) == N_EXPERT
            assert int(e.counts.sum()) == n_tokens * N_USED  # every token goes to N_USED experts
        gate, up = (imatrix.entries[f"blk.{layer}.ffn_{k}_exps.weight"] for k in ("gate", "up"))
        np.testing.assert_array_equal(gate.sums, up.sums)  # same input rows, same routing


@pytest.mark.integration
def test_moe_equal_to_llama_imatrix(moe, tmp_path):
    path, ours = moe
    assert_same_statistics(ours, llama_imatrix(path, tmp_path))

"""The planner per architecture, as a spec: for Mistral, Llama 3 (tied, rope_freqs), Qwen2 (biases),
Qwen3 (q/k norms, tied), Gemma 2 (sliding window, key_length != hidden / heads, tied) and Gemma 3
(q/k norms, 5 sliding layers then a global one), llama.cpp's own reported
model / KV / compute / output buffers on the CPU against `plan`'s prediction."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import tinyarch

from alpaca_local.plan import memory as plan
from alpaca_local.convert.pipeline import convert

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_plan", ROOT / "benchmarks" / "plan.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

MiB = 1 << 20
LEVELS = ("f16", "q8_0", "q4_k_m")


def conversions(d: Path, builders: dict):
    """(arch, level) -> GGUF path of `builders[arch]`'s model in `d`, converted once each."""
    files: dict[tuple[str, str], Path] = {}

    def get(arch: str, level: str) -> Path:
        if (arch, level) not in files:
            src = d / f"hf-{arch}"
            if not (src / "config.json").exists():
                builders[arch](src)
            files[arch, level] = convert(src, d / f"{arch}.{level}.gguf", level).output
        return files[arch, level]

    return get


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(arch, level) -> GGUF path, converted once per module."""
    return conversions(tmp_path_factory.mktemp("archs"), tinyarch.BUILDERS)


def _assert_exact_and_close(r: dict, kv_cells: list[int], tolerance: float = 0.05) -> None:
    m, p = r["measured"], r["predicted"]
    assert r["model_size"] == r["tensor_bytes"]  # every tensor counted (biases, rope_freqs)
    assert r["other_buffers"] == []  # no AMX (or other) buffer the planner does not count
    for buffer, (got, predicted) in r["buffers"].items():  # CPU_Mapped and CPU_REPACK, as printed
        assert got == round(predicted, 2), buffer
    assert r["kv_cells"] == kv_cells  # each cache's cells, as llama.cpp logs them
    # KV: exact to the printed digits, per cache: each is rounded to 0.01 MiB in the log
    # (Gemma 3 at 1024 cells: 0.375 + 1.875 MiB print as 0.38 + 1.88).
    assert m["kv"] == pytest.approx(p["kv"], abs=0.006 * len(kv_cells))
    assert abs(r["total_error"]) <= tolerance


@pytest.mark.parametrize("n_ctx", [256, 1000, 2048])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("arch", tinyarch.ARCHS)
def test_prediction_matches_llama_cpp_per_architecture(converted, arch: str, level: str, n_ctx: int) -> None:
    path = converted(arch, level)
    r = bench.compare(path, n_ctx)
    shape = plan.shape_from_gguf(bench_header(path))
    cells = plan.padded_ctx(n_ctx)
    # Gemma 2/3: a base and a sliding-window cache; llama-cpp-python keeps swa_full = true: both full size.
    swa = {"gemma2": (4, 2), "gemma3": (4, 6), "gemma3mm": (4, 6)}.get(arch, (0, 0))
    _assert_exact_and_close(r, [cells, cells] if swa[0] else [cells])
    assert (shape.n_swa, shape.swa_pattern) == swa
    # The compute buffer is calibrated per moment of the graph; on these shapes it is exact.
    assert r["measured"]["compute"] == pytest.approx(r["predicted"]["compute"], abs=0.0001)


def bench_header(path: Path):
    from alpaca_local.convert.gguf_read import read_gguf_header

    return read_gguf_header(path)


def test_architecture_facts_reach_the_plan(converted) -> None:
    gemma = plan.shape_from_gguf(bench_header(converted("gemma2", "f16")))
    assert gemma.head_dim == 96 and gemma.n_kv_gqa == 2 * 96 and gemma.n_q == 4 * 96 != gemma.hidden
    assert gemma.tie_embeddings and [gemma.is_swa(i) for i in range(2)] == [True, False]
    llama3 = plan.shape_from_gguf(bench_header(converted("llama3", "f16")))
    assert llama3.tie_embeddings and llama3.rope_freqs
    qwen2 = plan.shape_from_gguf(bench_header(converted("qwen2", "f16")))
    assert not qwen2.tie_embeddings and qwen2.n_swa == 0  # use_sliding_window false: a plain cache
    assert any(t.name.endswith("attn_q.bias") for t in qwen2.file_tensors)
    gemma3 = plan.shape_from_gguf(bench_header(converted("gemma3", "f16")))
    assert [gemma3.is_swa(i) for i in range(6)] == [True] * 5 + [False]  # every 6th layer global
    norms = [t for t in gemma3.file_tensors if t.name.endswith(("attn_q_norm.weight", "attn_k_norm.weight"))]
    assert len(norms) == 2 * 6 and {t.shape for t in norms} == {(96,)}
    qwen3 = plan.shape_from_gguf(bench_header(converted("qwen3", "f16")))
    assert qwen3.tie_embeddings and qwen3.n_swa == 0 and qwen3.n_q == 4 * 96 != qwen3.hidden
    assert sum(t.name.endswith("attn_k_norm.weight") for t in qwen3.file_tensors) == 2


@pytest.mark.parametrize("n_ctx, n_batch", [(1000, 512), (2048, 512), (4096, 128)])
def test_gemma2_without_swa_full_caches_window_plus_ubatch(tmp_path: Path, monkeypatch, n_ctx: int,
                                                            n_batch: int) -> None:
    # swa_full=False: the sliding-window layers keep GGML_PAD(min(kv_size, n_swa + n_ubatch), 256)
    # cells (llama-kv-cache-iswa.cpp:69-78). Three layers, so the SWA mask is still alive at a
    # full-attention layer, as in every real Gemma 2 (26+ layers). With two layers it dies before
    # the only full layer and the compute prediction is conservative (up to +10%).
    base = tinyarch._base_config
    monkeypatch.setattr(tinyarch, "_base_config", lambda *a, **kw: {**base(*a, **kw), "num_hidden_layers": 3})
    src = tinyarch.build_gemma2(tmp_path / "hf", sliding_window=64).path
    path = convert(src, tmp_path / "g.q8_0.gguf", "q8_0").output
    r = bench.compare(path, n_ctx, n_batch=n_batch, swa_full=False)
    swa = plan.swa_cells(plan.shape_from_gguf(bench_header(path)), n_ctx, n_batch, swa_full=False)
    assert swa == plan._pad(min(plan.padded_ctx(n_ctx), 64 + n_batch), 256) < plan.padded_ctx(n_ctx)
    _assert_exact_and_close(r, [plan.padded_ctx(n_ctx), swa])
    assert r["measured"]["compute"] == pytest.approx(r["predicted"]["compute"], abs=0.0001)


# -- a 256000-token vocabulary (Gemma) -----------------------------------------------------

GEMMA2_2B = plan.ModelShape(name="gemma-2-2b", arch="gemma2", n_layer=26, hidden=2304, n_head=8, n_kv_head=4,
                            head_dim=256, intermediate=9216, vocab_size=256000, n_ctx=8192, tie_embeddings=True,
                            source="catalog",
                            n_swa=4096, swa_pattern=2)


def test_large_vocab_compute_buffer_is_the_logits() -> None:
    # With 256000 tokens the output moment (logits f32 [n_vocab, n_tokens] + 3 widths of n_embd)
    # outweighs attention and the FFN at a 2048 context: 4 x 512 x (256000 + 3 x 2304 + 5) bytes.
    s = plan.RunSettings(n_ctx=2048, backend="cpu")
    assert plan.compute_bytes(GEMMA2_2B, s) == 4 * 512 * (256000 + 3 * 2304 + 5)
    assert plan.compute_bytes(GEMMA2_2B, plan.RunSettings(n_ctx=256, backend="cpu")) == 4 * 256 * (256000 + 6917)
    assert plan.output_bytes(GEMMA2_2B) == 4 * 256000  # one row of logits for chat


def test_gemma2_2b_kv_cache_per_layer_kind() -> None:
    # 26 layers, 13 sliding; K and V of 4 x 256 per cell in f16.
    row = 4 * 256 * 2
    assert plan.kv_bytes(GEMMA2_2B, 8192, "f16") == 2 * 26 * 8192 * row  # swa_full (the default)
    assert plan.kv_bytes(GEMMA2_2B, 8192, "f16", swa_full=False) == 2 * (13 * 8192 + 13 * 4608) * row
    # Partial offload takes the last layers: layer 25 is full, layer 24 sliding.
    assert plan.kv_bytes(GEMMA2_2B, 8192, "f16", 2, swa_full=False) == 2 * (8192 + 4608) * row
    assert plan.kv_bytes(GEMMA2_2B, 2048, "f16", swa_full=False) == 2 * 26 * 2048 * row  # window > context


def test_large_vocab_compute_buffer_matches_llama_cpp(tmp_path: Path) -> None:
    # A real load of a 256000-token vocabulary: a sparse file (header, then a hole), 2 layers.
    shape = plan.ModelShape(name="v", arch="llama", n_layer=2, hidden=256, n_head=4, n_kv_head=2, head_dim=64,
                            intermediate=512, vocab_size=256000, n_ctx=8192, tie_embeddings=False, source="catalog")
    path = bench.write_sparse_gguf(tmp_path / "v.q8_0.gguf", shape, "q8_0")
    r = bench.compare(path, 1000)
    assert r["measured"]["kv"] == round(r["predicted"]["kv"], 2)
    assert r["measured"]["compute"] == pytest.approx(r["predicted"]["compute"], rel=0.001)  # 501.50 MiB
    assert r["measured"]["output"] == round(r["predicted"]["output"], 2)
    assert abs(r["total_error"]) <= 0.01

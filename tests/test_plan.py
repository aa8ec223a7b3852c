"""The VRAM planner, as a spec: exact file sizes, llama.cpp's own buffer sizes, the 8 GB answer,
offload rules, and one-line failures."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from alpaca_local.plan import catalog
from alpaca_local.plan import gpu
from alpaca_local.plan import memory as plan
from alpaca_local.cli.main import main
from alpaca_local.convert.pipeline import convert
from alpaca_local.convert.gguf_read import read_gguf_header

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_plan", ROOT / "benchmarks" / "plan.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

GiB, MiB = 1 << 30, 1 << 20
ALPACA = plan.shape_from_config(catalog.load("alpaca-7b"), "alpaca-7b", "catalog")


# -- file sizes: prediction == what convert writes -------------------------------------


# The default ladder and a few more in the fast suite, every level in the integration one.
_SIZED = ("q4_k_s", "iq4_nl", "q2_k", "q5_1", "tq1_0", "bf16", "f32")
_ALL_LEVELS = [lv for lv in plan.quant_levels.LADDER if lv in plan.quant_rules.QUANTS]
SIZE_LEVELS = [lv if lv in plan.LEVELS + _SIZED else pytest.param(lv, marks=pytest.mark.integration)
               for lv in _ALL_LEVELS]


@pytest.mark.parametrize("level", SIZE_LEVELS)
def test_predicted_file_size_equals_converted_file(tiny_model, tmp_path: Path, level: str) -> None:
    # Whole file: the header size is predicted from the same gguf-py writer state convert uses.
    shape = plan.load_shape(str(tiny_model.path))
    size, exact = plan.file_size(shape, level)
    imatrix = None
    if plan.needs_imatrix(shape, level):  # made with an imatrix: its keys are the one unknown
        from test_imatrix_convert import synthetic_imatrix

        from alpaca_local.convert.imatrix_file import write_imatrix

        imatrix = tmp_path / "i.gguf"
        write_imatrix(synthetic_imatrix(convert(tiny_model.path, tmp_path / "f16.gguf", "f16").output), imatrix)
    out = convert(tiny_model.path, tmp_path / f"m.{level}.gguf", level, imatrix=imatrix).output
    header = read_gguf_header(out)
    if imatrix is None:
        assert exact and size == out.stat().st_size
    else:
        data = out.stat().st_size - header.data_offset
        assert not exact and size - dict(shape.header_bytes)[level] == data
    written = plan.shape_from_gguf(header)
    # Per tensor; the file's order is llama.cpp's (checked against it in the exactness tests).
    assert sorted((t.name, t.ggml_type, t.nbytes) for t in plan.tensors_for(shape, level)) == \
        sorted((t.name, t.ggml_type, t.nbytes) for t in written.file_tensors)


def test_catalog_7b_file_sizes_match_the_known_table() -> None:
    # User-known 7B sizes (GB = 1e9): Q4_0 3.8, Q4_K_M 4.1, Q5_K_M 4.8, Q8_0 7.2, F16 13.5.
    known = {"q4_0": 3.8, "q4_k_m": 4.1, "q5_k_m": 4.8, "q8_0": 7.2, "f16": 13.5}
    for level, gb in known.items():
        assert plan.file_size(ALPACA, level)[0] / 1e9 == pytest.approx(gb, abs=0.06)


# -- memory components -------------------------------------------------------------------


@pytest.mark.parametrize("n_ctx, cache, expected", [
    (2048, "f16", 1 * GiB),  # 2048 x 32 layers x 2 x 4096 x 2 bytes
    (2048, "q8_0", 2048 * 32 * 2 * 4096 * 34 // 32),
    (2048, "q4_0", 2048 * 32 * 2 * 4096 * 18 // 32),
    (1000, "f16", 1024 * 32 * 2 * 4096 * 2),  # padded to 256 cells
    (1, "f16", 256 * 32 * 2 * 4096 * 2),
])
def test_kv_cache_formula(n_ctx: int, cache: str, expected: int) -> None:
    assert plan.kv_bytes(ALPACA, n_ctx, cache) == expected


def test_gqa_shrinks_kv() -> None:
    gqa = plan.ModelShape(name="g", arch="llama", n_layer=32, hidden=4096, n_head=32, n_kv_head=8, head_dim=128,
                          intermediate=14336, vocab_size=32000, n_ctx=8192, tie_embeddings=False, source="catalog")
    assert plan.kv_bytes(gqa, 2048, "f16") == plan.kv_bytes(ALPACA, 2048, "f16") // 4


def test_partial_offload_puts_output_layer_first_and_token_embd_never() -> None:
    tensors = plan.tensors_for(ALPACA, "q4_k_m")
    by_name = {t.name: t for t in tensors}
    gpu1, _, _ = plan.weights_split(tensors, ALPACA, 1, "metal")
    assert gpu1 == sum(plan._pad(by_name[n].nbytes, 32) for n in ("output.weight", "output_norm.weight"))
    full_gpu, full_cpu, _ = plan.weights_split(tensors, ALPACA, 33, "metal")
    assert full_cpu == by_name["token_embd.weight"].nbytes
    assert plan.weights_split(tensors, ALPACA, 0, "cuda")[0] == 0
    per_layer = [plan.weights_split(tensors, ALPACA, n, "cuda")[0] for n in range(34)]
    assert per_layer == sorted(per_layer)


def test_safety_margin_is_5_percent_but_at_least_256_mib() -> None:
    # Values, not the formula again: `plan --vram 8` keeps 0.40 GiB back; 1 GiB keeps the 256 MiB
    # floor; at 5 GiB both rules give 256 MiB.
    assert plan.usable(8 * GiB) == 8_160_437_863  # 8 GiB - 429_496_729 (5%, rounded down)
    assert plan.usable(1 * GiB) == 768 * MiB
    assert plan.usable(5 * GiB) == 5 * GiB - 256 * MiB
    assert plan.usable(6 * GiB) == 6 * GiB - int(0.3 * GiB)
    assert plan.OVERHEAD == {"cuda": plan.CUDA_OVERHEAD, "metal": plan.METAL_OVERHEAD, "cpu": plan.CPU_OVERHEAD}


def test_7b_compute_buffer_matches_llama_cpp_at_2048() -> None:
    # llama.cpp 0.3.36 reports "CPU compute buffer size is 188.0098 MiB" for a 7B at n_ctx 2048
    # (benchmarks/plan.py, sparse 7B file).
    s = plan.RunSettings(n_ctx=2048, backend="cpu")
    assert round(plan.compute_bytes(ALPACA, s) / MiB, 4) == 188.0098


# -- CPU_REPACK: ggml-cpu's interleaved copies of some weight types ------------------------

X86_AVX2 = plan.CpuFeatures(("avx2",), "test")
ARM_DOTPROD = plan.CpuFeatures(("dotprod",), "test")
T = plan.T


@pytest.mark.parametrize("text, features", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n", ("avx2", "avx512f")),
    ("flags\t\t: fpu sse2 avx\n", ()),  # no AVX2: nothing is repacked
    ("Features\t: fp asimd evtstrm aes crc32 atomics fphp asimdhp asimddp i8mm sve\n", ("dotprod", "i8mm")),
    ("garbage", ()),
])
def test_cpu_features_from_cpuinfo(text: str, features: tuple[str, ...]) -> None:
    assert plan.parse_cpuinfo(text) == features


@pytest.mark.parametrize("cpu, ggml_type, rows, repacked", [
    (X86_AVX2, T.Q4_0, 4096, True),   # repack.cpp:4975 Q4_0 -> q4_0x8 when ne[1] % 8 == 0
    (X86_AVX2, T.Q4_0, 804, False),   # 804 rows: not a multiple of 8
    (X86_AVX2, T.Q4_K, 11008, True),  # :5007 Q4_K -> q4_Kx8
    (X86_AVX2, T.Q6_K, 4096, False),  # Q5_K / Q6_K / Q8_0 repack only on ARM
    (X86_AVX2, T.Q8_0, 4096, False),
    (X86_AVX2, T.F16, 4096, False),
    (ARM_DOTPROD, T.Q4_0, 804, True),  # :4985 NEON dotprod: 4x4, rows % 4
    (ARM_DOTPROD, T.Q6_K, 4096, True),
    (ARM_DOTPROD, T.Q8_0, 4096, True),
    (plan.NO_REPACK, T.Q4_0, 4096, False),
])
def test_repack_rule(cpu: plan.CpuFeatures, ggml_type, rows: int, repacked: bool) -> None:
    t = plan.PlannedTensor("blk.0.ffn_gate.weight", (rows, 4096), ggml_type, 0)
    assert plan.is_repacked(t, cpu.repack_rows) is repacked
    # token_embd is read with GET_ROWS, which CPU_REPACK does not support (repack.cpp:5191)
    assert not plan.is_repacked(replace_name(t, "token_embd.weight"), cpu.repack_rows)


def replace_name(t: plan.PlannedTensor, name: str) -> plan.PlannedTensor:
    return plan.PlannedTensor(name, t.shape, t.ggml_type, t.nbytes)


def test_7b_q4_0_on_cpu_adds_every_q4_0_matrix_but_token_embd() -> None:
    s = plan.RunSettings(backend="cpu", cpu=X86_AVX2)
    p = plan.plan_level(ALPACA, "q4_0", s)
    q4 = [t for t in plan.tensors_for(ALPACA, "q4_0") if t.ggml_type == T.Q4_0 and t.name != "token_embd.weight"]
    assert len(q4) == 32 * 7 and p.repack == sum(plan._pad(t.nbytes, plan.TENSOR_ALIGNMENT) for t in q4)
    # The copies come on top of the mapped span, which loses only the repacked tensors at its end
    # (get_mapping_range: first to last tensor still mapped); the 7B layout ends in blk.31's matrices.
    mapped_only = plan.plan_level(ALPACA, "q4_0", plan.RunSettings(backend="cpu", cpu=plan.NO_REPACK))
    tail = mapped_only.weights_cpu - (p.weights_cpu - p.repack)
    assert mapped_only.repack == 0 and p.weights_cpu == p.weights_gpu and 0 < tail < p.repack // 100
    assert plan.plan_level(ALPACA, "q8_0", s).repack == 0 and plan.plan_level(ALPACA, "q4_k_m", s).repack > 0


def test_no_repack_on_cuda_and_only_cpu_layers_on_metal() -> None:
    # CUDA: its host buffer type comes first and becomes plain CPU under mmap (llama-model-loader.cpp).
    assert plan.plan_level(ALPACA, "q4_0", plan.RunSettings(backend="cuda", cpu=X86_AVX2), 10).repack == 0
    metal = [plan.plan_level(ALPACA, "q4_k_m", plan.RunSettings(backend="metal", cpu=ARM_DOTPROD), n).repack
             for n in (0, 1, 2, 17, 33)]
    assert metal[1] > metal[2] > metal[3] > metal[4] == 0  # fewer CPU layers, less repacked
    assert metal[0] == metal[1]  # the Q6_K output has 32001 rows, not a multiple of 8: never repacked


def test_tied_output_is_repacked_as_a_second_tensor() -> None:
    # token_embd stays mapped (GET_ROWS); the tied output is a duplicate used by MUL_MAT.
    tied = plan.ModelShape(name="t", arch="llama", n_layer=2, hidden=256, n_head=4, n_kv_head=4, head_dim=64,
                           intermediate=512, vocab_size=1000, n_ctx=2048, tie_embeddings=True, source="catalog")
    embd = plan.PlannedTensor("token_embd.weight", (1000, 256), T.Q6_K, 1000 * 210)
    _, mapped, repack = plan.weights_split((embd,), tied, 0, "cpu", ARM_DOTPROD.repack_rows)
    assert mapped == embd.nbytes and repack == plan._pad(embd.nbytes, plan.TENSOR_ALIGNMENT)
    assert plan.weights_split((embd,), tied, 0, "cpu", X86_AVX2.repack_rows)[2] == 0  # Q6_K: ARM only


# -- accuracy against llama.cpp itself (CPU) ---------------------------------------------

SHAPES = [
    dict(hidden=256, n_layer=2, n_head=4, n_kv_head=2, intermediate=512),
    dict(hidden=384, n_layer=4, n_head=6, n_kv_head=2, intermediate=1536),
    dict(hidden=512, n_layer=3, n_head=8, n_kv_head=8, intermediate=1024),
]


@pytest.fixture(scope="module", params=range(len(SHAPES)), ids=["gqa-256", "gqa-384", "mha-512"])
def shaped_hf(request, tmp_path_factory) -> Path:
    import tinymodels

    d = tmp_path_factory.mktemp("shape")
    return tinymodels.build_llama(d / "hf", **SHAPES[request.param]).path


def _assert_model_buffers_exact(r: dict) -> None:
    m, p = r["measured"], r["predicted"]
    assert r["model_size"] == r["tensor_bytes"]  # model bytes: exact
    assert r["other_buffers"] == []  # no AMX (or other) buffer the planner does not count
    for buffer, (got, predicted) in r["buffers"].items():  # CPU_Mapped and CPU_REPACK
        assert got == round(predicted, 2), buffer  # as llama.cpp prints them
    assert r["repacked"] == (r["buffers"]["repack"][1] > 0)
    assert m["model"] == pytest.approx(p["model"], abs=0.01)


@pytest.mark.parametrize("level, n_ctx", [("q8_0", 1000), ("q8_0", 2048), ("q4_k_m", 2048), ("q4_0", 1000)])
def test_prediction_matches_llama_cpp(shaped_hf: Path, tmp_path: Path, level: str, n_ctx: int) -> None:
    r = bench.compare(convert(shaped_hf, tmp_path / f"m.{level}.gguf", level).output, n_ctx)
    _assert_model_buffers_exact(r)
    assert r["measured"]["kv"] == round(r["predicted"]["kv"], 2)  # KV bytes: exact to the printed digits
    # The compute term on its own: llama.cpp prints it to 4 decimals (e.g. 13.0098 MiB) and we match them.
    assert r["measured"]["compute"] == round(r["predicted"]["compute"], 4)
    # Measured |total error| at most 3.5e-4 over these 12 cases (benchmarks/plan.py); bound ~1.5x that.
    assert abs(r["total_error"]) <= 5.5e-4


def test_repack_skips_rows_not_a_multiple_of_the_interleave(tmp_path: Path) -> None:
    # 804-row ffn_gate/ffn_up: x86 repacks Q4_0 only when rows % 8 == 0 (ARM: % 4).
    import tinymodels

    src = tinymodels.build_llama(tmp_path / "hf", hidden=256, n_layer=2, n_head=4, n_kv_head=4, intermediate=804).path
    r = bench.compare(convert(src, tmp_path / "m.q4_0.gguf", "q4_0").output, 1000)
    _assert_model_buffers_exact(r)
    assert abs(r["total_error"]) <= 0.05


def test_quantized_cache_prediction_within_tolerance(shaped_hf: Path, tmp_path: Path) -> None:
    r = bench.compare(convert(shaped_hf, tmp_path / "m.q4_k_m.gguf", "q4_k_m").output, 2048, cache="q8_0")
    _assert_model_buffers_exact(r)
    assert r["measured"]["kv"] == round(r["predicted"]["kv"], 2)
    # The flash-attention compute buffer is an estimate, on the safe side: measured +0.6% to +1.2%
    # (6.5449 MiB measured, 6.625 predicted on gqa-256), total +0.3% to +1.0%; bounds ~1.5x those.
    compute_error = r["predicted"]["compute"] / r["measured"]["compute"] - 1
    assert 0 <= compute_error <= 0.0185
    assert 0 <= r["total_error"] <= 0.015


# -- the command ---------------------------------------------------------------------------


def _json(capsys, *argv: str) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_vram_8_recommends_a_level_that_fits(capsys) -> None:
    out = _json(capsys, "--vram", "8")
    rec = out["recommendation"]
    assert rec["level"] == "q6_k" and rec["full_offload"]  # 6.9 GiB: the best of the ladder that fits
    assert rec["gpu_bytes"] <= out["device"]["usable_bytes"] < 8 * GiB
    rows = {r["level"]: r for r in out["levels"]}
    assert list(rows) == list(plan.LEVELS)
    assert not rows["f16"]["fits"] and not rows["q8_0"]["fits"] and rows["q4_k_m"]["fits"]
    # The user-known VRAM table at 2048 context: F16 14.5, Q8_0 8.0 do not fit 8 GB; Q4_K_M ~5 does.
    # Measured by nvidia-smi on an H200 (benchmarks/gpu-h200.json): 5737 MiB = 6.02 GB, of which
    # 712 MiB CUDA context and pools; the plan's CUDA_OVERHEAD is that measurement.
    assert 5.0 <= rows["q4_k_m"]["total_bytes"] / 1e9 <= 6.2
    assert abs(rows["q4_k_m"]["total_bytes"] - 5737 * 2**20) < 0.01 * 5737 * 2**20


def test_table_says_why(capsys) -> None:
    assert main(["plan", "--vram", "8"]) == 0
    text = capsys.readouterr().out
    assert "recommended: q6_k" in text and "fits" in text and "iq2_m*" in text and "importance matrix" in text


def test_json_is_stable(capsys) -> None:
    out = _json(capsys, "llama-7b", "--vram", "24", "--ctx", "4096", "--cache-type", "q8_0")
    assert set(out) == {"model", "device", "settings", "levels", "recommendation", "ram"}
    assert set(out["levels"][0]) == {
        "level", "file_bytes", "file_bytes_exact", "weights_gpu_bytes", "weights_cpu_bytes", "repack_bytes", "kv_bytes",
        "compute_bytes", "output_bytes", "overhead_bytes", "total_bytes", "fits", "max_ctx", "max_gpu_layers",
        "n_cpu_moe", "ram_bytes", "needs_imatrix", "mix", "target_bytes"}
    assert out["levels"][0]["n_cpu_moe"] == out["recommendation"]["n_cpu_moe"] == 0  # a dense model
    assert out["settings"]["flash_attn"] and out["model"]["vocab"] == 32000
    assert out["recommendation"]["level"] == "f16"


def test_small_gpu_gets_an_offload_split(capsys) -> None:
    rec = _json(capsys, "--vram", "3")["recommendation"]
    assert not rec["full_offload"] and 0 < rec["n_gpu_layers"] < 33 and rec["cpu_bytes"] > 0


def test_ctx_max_grows_as_quality_drops(capsys) -> None:
    rows = _json(capsys, "--vram", "6", "--ctx", "max")["levels"]
    ctx = [r["max_ctx"] for r in rows]
    assert ctx == sorted(ctx) and ctx[-1] == 2048 and ctx[0] == 0
    assert all(r["fits"] for r in rows if r["max_ctx"])


def test_gguf_input_uses_its_own_tensor_table(capsys, tiny_gguf: Path) -> None:
    out = _json(capsys, str(tiny_gguf), "--vram", "1")
    rows = {r["level"]: r for r in out["levels"]}
    assert rows["q8_0"]["file_bytes"] == tiny_gguf.stat().st_size and rows["q8_0"]["file_bytes_exact"]


def test_a_target_file_is_planned_as_a_mix_from_its_own_tensors(tiny_model, tmp_path: Path, capsys) -> None:
    """A `convert --target-size` file: `plan` names it a mix, not the level its file type says, and
    sizes it from its own tensors: the file's bytes, and llama.cpp's model buffers, exactly."""
    import gguf

    out = tmp_path / "mix.gguf"
    assert main(["convert", str(tiny_model.path), "--target-size", "900K", "-o", str(out), "--json"]) == 0
    capsys.readouterr()
    reader = gguf.GGUFReader(out)
    level = plan.quant_rules.level_of_file_type(int(reader.fields["general.file_type"].contents()))
    report = _json(capsys, str(out), "--vram", "1", "--levels", "q8_0")
    rows = {r["level"]: r for r in report["levels"]}
    assert set(rows) == {"q8_0", level}
    mix = rows[level]
    assert mix["mix"] and mix["target_bytes"] == 900_000 and not rows["q8_0"]["mix"]
    assert mix["file_bytes"] == out.stat().st_size and mix["file_bytes_exact"]
    data = sum(plan._pad(int(t.n_bytes), plan.GGUF_ALIGNMENT) for t in reader.tensors)
    assert mix["file_bytes"] - data == reader.tensors[0].data_offset  # the header, then the file's own tensors
    r = bench.compare(out, 1000)
    assert r["tensor_bytes"] == sum(int(t.n_bytes) for t in reader.tensors)
    _assert_model_buffers_exact(r)  # llama.cpp's CPU buffers for this file, to the byte it prints
    assert main(["plan", str(out), "--vram", "1", "--levels", "q8_0"]) == 0
    text = capsys.readouterr().out
    assert "target 900K" in text and "per-tensor mix" in text
    assert not [line for line in text.splitlines() if line.lstrip("│ ").startswith(f"{level} ")]


@pytest.mark.parametrize("argv, code, message", [
    (["no-such-model"], 2, "known names: alpaca-7b, llama-7b"),
    (["--vram", "-1"], 2, "--vram -1 is out of range"),
    (["--vram", "100000"], 2, "out of range"),
    (["--ctx", "0"], 2, "context 0 is out of range"),
    (["--ctx", "99999999999"], 2, "out of range"),
    (["--ctx", "lots"], 2, "not a number or 'max'"),
    (["--cache-type", "q5_1"], 2, "unknown cache type"),
    (["--batch", "0"], 2, "batch 0"),
])
def test_bad_arguments_one_line(capsys, argv: list[str], code: int, message: str) -> None:
    assert main(["plan", *argv, "--vram", "8"] if "--vram" not in argv else ["plan", *argv]) == code
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


@pytest.mark.parametrize("content", [b"not a model", b"GGUF\x03\0\0\0" + b"\xff" * 16])
def test_bad_files_exit_1(capsys, tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    assert main(["plan", str(path), "--vram", "8"]) == 1
    assert "\n" not in capsys.readouterr().err.strip()


def test_7b_header_plans_within_half_a_second(tmp_path: Path) -> None:
    path = bench.write_sparse_gguf(tmp_path / "a.gguf", ALPACA, "q4_k_m")
    assert path.stat().st_size > 4e9 and path.stat().st_blocks * 512 < 50e6  # sparse
    t0 = time.process_time()
    shape = plan.load_shape(str(path))
    plans = {lv: plan.plan_level(shape, lv, plan.RunSettings()) for lv in plan.LEVELS}
    plan.recommend(shape, plans, plan.RunSettings(), 8 * GiB)
    assert time.process_time() - t0 < 0.5
    assert plans["q4_k_m"].file_bytes == path.stat().st_size


# -- device detection ----------------------------------------------------------------------


def test_parse_nvidia_smi_and_meminfo() -> None:
    gpus = gpu.parse_nvidia_smi("NVIDIA GeForce RTX 3070, 8192, 7800\nNVIDIA A100, 81920, 80000\n")
    assert [(g.name, g.total >> 20, g.free >> 20) for g in gpus] == [
        ("NVIDIA GeForce RTX 3070", 8192, 7800), ("NVIDIA A100", 81920, 80000)]
    ram = gpu.parse_meminfo("MemTotal:       16384000 kB\nMemFree: 1 kB\nMemAvailable:   8192000 kB\n")
    assert ram and ram.total == 16384000 * 1024 and ram.free == 8192000 * 1024
    assert gpu.parse_meminfo("garbage") is None


def test_detect_falls_back_in_order(monkeypatch) -> None:
    """NVML, then nvidia-smi, then Apple, then CPU RAM; each answer names what it found."""
    a100 = gpu.GPU("NVIDIA A100", 80 * GiB, 78 * GiB)
    m2 = gpu.GPU("Apple M2", 16 * GiB, 12 * GiB)
    probes = {"_nvml": (), "_nvidia_smi": (), "_apple": None}
    for name in probes:
        monkeypatch.setattr(gpu, name, lambda name=name: probes[name])
    cpu = gpu.detect()
    ram = gpu.parse_meminfo(Path("/proc/meminfo").read_text()) if Path("/proc/meminfo").exists() else None
    assert (cpu.backend, cpu.gpus) == ("cpu", (ram,) if ram else ())
    assert "no GPU found" in cpu.note and "--vram" in cpu.note
    probes["_apple"] = m2
    metal = gpu.detect()
    assert (metal.backend, metal.gpus) == ("metal", (m2,)) and "Apple" in metal.note
    probes["_nvidia_smi"] = (a100, a100)
    nvidia = gpu.detect()
    assert (nvidia.backend, nvidia.gpus) == ("cuda", (a100, a100)) and nvidia.note.startswith("2 NVIDIA GPU(s)")


def test_recommendation_says_what_is_left_not_the_margin(capsys) -> None:
    # `plan --vram 8`: q5_k_m needs 5.87 GiB, so 2.13 GiB are left; the 0.40 GiB safety
    # margin is a separate number (issue 12: it used to be printed as what was "to spare").
    out = _json(capsys, "--vram", "8")
    rec, budget = out["recommendation"], out["device"]["budget_bytes"]
    left = (budget - rec["gpu_bytes"]) / 2**30
    margin = (budget - out["device"]["usable_bytes"]) / 2**30
    assert f"leaving {left:.2f} GiB free" in rec["reason"]
    assert f"safety margin {margin:.2f} GiB" in rec["reason"]
    assert round(left, 2) != round(margin, 2)

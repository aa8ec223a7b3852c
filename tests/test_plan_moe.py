"""The planner for mixture-of-experts models, as a spec.

On the CPU, llama.cpp's own reported buffers (CPU_Mapped, CPU_REPACK, KV, compute) for the tiny
Qwen3-MoE, Mixtral and Qwen2-MoE GGUFs that convert writes, and for wide sparse MoE files. On a
GPU (none here), the --n-cpu-moe split follows llama.cpp's code paths, each cited where it is
checked: which tensors the override list moves, which CPU buffer they land in, the expert copy
the CUDA compute buffer holds for prompt batches. Then the smallest split per level, the
recommendation and `plan --json`.
"""

from __future__ import annotations

import json
import re

import pytest
import test_plan_archs
import tinymoe
from helpers import cli, one_line

from alpaca_local.cli.main import main
from alpaca_local.plan import catalog, moe, moe_fit
from alpaca_local.plan import memory as plan

bench = test_plan_archs.bench  # benchmarks/plan.py: llama.cpp's reported buffers against ours
MiB, GiB = 1 << 20, 1 << 30


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return test_plan_archs.conversions(tmp_path_factory.mktemp("moe-plan"), tinymoe.BUILDERS)


@pytest.mark.parametrize("n_ctx", [256, 1000, 2048])
@pytest.mark.parametrize("level", ["f16", "q8_0", "q4_k_m"])
@pytest.mark.parametrize("arch", ["qwen3moe", "mixtral", "qwen2moe"])
def test_cpu_buffers_equal_llama_cpp(converted, arch, level, n_ctx):
    """n_gpu_layers=0: CPU_Mapped and CPU_REPACK (the stacked experts are MUL_MAT_ID weights,
    repacked as 3-D tensors: cpu_repack.is_repacked) to llama.cpp's printed digits, the KV cache
    exactly, the compute buffer to 0.0001 MiB."""
    r = bench.compare(converted(arch, level), n_ctx)
    test_plan_archs._assert_exact_and_close(r, [plan.padded_ctx(n_ctx)])
    assert r["measured"]["compute"] == pytest.approx(r["predicted"]["compute"], abs=0.0001)


# (arch, hidden, n_ff_exp, n_expert, n_expert_used, n_head, n_kv_head, head_dim, n_ff_shexp, n_ctx):
# the routed experts' moment (wide experts, 256 cells), the shared expert's (Qwen2-MoE), and
# Qwen2-MoE's attention moment (1024 cells).
WIDE = [
    ("llama", 256, 2048, 8, 2, 4, 2, 64, 0, 256), ("llama", 256, 4096, 8, 2, 4, 2, 64, 0, 256),
    ("llama", 256, 2048, 8, 4, 4, 2, 64, 0, 256), ("llama", 512, 2048, 16, 2, 8, 2, 64, 0, 256),
    ("llama", 256, 2048, 64, 2, 4, 2, 64, 0, 256), ("qwen3moe", 512, 1024, 32, 8, 8, 2, 64, 0, 256),
    ("qwen3moe", 256, 512, 128, 8, 4, 2, 64, 0, 256), ("qwen3moe", 256, 2048, 8, 2, 4, 2, 128, 0, 256),
    ("qwen3moe", 256, 2048, 8, 2, 8, 8, 64, 0, 256), ("qwen2moe", 256, 256, 8, 2, 4, 2, 64, 2048, 256),
    ("qwen2moe", 512, 256, 16, 2, 8, 2, 64, 4096, 256), ("qwen2moe", 256, 256, 8, 2, 4, 2, 64, 512, 256),
    ("qwen2moe", 256, 256, 8, 4, 4, 2, 64, 2048, 256), ("qwen2moe", 512, 256, 4, 2, 8, 4, 64, 512, 1024),
    ("qwen2moe", 256, 256, 4, 4, 4, 4, 64, 512, 1024),
]


@pytest.mark.parametrize("arch, h, ff, ne, nu, nh, nkv, hd, sh, n_ctx", WIDE)
def test_moe_compute_buffer_matches_llama_cpp(tmp_path, arch, h, ff, ne, nu, nh, nkv, hd, sh, n_ctx):
    """plan.moe.ffn_floats / attention_extra_floats against llama.cpp's CPU compute buffer, on sparse
    files (header, then a hole) whose experts are wide enough to set the peak."""
    shape = plan.ModelShape(name="m", arch=arch, n_layer=2, hidden=h, n_head=nh, n_kv_head=nkv, head_dim=hd,
                            intermediate=ff if arch == "llama" else 768, vocab_size=1000, n_ctx=4096,
                            source="catalog", n_expert=ne, n_expert_used=nu,
                            n_ff_exp=0 if arch == "llama" else ff, n_ff_shexp=sh)
    path = bench.write_sparse_gguf(tmp_path / "m.q8_0.gguf", shape, "q8_0")
    r = bench.compare(path, n_ctx)
    assert r["measured"]["compute"] == pytest.approx(r["predicted"]["compute"], rel=0.001)
    assert r["measured"]["kv"] == round(r["predicted"]["kv"], 2)


# ---------------------------------------------------------------------------------------
# The --n-cpu-moe split on CUDA, by llama.cpp's code paths
# ---------------------------------------------------------------------------------------

QWEN3_30B = plan.shape_from_config(catalog.load("qwen3-30b-a3b"), "qwen3-30b-a3b", "catalog")
CUDA = plan.RunSettings(n_ctx=4096, backend="cuda", cpu=plan.NO_REPACK)


def test_override_patterns_are_llama_cpps():
    """--n-cpu-moe N: "blk\\.{i}" + LLM_FFN_EXPS_REGEX for i < N (common/common.h:1198-1217); the
    loader regex_searches each name (llama-model-loader.cpp:1235-1239), as kept_on_cpu decides."""
    assert moe.expert_override_patterns(2) == [r"blk\.0\.ffn_(up|down|gate|gate_up)_(ch|)exps",
                                        r"blk\.1\.ffn_(up|down|gate|gate_up)_(ch|)exps"]
    names = [t.name for t in plan.tensors_for(QWEN3_30B, "q4_k_m")]
    for n in (0, 1, 11, 48):
        searched = {name for name in names if any(re.search(p, name) for p in moe.expert_override_patterns(n))}
        assert searched == {name for name in names if moe.kept_on_cpu(name, n)}
        assert len(searched) == 3 * n  # gate, up and down experts of each of the first n layers
    assert not moe.kept_on_cpu("blk.11.ffn_up_exps.weight", 2) and moe.kept_on_cpu("blk.1.ffn_down_exps.weight", 2)
    assert not moe.kept_on_cpu("blk.0.ffn_gate_inp.weight", 48)  # the router stays with its layer


def test_each_layer_of_experts_moves_from_vram_to_the_mapped_file():
    """On CUDA a CPU override goes through buft_list_cpu, whose CUDA_Host type becomes the plain CPU
    type under mmap (llama-model-loader.cpp:1240-1276): the experts are read from the mapped file,
    nothing repacked. CPU_Mapped is the range from the first to the last tensor kept on the CPU
    (get_mapping_range, llama-model-loader.cpp:1449): token_embd up to layer N-1's last expert."""
    tensors = plan.tensors_for(QWEN3_30B, "q4_k_m")
    full = QWEN3_30B.n_layer + 1
    offsets, at = {}, 0
    for t in tensors:
        offsets[t.name] = (at, at + t.nbytes)
        at += plan._pad(t.nbytes, plan.GGUF_ALIGNMENT)
    gpu0, cpu0, rep0 = plan.weights_split(tensors, QWEN3_30B, full, "cuda", {}, n_cpu_moe=0)
    assert (cpu0, rep0) == (offsets["token_embd.weight"][1] - offsets["token_embd.weight"][0], 0)
    for n in (1, 7, 48):
        gpu, cpu, rep = plan.weights_split(tensors, QWEN3_30B, full, "cuda", {}, n_cpu_moe=n)
        moved = [t for t in tensors if moe.kept_on_cpu(t.name, n)]
        assert gpu == gpu0 - sum(plan._gpu_alloc_size(t, "cuda") for t in moved)
        last = max(offsets[t.name][1] for t in moved)
        assert (cpu, rep) == (last - offsets["token_embd.weight"][0], 0)


def test_metal_repacks_the_experts_it_keeps_on_the_cpu():
    """Metal has no host buffer type (ggml-metal.cpp:822): the same override lands in CPU_REPACK
    for the types its rules take (Q4_K with dotprod), so those experts are copied, not mapped."""
    tensors = plan.tensors_for(QWEN3_30B, "q4_k_m")
    rows = plan.repack_rows_for("metal", plan.CpuFeatures(("dotprod",), "test"))
    _, _, rep = plan.weights_split(tensors, QWEN3_30B, QWEN3_30B.n_layer + 1, "metal", rows, n_cpu_moe=2)
    kept = [t for t in tensors if moe.kept_on_cpu(t.name, 2)]
    assert rep == sum(plan._pad(t.nbytes, plan.TENSOR_ALIGNMENT) for t in kept if plan.is_repacked(t, rows)) > 0


def test_prompt_batches_copy_the_largest_host_expert_into_the_cuda_compute_buffer():
    """An op on a host weight is offloaded to CUDA from 32 tokens (ggml-cuda.cu:5636-5654; op_offload
    on by default, llama-context.cpp:3787): the weight is the split's input copy
    (ggml-backend.cpp:1375-1394), one per split (:1325-1340), so the buffer grows by the largest."""
    base = plan.plan_level(QWEN3_30B, "q4_k_m", CUDA, None, 0).compute
    kept = [t for t in plan.tensors_for(QWEN3_30B, "q4_k_m") if moe.kept_on_cpu(t.name, 5)]
    largest = max(plan._gpu_alloc_size(t, "cuda") for t in kept)
    assert plan.plan_level(QWEN3_30B, "q4_k_m", CUDA, None, 5).compute == base + largest
    small = plan.RunSettings(n_ctx=4096, n_batch=16, backend="cuda", cpu=plan.NO_REPACK)  # 16 tokens: no offload
    assert plan.plan_level(QWEN3_30B, "q4_k_m", small, None, 5).compute == plan.plan_level(
        QWEN3_30B, "q4_k_m", small, None, 0).compute
    assert plan.plan_level(QWEN3_30B, "q4_k_m", CUDA, None, 5).kv == plan.kv_bytes(QWEN3_30B, 4096, "f16")  # all on GPU


@pytest.mark.parametrize("level", ["q8_0", "q4_k_m"])
def test_smallest_split_that_fits(level):
    vram, ram = 8 * GiB, 64 * GiB
    split = moe_fit.split_for(QWEN3_30B, level, CUDA, vram, ram)
    n = split.n_cpu_moe
    assert 0 < n < QWEN3_30B.n_layer and split.n_gpu_layers == QWEN3_30B.n_layer + 1
    assert plan.fits(plan.plan_level(QWEN3_30B, level, CUDA, None, n), vram)
    assert not plan.fits(plan.plan_level(QWEN3_30B, level, CUDA, None, n - 1), vram)
    assert split.ram == split.plan.weights_cpu + split.plan.output + plan.OVERHEAD["cpu"]
    # the experts in RAM must fit there too: with too little RAM there is no split
    assert moe_fit.split_for(QWEN3_30B, level, CUDA, vram, split.ram).n_cpu_moe is None


def test_recommendation_prefers_the_higher_level_for_a_few_layers_of_experts():
    levels = plan.levels_for(QWEN3_30B, (*plan.LEVELS, "q4_0"))
    splits = [moe_fit.split_for(QWEN3_30B, lv, CUDA, 8 * GiB, 32 * GiB) for lv in levels]
    rec = moe_fit.recommend(QWEN3_30B, splits, 8 * GiB)
    by = {x.level: x for x in splits}
    assert rec.level == "q4_k_m" and rec.n_cpu_moe == by["q4_k_m"].n_cpu_moe > by["q4_0"].n_cpu_moe
    assert by["q4_0"].read_time / by["q4_k_m"].read_time >= moe_fit.SPEED_KEPT  # close to the fastest
    assert by["q4_k_m"].read_time / by["q5_k_m"].read_time < moe_fit.SPEED_KEPT  # q5_k_m: too slow
    assert "close enough to prefer the higher quality" in rec.reason and "q5_k_m would need" in rec.reason
    # q3_k_m and iq3_m run faster still, but below the 4-bit levels they do not set the speed bar;
    # they are picked when nothing above them is offered
    assert by["q3_k_m"].fits and by["q3_k_m"].read_time < by["q4_0"].read_time
    low = [by["q3_k_m"], by["iq3_m"]]
    assert moe_fit.recommend(QWEN3_30B, low, 8 * GiB).level == "q3_k_m"
    big = [moe_fit.split_for(QWEN3_30B, lv, CUDA, 48 * GiB, 64 * GiB) for lv in plan.LEVELS]
    assert moe_fit.recommend(QWEN3_30B, big, 48 * GiB).n_cpu_moe == 0  # fits whole: no experts in RAM


def test_plan_json_carries_n_cpu_moe(capsys):
    assert main(["plan", "qwen3-30b-a3b", "--vram", "8", "--ram", "32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["level"]: r for r in report["levels"]}
    assert rows["q4_k_m"]["n_cpu_moe"] > 0 and rows["f16"]["n_cpu_moe"] is None  # f16's experts exceed 32 GiB
    rec = report["recommendation"]
    assert rec["level"] == "q4_k_m" and rec["n_cpu_moe"] == rows["q4_k_m"]["n_cpu_moe"]
    assert report["ram"] == {"budget_bytes": 32 * GiB, "usable_bytes": plan.usable(32 * GiB), "from": "--ram"}
    assert rows["q4_k_m"]["ram_bytes"] <= plan.usable(32 * GiB) and rows["q4_k_m"]["total_bytes"] <= plan.usable(8 * GiB)


def test_plan_table_reads_at_80_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["plan", "mixtral-8x7b", "--vram", "12", "--ram", "64"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "n-cpu-moe" in out and "recommended: q4_k_m with --n-cpu-moe" in out


def test_bad_ram_is_one_line(capsys):
    one_line(*cli(capsys, "plan", "qwen3-30b-a3b", "--vram", "8", "--ram", "0"), 2, "--ram 0", "between 0.1")

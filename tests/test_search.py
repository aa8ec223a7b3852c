"""convert --target-size/--target-bpw/--fit: per-tensor types by measured error, within an exact budget."""

from __future__ import annotations

from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest

import reference
import tinymodels
from alpaca_local.cli.main import main
from alpaca_local.convert import search
from alpaca_local.convert.ggml import quantize_rows
from alpaca_local.convert.imatrix_file import write_imatrix
from alpaca_local.convert.pipeline import convert, header_nbytes, plan_conversion
from test_imatrix_convert import synthetic_imatrix

T = gguf.GGMLQuantizationType

# The default shape (rows of 256: every candidate), and rows of 320 (only the 32-block types).
VARIANTS = {
    "rows-256": {},
    "rows-320": {"hidden": 320, "n_head": 5, "n_kv_head": 1, "intermediate": 640},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request, tmp_path_factory):
    work = tmp_path_factory.mktemp(request.param)
    tiny = tinymodels.build_llama(work / "model", **VARIANTS[request.param])
    f16 = convert(tiny.path, work / "f16.gguf", "f16").output
    imatrix = work / "imatrix.gguf"
    write_imatrix(synthetic_imatrix(f16), imatrix)
    base = plan_conversion(tiny.path, search.BASE_LEVEL, imatrix)
    return tiny, work, imatrix, base, search.measure(base, n_sample=64)


def _file_size(plan) -> int:
    return header_nbytes(plan) + plan.tensor_bytes


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 0.8, 1.0])
def test_written_file_never_exceeds_the_budget(model, fraction):
    tiny, work, _, base, options = model
    smallest, largest, _ = search.size_range(base)
    budget = smallest + int(fraction * (largest - smallest))
    result = search.search(base, budget, options)
    out = convert(tiny.path, work / f"target-{fraction}.gguf", plan=result.plan, force=True)
    assert out.file_bytes == out.output.stat().st_size == result.file_bytes <= budget
    if fraction == 1.0:  # everything at its largest type: the budget is used to the byte
        assert result.file_bytes == largest
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out.output).tensors}
    assert types == {job.name: job.ggml_type for job in result.plan.jobs}


def test_one_byte_less_than_the_smallest_file_is_refused(model):
    _, _, _, base, options = model
    smallest, _, _ = search.size_range(base)
    assert search.search(base, smallest, options).file_bytes == smallest
    with pytest.raises(ValueError, match="smallest mix"):
        search.search(base, smallest - 1, options)


def test_chosen_types_are_legal(model):
    _, _, _, base, options = model
    smallest, largest, _ = search.size_range(base)
    for budget in np.linspace(smallest, largest, 7).astype(int):
        result = search.search(base, int(budget), options)
        for job, base_job in zip(result.plan.jobs, base.jobs):
            if base_job.ggml_type in (T.F32, T.F16):  # what llama.cpp keeps: norms F32 and the like
                assert job.ggml_type == base_job.ggml_type, job.name
                continue
            assert job.ggml_type in search.CANDIDATES, job.name
            assert job.shape[-1] % gguf.GGML_QUANT_SIZES[job.ggml_type][0] == 0, (job.name, job.ggml_type)
            # quantized with its importance vector where the file has one (synthetic_imatrix: blk.* only)
            assert (job.imatrix is not None) == job.name.startswith("blk."), job.name


def test_rows_the_k_quants_cannot_hold_get_32_block_types_only(model):
    tiny, _, _, base, options = model
    for job, opt in zip(base.jobs, options):
        if job.shape[-1] % 256:
            assert not {o.ggml_type for o in opt.options} & {T.Q6_K, T.Q5_K, T.Q4_K, T.Q3_K, T.Q2_K, T.IQ4_XS, T.IQ3_S}


def test_measured_error_equals_numpy(model):
    """With a sample larger than the tensor every row is measured: no scaling."""
    tiny, _, imatrix, base, _ = model
    name = "blk.1.ffn_down.weight"
    job = next(j for j in base.jobs if j.name == name)
    opts = search._measure_one(job, search.candidate_types(job, base.arch.arch_name), 10**6)
    w = tinymodels.read_safetensors_f32(tiny.path)["model.layers.1.mlp.down_proj.weight"].astype(np.float32)
    im = job.imatrix.astype(np.float64)
    assert len(opts.options) > 3
    for opt in opts.options:
        deq = gguf.quants.dequantize(quantize_rows(w, opt.ggml_type, job.imatrix), opt.ggml_type).reshape(w.shape)
        direct = float((((w.astype(np.float64) - deq) ** 2) * im).sum())
        assert opt.error == pytest.approx(direct, rel=1e-9), opt.ggml_type
    assert opts.energy == pytest.approx(float(((w.astype(np.float64) ** 2) * im).sum()), rel=1e-9)


def test_sampled_error_is_scaled_to_the_whole_tensor(model):
    """A sample of (row, run of columns) pieces: the error of exactly those pieces, each quantized with
    its columns' importance weights, times the tensor's elements over the elements measured."""
    tiny, _, _, base, options = model
    job = next(j for j in base.jobs if j.name == "token_embd.weight")
    opts = next(o for o in options if o.name == "token_embd.weight")
    w = tinymodels.read_safetensors_f32(tiny.path)["model.embed_tokens.weight"].astype(np.float32)
    types = [o.ggml_type for o in opts.options]
    idx, seg, pairs = search.samples(len(w), w.shape[1], types, 64)
    assert len(idx) == 64 < len(w) and idx[0] == 0 and idx[-1] == len(w) - 1
    assert len(np.unique(pairs[:, 1])) == w.shape[1] // seg  # every run of columns is sampled
    im = np.ones(w.shape[1], dtype=np.float32) if job.imatrix is None else job.imatrix
    scale = w.size / (len(pairs) * seg)
    for opt in opts.options:
        direct = 0.0
        for r, c in pairs:
            piece = np.ascontiguousarray(w[idx[r]:idx[r] + 1, c:c + seg])
            deq = gguf.quants.dequantize(quantize_rows(piece, opt.ggml_type, None if job.imatrix is None else
                                                       np.ascontiguousarray(im[c:c + seg])), opt.ggml_type)
            direct += float((((piece.astype(np.float64) - deq.reshape(piece.shape)) ** 2) @ im[c:c + seg]).sum())
        assert opt.error == pytest.approx(direct * scale, rel=1e-9), opt.ggml_type


def test_samples_cover_rows_and_columns():
    idx, seg, pairs = search.samples(10_000, 4096, [T.F16, T.Q8_0, T.Q4_K], 512)
    assert len(idx) == 512 and seg == 256 and len(pairs) == 512
    assert sorted(set(pairs[:, 1])) == list(range(0, 4096, 256))  # every run of columns, 32 rows each
    idx, seg, pairs = search.samples(200, 640, [T.F16, T.Q8_0, T.Q4_0], 512)  # few rows: several runs of each
    assert len(idx) == 200 and seg == 160 and len(pairs) == 600
    assert len({tuple(p) for p in pairs}) == 600  # no piece twice
    idx, seg, pairs = search.samples(64, 640, [T.Q8_0], 512)  # the sample holds the whole tensor: whole rows
    assert len(idx) == 64 and seg == 640 and (pairs[:, 1] == 0).all()
    assert search.segment_length(352, [T.Q8_0]) == 32 and search.segment_length(2048, [T.F16]) == 256


BLOCKWISE = [t for t in search.CANDIDATES if t not in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)]


@pytest.mark.parametrize("ne0", [2048, 640])
def test_a_piece_is_quantized_as_in_its_row(ne0):
    """ggml quantizes each block on its own (given the imatrix): pieces of whole blocks quantized apart
    are the row's bytes. The legacy types weight their search by the row's mean square too: close."""
    rng = np.random.default_rng(1)
    rows = rng.standard_t(3, (16, ne0)).astype(np.float32)
    im = (rng.random(ne0) ** 4 * 10 + 1e-3).astype(np.float32)
    for ty in search.CANDIDATES:
        if ne0 % gguf.GGML_QUANT_SIZES[ty][0]:
            continue
        seg = search.segment_length(ne0, [ty, T.Q8_0] if ne0 % 256 else [ty, T.Q4_K])
        parts = [np.ascontiguousarray(rows[:, c:c + seg]) for c in range(0, ne0, seg)]
        if ty in BLOCKWISE:
            whole = quantize_rows(rows, ty, im)
            apart = np.concatenate([quantize_rows(p, ty, im[c:c + seg]) for p, c in zip(parts, range(0, ne0, seg))], axis=1)
            assert np.array_equal(whole, apart), ty
        else:
            whole = search.weighted_error(rows, ty, im)
            apart = sum(search.weighted_error(p, ty, im[c:c + seg]) for p, c in zip(parts, range(0, ne0, seg)))
            assert apart == pytest.approx(whole, rel=0.02), ty


def test_more_bytes_never_predict_more_loss(model):
    _, _, _, base, options = model
    smallest, largest, _ = search.size_range(base)
    losses = [search.search(base, int(b), options).predicted_loss for b in np.linspace(smallest, largest, 9)]
    assert all(a >= b - 1e-15 for a, b in zip(losses, losses[1:]))


@pytest.mark.parametrize("level", ["q4_k_m", "q3_k_m", "q6_k"])
def test_search_off_at_a_levels_size_is_that_level_bit_for_bit(model, level):
    tiny, work, imatrix, base, _ = model
    options = search.measure(base, n_sample=8, only=level)
    standard = convert(tiny.path, work / f"std.{level}.gguf", level, imatrix=imatrix, force=True).output
    recipe_bytes = header_nbytes(search.search(base, 10**12, options).plan) - header_nbytes(
        plan_conversion(tiny.path, level, imatrix))
    budget = standard.stat().st_size + recipe_bytes  # the recipe's keys are the only bytes more
    result = search.search(base, budget, options)
    assert result.plan.quant == level
    out = convert(tiny.path, work / f"off.{level}.gguf", plan=result.plan, force=True).output
    assert out.stat().st_size == budget
    assert reference.tensor_table(out) == reference.tensor_table(standard)


def test_the_search_beats_the_standard_mix_it_is_compared_with(model):
    _, _, _, base, options = model
    result = search.search(base, 10**12, options)
    for level, nbytes in result.level_bytes.items():
        if level in result.level_losses:
            assert search.search(base, nbytes, options).predicted_loss <= result.level_losses[level] + 1e-12, level


def test_recipe_in_the_metadata(model):
    tiny, work, imatrix, base, options = model
    smallest, largest, _ = search.size_range(base)
    budget = (smallest + largest) // 3
    result = search.search(base, budget, options)
    out = convert(tiny.path, work / "recipe.gguf", plan=result.plan, force=True).output
    reader = gguf.GGUFReader(out)
    kv = {k: f.contents() for k, f in reader.fields.items()}
    assert kv["alpaca_local.target.bytes"] == budget
    assert kv["alpaca_local.target.types"] == [int(t.tensor_type) for t in reader.tensors]
    assert kv["alpaca_local.target.objective"].startswith("imatrix-weighted")
    assert kv["general.file_type"] == int(gguf.LlamaFileType[f"MOSTLY_{result.plan.quant.upper()}"])
    assert float(kv["alpaca_local.target.predicted_loss"]) == pytest.approx(result.predicted_loss, rel=1e-5)


def test_allocate_extremes_and_ties():
    costs = [[(100, 0.0), (50, 1.0), (25, 3.0)], [(80, 0.5), (40, 0.6)], [(10, 0.0)]]
    assert search.allocate(costs, 190) == [0, 0, 0]
    assert search.allocate(costs, 75) == [2, 1, 0]
    assert search.allocate(costs, 115) == [1, 1, 0]  # 50+40+10 (loss 1.6) beats 25+80+10 (3.5)
    with pytest.raises(ValueError):
        search.allocate(costs, 74)


def test_allocate_is_within_the_lagrangian_bound_of_the_exhaustive_optimum():
    rng = np.random.default_rng(0)
    import itertools

    for _ in range(30):
        costs = []
        for _ in range(5):
            b = np.sort(rng.integers(1, 100, 4))[::-1]
            c = np.sort(rng.random(4))
            costs.append([(int(x), float(y)) for x, y in zip(b, c)])
        budget = int(rng.integers(sum(min(x for x, _ in o) for o in costs), sum(max(x for x, _ in o) for o in costs)))
        choice = search.allocate(costs, budget)
        used = sum(costs[i][k][0] for i, k in enumerate(choice))
        assert used <= budget
        best = min(sum(costs[i][k][1] for i, k in enumerate(ch)) for ch in itertools.product(range(4), repeat=5)
                   if sum(costs[i][k][0] for i, k in enumerate(ch)) <= budget)
        got = sum(costs[i][k][1] for i, k in enumerate(choice))
        # The Lagrangian bound for a multiple-choice knapsack: the relaxation's optimum has one item
        # split between two options, so rounding costs at most one item's loss range.
        assert got <= best + max(max(c for _, c in o) - min(c for _, c in o) for o in costs) + 1e-12


def test_output_loads_in_llama_cpp_with_finite_logits(model):
    from alpaca_local.run.chat import load_llama

    tiny, work, _, base, options = model
    smallest, largest, _ = search.size_range(base)
    result = search.search(base, smallest + (largest - smallest) // 4, options)
    out = convert(tiny.path, work / "loads.gguf", plan=result.plan, force=True).output
    llm = load_llama(out, 64, n_threads=2, logits_all=True, seed=0)
    try:
        llm.eval(llm.tokenize(b"hello world", add_bos=True))
        logits = np.asarray(llm.scores[: llm.n_tokens])
        assert logits.size and np.isfinite(logits).all()
    finally:
        llm.close()


# --------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--target-size", "10"], "smallest file this model can be"),
    (["--target-size", "10G"], "more than the f16 file"),
    (["--target-size", "4.2X"], "is not a size"),
    (["--target-size", "-5"], "is not a size"),
    (["--target-size", "0"], "more than 0 bytes"),
    (["--target-bpw", "0"], "out of range"),
    (["--target-bpw", "0.5"], "smallest file this model can be"),
    (["--fit", "0.01"], "out of range"),
    (["--dry-run"], "goes with --target-size"),
    (["--ctx", "512", "--target-size", "1G"], "--ctx goes with --fit"),
    (["--quant", "q6_k", "--target-size", "1M"], "give one of them"),
])
def test_bad_targets_are_one_line_exit_2(tiny_model, tmp_path, capsys, flags, message):
    rc = main(["convert", str(tiny_model.path), "-o", str(tmp_path / "x.gguf"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x.gguf").exists()


def test_dry_run_writes_nothing(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "x.gguf"
    assert main(["convert", str(tiny_model.path), "--target-size", "900K", "--dry-run", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "chosen mix" in text and "predicted loss" in text and "Q4_K_M" in text
    assert not out.exists() and not (tmp_path / "models").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_writes_within_target_and_says_plain_error(tiny_model, tmp_path, capsys):
    import json

    out = tmp_path / "x.gguf"
    assert main(["convert", str(tiny_model.path), "--target-bpw", "5", "-o", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "no importance matrix" in captured.err
    assert out.stat().st_size == summary["size_bytes"] == summary["target"]["predicted_bytes"]
    assert summary["size_bytes"] <= summary["target"]["budget_bytes"]
    n_params = sum(t.n_elements for t in gguf.GGUFReader(out).tensors)
    tensor_bytes = sum(t.n_bytes for t in gguf.GGUFReader(out).tensors)
    assert tensor_bytes * 8 / n_params <= 5.0


def test_fit_uses_the_planner(tiny_model, tmp_path, capsys):
    """--fit's budget is the VRAM less what `plan` counts besides the weights (KV cache, compute,
    overhead) at that context; the file made for it is one `plan` says fits that GPU."""
    import json

    from alpaca_local.plan.memory import RunSettings, plan_level, shape_from_config, usable

    base = plan_conversion(tiny_model.path, search.BASE_LEVEL)
    smallest, largest, _ = search.size_range(base)
    shape = shape_from_config(base.config, base.name, str(base.source))
    ctx = 128
    rest = sum(getattr(plan_level(shape, search.BASE_LEVEL, RunSettings(n_ctx=ctx)), k) for k in ("kv", "compute", "overhead"))
    left = lambda vram: usable(int(vram * (1 << 30))) - rest  # noqa: E731
    lo, hi = 0, 100_000  # VRAM in 1/10,000 GiB whose bytes left fall between the smallest and the largest file
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if left(mid / 1e4) < (smallest + largest) // 2 else (lo, mid)
    vram = lo / 1e4
    assert smallest < left(vram) < largest
    out = tmp_path / "fit.gguf"
    assert main(["convert", str(tiny_model.path), "--fit", str(vram), "--ctx", str(ctx), "-o", str(out), "--json"]) == 0
    capsys.readouterr()
    assert main(["convert", str(tiny_model.path), "--fit", str(vram), "--ctx", str(ctx), "--dry-run", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["target"].startswith(f"--fit {vram:g} GiB at ctx {ctx}")
    assert info["budget_bytes"] == left(vram)
    assert out.stat().st_size == info["predicted_bytes"] <= info["budget_bytes"]
    # `plan` of the source at the base level counts the same KV, compute and overhead ...
    assert main(["plan", str(tiny_model.path), "--vram", str(vram), "--ctx", str(ctx), "--levels", search.BASE_LEVEL,
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["levels"][0]
    assert usable(int(vram * (1 << 30))) - row["kv_bytes"] - row["compute_bytes"] - row["overhead_bytes"] == left(vram)
    # ... and says the file made for it fits
    assert main(["plan", str(out), "--vram", str(vram), "--ctx", str(ctx), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recommendation"]["full_offload"]


def test_with_lora_the_error_is_measured_on_the_merged_weights(tmp_path):
    """The rows measured are the merged rows the writer quantizes: those of the merged f16 file."""
    import peft_adapters
    from alpaca_local.source.adapter import read_adapter

    base = tinymodels.build_llama(tmp_path / "base", hidden=64, intermediate=128).path
    adapter = peft_adapters.make_adapter(base, tmp_path / "adapter", r=4, target_modules=["down_proj"])
    merged_f16 = convert(base, tmp_path / "merged.f16.gguf", "f16", adapters=[read_adapter(adapter)]).output
    plan = plan_conversion(base, search.BASE_LEVEL, adapters=[read_adapter(adapter)])
    name = "blk.0.ffn_down.weight"
    job = next(j for j in plan.jobs if j.name == name)
    assert job.lora
    opts = search._measure_one(job, search.candidate_types(job, plan.arch.arch_name), 10**6)
    t = next(t for t in gguf.GGUFReader(merged_f16).tensors if t.name == name)
    w = np.asarray(t.data).view(np.float16).astype(np.float32).reshape(job.shape)
    plain = tinymodels.read_safetensors_f32(base)["model.layers.0.mlp.down_proj.weight"]
    assert not np.allclose(w, plain)  # the adapter changed the rows
    for opt in opts.options:
        deq = gguf.quants.dequantize(quantize_rows(w, opt.ggml_type), opt.ggml_type).reshape(w.shape)
        assert opt.error == pytest.approx(float(((w.astype(np.float64) - deq) ** 2).sum()), rel=1e-9), opt.ggml_type


@pytest.mark.parametrize("budget, tag", [(900_000, "TARGET-900K"), (253_113_024, "TARGET-253M"),
                                         (4_299_999_999, "TARGET-4.2G"), (10**10, "TARGET-10G")])
def test_default_name_says_the_budget(model, budget, tag):
    _, _, _, base, _ = model
    assert search._with_recipe(base, {}, "q4_k_m", budget, 0.0, True).tag == tag


@pytest.mark.parametrize("tie", [False, True])
def test_a_tied_embedding_counts_twice(tmp_path, tie):
    tiny = tinymodels.build_llama(tmp_path / "m", tie_embeddings=tie)
    base = plan_conversion(tiny.path, search.BASE_LEVEL)
    weights = {o.name: o.weight for o in search.measure(base, n_sample=8)}
    assert ("output.weight" in weights) != tie
    assert weights.pop("token_embd.weight") == (search.TIED_EMBEDDING_WEIGHT if tie else 1.0)
    assert set(weights.values()) == {1.0}


def test_calibrate_then_search_in_one_command(tiny_model, tmp_path, capsys, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    assert main(["convert", str(tiny_model.path), "--target-size", "900K", "--calibrate", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    out = tmp_path / "models" / f"{tiny_model.path.name}.TARGET-900K.gguf"
    assert Path(summary["output"]).resolve() == out.resolve() and out.stat().st_size <= 900_000
    assert summary["target"]["objective"].startswith("imatrix-weighted")
    assert summary["imatrix"]["quantize.imatrix.file"] == "calibrate:built-in text"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [out.name]  # the temporaries are gone

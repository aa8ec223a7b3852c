"""convert --quant a,b,...: several levels from one read, each file byte-identical to a single-level convert.

The single-level files are themselves checked against llama.cpp's route (test_convert.py), so
equality here carries that over. The source is read once (counted), each output gets its
progress, and a failure anywhere leaves none of the outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import peft_adapters as pa
import tinymodels
from helpers import cli, leftovers, one_line
from test_hub import hub, models  # noqa: F401  (the fake Hub fixture and its models)
from test_convert import VARIANTS  # GQA + [PAD], 8 layers in 3 shards, K-quant fallbacks, .bin
from test_imatrix_convert import synthetic_imatrix

from alpaca_local.cli.main import main
from alpaca_local.convert import levels as lv
from alpaca_local.convert.imatrix_file import write_imatrix
from alpaca_local.convert.pipeline import convert
from alpaca_local.convert.quant_levels import LEVELS, SETS, parse_list
from alpaca_local.convert.quant_rules import QUANT_FILE_SUFFIX, QUANTS
from alpaca_local.errors import UnsupportedError, UsageError
from alpaca_local.source.tensors import TensorRef

# Every level a dense model takes without an importance matrix (the imatrix-only levels and
# MXFP4_MOE are refused before anything is read), in ladder order; with one, every level.
ALL = [q for q in QUANTS if not LEVELS[q].imatrix and not LEVELS[q].experts_only]
WITH_IMATRIX = [q for q in QUANTS if not LEVELS[q].experts_only]

@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory) -> tuple[tinymodels.TinyLlama, Path]:
    work = tmp_path_factory.mktemp(request.param)
    return tinymodels.build_llama(work / "tiny", **VARIANTS[request.param]), work


@pytest.fixture
def model(tmp_path) -> Path:
    return tinymodels.build_llama(tmp_path / "tiny").path


def _singles(src: Path, work: Path, quants, **kw) -> dict[str, bytes]:
    return {q: convert(src, work / f"single.{q}.gguf", q, force=True, **kw).output.read_bytes() for q in quants}


def _plain_levels(model: Path) -> list[str]:
    """ALL less what this model's shapes refuse (q1_0 on rows not a multiple of 128)."""
    from alpaca_local.convert.pipeline import plan_conversion

    def takes(q: str) -> bool:
        try:
            plan_conversion(model, q)
        except (UsageError, UnsupportedError):
            return False
        return True

    return [q for q in ALL if takes(q)]


def test_every_level_equals_its_single_level_convert(variant, capsys):
    model, work = variant
    out = work / "levels"
    levels = _plain_levels(model.path)
    assert len(levels) >= len(ALL) - 1
    rc = main(["convert", str(model.path), "--quant", ",".join(levels), "-o", str(out), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    singles = _singles(model.path, work, levels)
    for q in levels:
        assert (out / f"tiny.{QUANT_FILE_SUFFIX[q]}.gguf").read_bytes() == singles[q], q
    summary = json.loads(captured.out)
    assert [o["quant"] for o in summary["outputs"]] == levels
    assert [o["size_bytes"] for o in summary["outputs"]] == [len(singles[q]) for q in levels]


def test_moe_levels_equal_their_single_level_converts(tmp_path, capsys):
    """Stacked experts: each expert's rows are read once and land after the previous expert's in every file."""
    import tinymoe

    model = tinymoe.build_qwen3moe(tmp_path / "moe", shard="10MB")
    levels = ["q8_0", "mxfp4_moe", "q4_k_m", "f16"]
    rc, err = cli(capsys, "convert", str(model.path), "--quant", ",".join(levels), "-o", str(tmp_path / "out"),
                  "--json")
    assert rc == 0, err
    singles = _singles(model.path, tmp_path, levels)
    for q in levels:
        assert (tmp_path / "out" / f"moe.{QUANT_FILE_SUFFIX[q]}.gguf").read_bytes() == singles[q], q


def test_levels_that_need_an_imatrix_are_refused_together_before_reading(model, tmp_path, capsys, monkeypatch):
    def no_reads(self, start, stop, anywhere=False):
        raise AssertionError("read before the refusal")

    monkeypatch.setattr(TensorRef, "read_raw_rows", no_reads)
    rc, err = cli(capsys, "convert", str(model), "--quant", "q8_0,iq2_m,q4_k_m,iq3_xxs", "-o", str(tmp_path / "out"))
    one_line(rc, err, 2, "iq2_m, iq3_xxs need an importance matrix", "--imatrix", "--calibrate")
    assert not (tmp_path / "out").exists()


def test_with_an_imatrix_every_quantized_level_uses_it(tmp_path, capsys):
    """One imatrix for all: each quantized level equals `convert --imatrix` of that level; f16 is plain."""
    model = tinymodels.build_llama(tmp_path / "tiny", n_layer=8, n_kv_head=4)
    f16 = convert(model.path, tmp_path / "f16.gguf", "f16").output
    imatrix = tmp_path / "imatrix.gguf"
    write_imatrix(synthetic_imatrix(f16), imatrix)
    rc, err = cli(capsys, "convert", str(model.path), "--quant", ",".join(WITH_IMATRIX), "--imatrix", str(imatrix),
                  "-o", str(tmp_path / "out"), "--json")
    assert rc == 0, err
    quantized = [q for q in WITH_IMATRIX if not LEVELS[q].converter_outtype]
    singles = _singles(model.path, tmp_path, quantized, imatrix=imatrix)
    singles |= _singles(model.path, tmp_path, [q for q in WITH_IMATRIX if q not in quantized])  # written plain
    for q in WITH_IMATRIX:
        assert (tmp_path / "out" / f"tiny.{QUANT_FILE_SUFFIX[q]}.gguf").read_bytes() == singles[q], q
    assert (tmp_path / "out" / "tiny.F16.gguf").read_bytes() == f16.read_bytes()


def test_with_a_lora_merged_every_level_equals_its_single_level_merge(tmp_path, capsys):
    base = tinymodels.build_llama(tmp_path / "base").path
    adapter = pa.make_adapter(base, tmp_path / "my-lora", r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj", "down_proj"])
    levels = ["f16", "q8_0", "q4_k_m"]
    rc, err = cli(capsys, "convert", str(base), "--lora", str(adapter), "--quant", ",".join(levels),
                  "-o", str(tmp_path / "out"), "--json")
    assert rc == 0, err
    from alpaca_local.source.adapter import read_adapter

    singles = _singles(base, tmp_path, levels, adapters=[read_adapter(adapter)])
    for q in levels:  # named after the adapter, as a single-level merge is
        assert (tmp_path / "out" / f"my-lora.{QUANT_FILE_SUFFIX[q]}.gguf").read_bytes() == singles[q], q


def test_streamed_from_the_hub_once(hub, models, tmp_path, capsys):  # noqa: F811
    """A Hub source streams each file once for all levels, and gives the local files' bytes."""
    rc, err = cli(capsys, "convert", "me/tiny", "--quant", "q8_0,q4_k_m,f16", "-o", str(tmp_path / "out"), "--json")
    assert rc == 0, err
    singles = _singles(models["sharded"].path, tmp_path, ["q8_0", "q4_k_m", "f16"])
    for q, data in singles.items():
        assert (tmp_path / "out" / f"tiny.{QUANT_FILE_SUFFIX[q]}.gguf").read_bytes() == data
    for shard, data in hub.repos["me/tiny"].files.items():
        if shard.endswith(".safetensors"):
            gets = [r for r in hub.log if r[0] == "GET" and r[1].startswith("/lfs/") and hub.blob(r[1][5:])[0] == shard]
            assert len(gets) == 3 and gets[-1][2].endswith(f"-{len(data) - 1}"), gets  # length, header, one stream


def test_each_source_chunk_is_read_once(model, tmp_path, monkeypatch):
    reads: list[tuple[str, int]] = []
    real = TensorRef.read_raw_rows

    def counted(self, start, stop, anywhere=False):
        reads.append((self.name, start))
        return real(self, start, stop, anywhere)

    monkeypatch.setattr(TensorRef, "read_raw_rows", counted)
    plans = lv.plan_levels(model, ALL)
    lv.write_levels([lv.layout(p, tmp_path / f"{p.quant}.gguf") for p in plans])
    assert len(reads) == len(set(reads))
    assert {name for name, _ in reads} == {j.source.name for j in plans[0].jobs if isinstance(j.source, TensorRef)}


def test_a_type_shared_by_levels_is_encoded_once_per_chunk(model, tmp_path, monkeypatch):
    """output.weight is Q6_K in both q4_k_m and q5_k_m: quantized once, written twice."""
    import alpaca_local.convert.pipeline as pipeline

    calls: list[str] = []
    real = pipeline._encode

    def counted(job, start, stop, raw):
        calls.append((job.name, job.ggml_type.name, start))
        return real(job, start, stop, raw)

    monkeypatch.setattr(lv, "_encode", counted)
    plans = lv.plan_levels(model, ["q4_k_m", "q5_k_m"])
    types = {p.quant: {j.name: j.ggml_type for j in p.jobs} for p in plans}
    assert types["q4_k_m"]["output.weight"] == types["q5_k_m"]["output.weight"]
    lv.write_levels([lv.layout(p, tmp_path / f"{p.quant}.gguf") for p in plans])
    assert len(calls) == len(set(calls))
    shared = [c for c in calls if c[0] == "output.weight"]
    assert shared and len({c[1] for c in shared}) == 1


def test_progress_covers_every_output(model, tmp_path):
    plans = lv.plan_levels(model, ["f16", "q8_0", "q4_0"])
    read, written = [0], [0, 0, 0]
    result = lv.write_levels(
        [lv.layout(p, tmp_path / f"{p.quant}.gguf") for p in plans],
        read_progress=lambda name, n: read.__setitem__(0, read[0] + n),
        write_progress=lambda level, n: written.__setitem__(level, written[level] + n),
    )
    assert read[0] == plans[0].source_bytes
    assert written == [sum(j.nbytes for j in p.jobs) for p in plans]
    assert [r.file_bytes for r in result.levels] == [(tmp_path / f"{q}.gguf").stat().st_size for q in ("f16", "q8_0", "q4_0")]


def test_named_sets_and_lists_are_quant_levels_own():
    """One table: --quant's names, aliases and sets all come from quant_levels."""
    assert SETS["publish"] == ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_xs")
    assert parse_list("publish") == list(SETS["publish"])
    assert parse_list(" Q8_0, q4_k ,q8_0,") == ["q8_0", "q4_k_m"]
    assert parse_list("f16,publish")[0] == "f16"
    assert parse_list("all") == list(SETS["all"]) and not any(LEVELS[q].unavailable for q in SETS["all"])
    for bad in ("q3_k_xl", "q8_0,nope", ",", ""):
        with pytest.raises(UsageError):
            parse_list(bad)


def test_quant_publish_on_the_command_line(model, tmp_path, capsys):
    rc, err = cli(capsys, "convert", str(model), "--quant", "publish", "-o", str(tmp_path / "out"), "--json")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["README.md", *(f"tiny.{QUANT_FILE_SUFFIX[q]}.gguf" for q in SETS["publish"])])


def test_default_folder_is_models_name(model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err = cli(capsys, "convert", str(model), "--quant", "q8_0,q4_0", "--json")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "models" / "tiny").iterdir()) == [
        "README.md", "tiny.Q4_0.gguf", "tiny.Q8_0.gguf"]  # and the model card (test_card.py)


def test_an_existing_output_is_refused_before_any_work(model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tiny.Q4_0.gguf").write_bytes(b"older")
    rc, err = cli(capsys, "convert", str(model), "--quant", "q8_0,q4_0", "-o", str(out))
    one_line(rc, err, 2, "tiny.Q4_0.gguf", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["tiny.Q4_0.gguf"]
    assert (out / "tiny.Q4_0.gguf").read_bytes() == b"older"


@pytest.mark.parametrize("argv, needle", [
    (["--quant", "q8_0,q9"], "q9"),
    (["--quant", "q8_0,q4_0", "-o", "x.gguf"], "names a folder"),
    (["--quant", "f16", "--calibrate", "--split-max-tensors", "9"], "not f16"),
])
def test_usage_errors(model, tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    rc, err = cli(capsys, "convert", str(model), *argv)
    one_line(rc, err, 2, needle)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").rglob("*.gguf"))


def test_interrupt_leaves_no_output_and_keeps_old_files(model, tmp_path, monkeypatch):
    """Ctrl-C after some chunks of every level are written: no level appears, the old files stay."""
    import alpaca_local.convert.pipeline as pipeline

    out = tmp_path / "out"
    out.mkdir()
    (out / "tiny.Q8_0.gguf").write_bytes(b"old model")
    calls = {"n": 0}
    real = pipeline.quantize_rows

    def interrupted(rows, ggml_type, imatrix=None):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(rows, ggml_type, imatrix)

    monkeypatch.setattr(pipeline, "quantize_rows", interrupted)
    rc = main(["convert", str(model), "--quant", "q8_0,q4_0,q4_k_m", "-o", str(out), "--force", "--threads", "1",
               "--json"])
    assert rc == 130 and calls["n"] >= 20  # the tasks already queued finish
    assert sorted(p.name for p in out.iterdir()) == ["tiny.Q8_0.gguf"]
    assert (out / "tiny.Q8_0.gguf").read_bytes() == b"old model"


def test_failure_leaves_no_folder_it_created(model, tmp_path, monkeypatch, capsys):
    import errno

    import alpaca_local.convert.pipeline as pipeline

    def disk_full(rows, ggml_type, imatrix=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "quantize_rows", disk_full)
    rc, err = cli(capsys, "convert", str(model), "--quant", "q8_0,q4_0", "-o", str(tmp_path / "new"))
    one_line(rc, err, 1, "disk full", "nothing was written")
    assert not (tmp_path / "new").exists()
    assert leftovers(tmp_path) == []


def test_calibrate_computes_one_imatrix_for_every_level(tmp_path, capsys, monkeypatch):
    """--calibrate with several levels: one calibration run, every quantized level quantized with its imatrix."""
    import shutil

    import gguf

    import reference
    from alpaca_local.measure import calibrate

    model = tinymodels.build_llama(tmp_path / "tiny")
    runs, kept = [], tmp_path / "kept.imatrix.gguf"
    real = calibrate.write_imatrix

    def keep(imatrix, path):
        runs.append(path)
        real(imatrix, path)
        shutil.copy(path, kept)

    monkeypatch.setattr(calibrate, "write_imatrix", keep)
    levels = ["f16", "q4_0", "q4_k_m"]
    rc, err = cli(capsys, "convert", str(model.path), "--quant", ",".join(levels), "--calibrate",
                  "-o", str(tmp_path / "out"), "--json")
    assert rc == 0, err
    assert len(runs) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", *(
        f"tiny.{QUANT_FILE_SUFFIX[q]}.gguf" for q in sorted(levels))]
    for q in ("q4_0", "q4_k_m"):
        ours = tmp_path / "out" / f"tiny.{QUANT_FILE_SUFFIX[q]}.gguf"
        single = convert(model.path, tmp_path / f"single.{q}.gguf", q, imatrix=kept).output
        assert reference.tensor_table(ours) == reference.tensor_table(single), q
        assert gguf.GGUFReader(ours).fields["quantize.imatrix.file"].contents() == "calibrate:built-in text"
    assert "quantize.imatrix.file" not in gguf.GGUFReader(tmp_path / "out" / "tiny.F16.gguf").fields


def test_adapter_gguf_is_one_more_output(tmp_path, capsys):
    """--adapter-gguf: the adapter file convert ADAPTER --base BASE writes, beside the merged levels."""
    base = tinymodels.build_llama(tmp_path / "base").path
    adapter = pa.make_adapter(base, tmp_path / "my-lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "out"
    rc = main(["convert", str(base), "--lora", str(adapter), "--quant", "q8_0,q4_0", "--adapter-gguf", "-o", str(out),
               "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "my-lora.Q4_0.gguf", "my-lora.Q8_0.gguf",
                                                     "my-lora.lora.F16.gguf"]
    assert main(["convert", str(adapter), "--base", str(base), "-o", str(tmp_path / "alone.gguf"), "--json"]) == 0
    assert (out / "my-lora.lora.F16.gguf").read_bytes() == (tmp_path / "alone.gguf").read_bytes()
    assert json.loads(captured.out)["adapter_ggufs"][0]["outtype"] == "f16"
    assert "| LoRA adapter (F16) | [my-lora.lora.F16.gguf]" in (out / "README.md").read_text()


def test_an_adapter_llama_cpp_cannot_apply_is_refused_before_the_levels(tmp_path, capsys):
    base = tinymodels.build_llama(tmp_path / "base").path
    dora = pa.make_adapter(base, tmp_path / "dora", r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    out = tmp_path / "out"
    rc, err = cli(capsys, "convert", str(base), "--lora", str(dora), "--quant", "q8_0,q4_0", "--adapter-gguf",
                  "-o", str(out))
    one_line(rc, err, 1, "DoRA")
    assert not out.exists()


def test_adapter_gguf_needs_lora(model, capsys):
    rc, err = cli(capsys, "convert", str(model), "--quant", "q8_0,q4_0", "--adapter-gguf")
    one_line(rc, err, 2, "--lora")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_mid_write_leaves_nothing(sig, tmp_path):
    """A real signal while every level's temp file is being written: none is left, nor the folder the run made."""
    import os
    import signal
    import subprocess
    import sys
    import time

    model = tinymodels.build_llama(tmp_path / "slow", hidden=768, n_layer=4, n_head=12, n_kv_head=4,
                                   intermediate=2048).path  # as test_hostile's slow_model: seconds on one thread
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "alpaca_local", "convert", str(model), "-o", str(out),
                             "--quant", "q8_0,q4_k_m,q5_k_m", "--threads", "1", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    deadline = time.monotonic() + 60
    try:
        while True:
            partial = [p for p in out.iterdir() if ".partial" in p.name] if out.exists() else []
            if len(partial) == 3 and min(p.stat().st_size for p in partial) > 256 * 1024:
                break
            assert proc.poll() is None, "ended before it could be interrupted: " + proc.stderr.read()
            assert time.monotonic() < deadline, "no temp files appeared"
            time.sleep(0.005)
        proc.send_signal(getattr(signal, sig))
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    one_line(proc.returncode, stderr, 130, "interrupted")
    assert not out.exists()

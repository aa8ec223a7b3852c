"""The imatrix commands as a user runs them: `imatrix`, `convert --imatrix`, `convert --calibrate`;
bad imatrix files and interruptions give one line, a non-zero exit and no output file."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from alpaca_local.convert.imatrix_file import Imatrix, ImatrixEntry, read_imatrix, write_imatrix
from alpaca_local.measure.imatrix import ImatrixRun
from helpers import cli, leftovers, one_line


@pytest.fixture(scope="module")
def good_imatrix(tiny_gguf_f16, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imatrix") / "tiny.imatrix.gguf"
    from alpaca_local.cli.main import main

    assert main(["imatrix", str(tiny_gguf_f16), "-c", "64", "--chunks", "2", "-o", str(out), "--json"]) == 0
    return out


def test_imatrix_writes_llama_cpp_format(good_imatrix):
    r = gguf.GGUFReader(good_imatrix)
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.datasets"].contents() == ["alpaca-local:calibration.txt"]
    assert r.fields["imatrix.chunk_count"].contents() == 2 and r.fields["imatrix.chunk_size"].contents() == 64
    assert "general.architecture" not in r.fields
    names = [t.name for t in r.tensors]
    assert names[:2] == ["blk.0.attn_k.weight.in_sum2", "blk.0.attn_k.weight.counts"]
    counts = {t.name: float(np.asarray(t.data).reshape(-1)[0]) for t in r.tensors if t.name.endswith(".counts")}
    assert set(counts.values()) == {128.0}


def test_imatrix_json_and_refuses_to_overwrite(tiny_gguf_f16, good_imatrix, capsys):
    rc, err = cli(capsys, "imatrix", str(tiny_gguf_f16), "-c", "64", "--chunks", "2", "-o", str(good_imatrix))
    one_line(rc, err, 2, "already exists", "--force")


def test_imatrix_text_too_short(tiny_gguf_f16, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("Only a few words here.")
    rc, err = cli(capsys, "imatrix", str(tiny_gguf_f16), "--text", str(text), "-c", "64", "-o", str(tmp_path / "o.gguf"))
    one_line(rc, err, 1, "tokens", "at least 128")
    assert leftovers(tmp_path) == []


def test_ctrl_c_saves_a_partial_file_marked_partial(tiny_gguf_f16, tmp_path, capsys, monkeypatch):
    """Ctrl-C inside llama.cpp's graph (it lands in our eval callback) stops the decode; the chunk in
    flight is dropped, the finished ones are saved under .partial, never under OUT."""
    from alpaca_local.measure.imatrix import Collector

    real = Collector._collect
    calls = []

    def collect_then_interrupt(self, t):
        calls.append(1)
        if len(calls) == 2 * 14 + 5:  # 14 weights per chunk: mid-way through the third chunk
            raise KeyboardInterrupt
        return real(self, t)

    monkeypatch.setattr(Collector, "_collect", collect_then_interrupt)
    out = tmp_path / "x.imatrix.gguf"
    rc, err = cli(capsys, "imatrix", str(tiny_gguf_f16), "-c", "64", "--chunks", "4", "-o", str(out))
    assert rc == 130 and "PARTIAL" in err and "2 of 4 chunks" in err
    assert not out.exists()
    assert len(calls) == 2 * 14 + 5  # the graph stopped at the next node
    partial = read_imatrix(tmp_path / "x.imatrix.partial.gguf")
    assert partial.partial and partial.chunk_count == 2
    assert {int(e.counts[0]) for e in partial.entries.values()} == {128}


# -- convert --imatrix with bad files ------------------------------------------------------


def _entries(path: Path) -> Imatrix:
    return read_imatrix(path)


def _legacy_bytes(imat: Imatrix) -> bytes:
    out = struct.pack("<i", len(imat.entries))
    for name, e in sorted(imat.entries.items()):
        vals = e.sums.astype("<f4").reshape(-1)
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", int(e.counts[0]), vals.size) + vals.tobytes()
    return out


def _bad_files(good: Path, tmp: Path, model_gguf: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    imat = _entries(good)
    files: dict[str, tuple[Path, tuple[str, ...]]] = {}

    def variant(label: str, change, *needles: str) -> None:
        copy = Imatrix({k: ImatrixEntry(v.sums.copy(), v.counts.copy()) for k, v in imat.entries.items()},
                       imat.datasets, imat.chunk_count, imat.chunk_size)
        change(copy)
        write_imatrix(copy, tmp / f"{label}.gguf")
        files[label] = (tmp / f"{label}.gguf", needles)

    variant("wrong-name", lambda m: m.entries.__setitem__("blk.9.attn_q.weight", m.entries.pop("blk.0.attn_q.weight")),
            "blk.9.attn_q.weight", "different model")
    variant("wrong-length", lambda m: m.entries.__setitem__(
        "blk.0.ffn_down.weight", ImatrixEntry(np.ones((1, 256), np.float32), np.array([8]))), "ffn_down", "256 values")
    variant("nan", lambda m: m.entries["blk.1.attn_v.weight"].sums.__setitem__((0, 3), np.nan), "attn_v", "NaN")
    truncated = tmp / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:-100])
    files["truncated"] = (truncated, ("truncated",))
    files["model-file"] = (model_gguf, ("not an imatrix",))
    legacy = _legacy_bytes(imat)
    (tmp / "legacy-truncated.dat").write_bytes(legacy[: len(legacy) // 2])
    files["legacy-truncated"] = (tmp / "legacy-truncated.dat", ("truncated",))
    (tmp / "garbage.dat").write_bytes(b"\x05\x00\x00\x00" + b"\xff" * 40)
    files["garbage"] = (tmp / "garbage.dat", ("not an imatrix",))
    return files


@pytest.mark.parametrize("label", ["wrong-name", "wrong-length", "nan", "truncated", "model-file",
                                   "legacy-truncated", "garbage"])
def test_bad_imatrix_is_one_line_and_writes_nothing(label, tiny_model, tiny_gguf_f16, good_imatrix, tmp_path, capsys):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    path, needles = _bad_files(good_imatrix, bad_dir, tiny_gguf_f16)[label]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc, err = cli(capsys, "convert", str(tiny_model.path), "-o", str(out_dir / "m.gguf"), "--imatrix", str(path))
    one_line(rc, err, 1, *needles)
    assert leftovers(out_dir) == []


def test_imatrix_with_f16_is_a_usage_error(tiny_model, good_imatrix, tmp_path, capsys):
    rc, err = cli(capsys, "convert", str(tiny_model.path), "-o", str(tmp_path / "m.gguf"), "--quant", "f16",
                  "--imatrix", str(good_imatrix))
    one_line(rc, err, 2, "not f16")


def test_convert_with_our_imatrix_records_it(tiny_model, good_imatrix, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert cli(capsys, "convert", str(tiny_model.path), "-o", str(out), "--imatrix", str(good_imatrix), "--json")[0] == 0
    r = gguf.GGUFReader(out)
    assert r.fields["quantize.imatrix.file"].contents() == str(good_imatrix)
    assert r.fields["quantize.imatrix.dataset"].contents() == "alpaca-local:calibration.txt"
    assert r.fields["quantize.imatrix.entries_count"].contents() == 14
    assert r.fields["quantize.imatrix.chunks_count"].contents() == 2


# -- convert --calibrate -----------------------------------------------------------------------


def test_calibrate_in_one_command_and_leaves_no_temporaries(tiny_model, tmp_path, capsys):
    out = tmp_path / "m.Q4_K_M.gguf"
    rc, err = cli(capsys, "convert", str(tiny_model.path), "-o", str(out), "--calibrate", "--json")
    assert rc == 0, err
    r = gguf.GGUFReader(out)
    assert r.fields["quantize.imatrix.file"].contents() == "calibrate:built-in text"
    assert r.fields["quantize.imatrix.chunks_count"].contents() >= 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Q4_K_M.gguf"]


def test_calibrate_failure_and_ctrl_c_leave_nothing(tiny_model, tmp_path, capsys, monkeypatch):
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate on.")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc, err = cli(capsys, "convert", str(tiny_model.path), "-o", str(out_dir / "m.gguf"), "--calibrate", str(short))
    one_line(rc, err, 1, "tokens")
    assert list(out_dir.iterdir()) == []

    def interrupted(self, chunks, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(ImatrixRun, "run", interrupted)
    rc, err = cli(capsys, "convert", str(tiny_model.path), "-o", str(out_dir / "m.gguf"), "--calibrate")
    assert rc == 130 and "interrupted" in err
    assert list(out_dir.iterdir()) == []


def test_calibrate_refuses_existing_output_before_any_work(tiny_model, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    rc, err = cli(capsys, "convert", str(tiny_model.path), "-o", str(out), "--calibrate")
    one_line(rc, err, 2, "already exists")
    assert out.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# -- quality: plain and imatrix side by side -----------------------------------------------------


def test_quality_measures_plain_and_imatrix_side_by_side(tiny_model, tiny_gguf_f16, good_imatrix, tmp_path, capsys):
    import json

    from alpaca_local.cli.main import main

    text = tmp_path / "eval.txt"
    from alpaca_local.measure.quality import default_text

    text.write_text(default_text())
    argv = ["--quants", "q4_0", "--imatrix", str(good_imatrix), "--text", str(text), "--ctx", "64",
            "--threads", "1", "--gen-tokens", "2", "--json"]
    assert main(["quality", str(tiny_model.path), "--work", str(tmp_path / "hf"), *argv]) == 0
    levels = {lv["quant"]: lv for lv in json.loads(capsys.readouterr().out)["levels"]}
    assert list(levels) == ["f16", "q4_0", "q4_0+imatrix"]
    assert levels["q4_0+imatrix"]["path"] != levels["q4_0"]["path"]
    assert levels["q4_0+imatrix"]["mean_kld"] != levels["q4_0"]["mean_kld"]
    # From an f16 GGUF, llama.cpp's quantizer is given the same importance: same file as our converter's.
    assert main(["quality", str(tiny_gguf_f16), "--work", str(tmp_path / "gguf"), *argv]) == 0
    from_gguf = {lv["quant"]: lv for lv in json.loads(capsys.readouterr().out)["levels"]}
    import reference

    a, b = (reference.tensor_table(Path(r["q4_0+imatrix"]["path"])) for r in (levels, from_gguf))
    assert a == b


def test_quality_table_prints_the_imatrix_ratio(tiny_model, good_imatrix, tmp_path, capsys):
    from alpaca_local.cli.main import main
    from alpaca_local.measure.quality import default_text

    text = tmp_path / "eval.txt"
    text.write_text(default_text())
    assert main(["quality", str(tiny_model.path), "--work", str(tmp_path / "w"), "--quants", "q4_k_m", "--imatrix",
                 str(good_imatrix), "--text", str(text), "--ctx", "64", "--threads", "1", "--gen-tokens", "0"]) == 0
    out = capsys.readouterr().out
    assert "q4_k_m+imatrix: mean KLD" in out and "x of plain q4_k_m" in out


def test_calibrate_sigterm_leaves_nothing(tiny_model, tmp_path):
    """A real SIGTERM during the imatrix run (the temporary model is complete): exit 130, the folder
    as it was."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    # What the `alpaca-local` console script runs. (Under `python -m alpaca_local` CPython now and
    # then reports the exit as killed by SIGINT (-2) instead of 130; message and cleanup are the same.)
    entry = "import sys; from alpaca_local.cli.main import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", entry, "convert", str(tiny_model.path), "-o",
                             str(out_dir / "m.gguf"), "--calibrate", "--json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out_dir.glob(".alpaca-calibrate-*/calibrate.*.gguf")) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-6000:]
    assert list(out_dir.iterdir()) == []

"""quality --target-size / --also: per-tensor mixes and other GGUF files measured beside the levels.

Real files on the tiny model: the targets are made by the same search `convert --target-size`
runs, the --also files by our own convert.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

import reference
import tinymodels
from alpaca_local.cli import quality_cmd
from alpaca_local.cli.main import main
from alpaca_local.convert.quant_rules import QUANTS
from alpaca_local.convert.search import short_size
from alpaca_local.measure import quality
from test_quality import CTX, TEXT, _one_line_error, text_file  # noqa: F401  (text_file: a fixture)
from test_quality import _run_json as _quality


@pytest.fixture(scope="module")
def mix(tiny_model, tmp_path_factory) -> Path:
    """A file of `convert --target-size 900K`, as a user makes it."""
    out = tmp_path_factory.mktemp("mix") / "mine.gguf"
    assert main(["convert", str(tiny_model.path), "--target-size", "900K", "-o", str(out), "--json"]) == 0
    return out


def test_target_rows_are_made_as_convert_makes_them_and_kept(tiny_model, mix: Path, text_file: Path,
                                                             tmp_path: Path, capsys) -> None:
    work = tmp_path / "work"
    argv = [str(tiny_model.path), "--quants", "q4_k_m", "--target-size", "900K,Q4_K_M", "--text", str(text_file),
            "--work", str(work)]
    report = _quality(capsys, *argv)
    rows = report["levels"]
    level = rows[1]
    assert [r["kind"] for r in rows] == ["level", "level", "target", "target"]
    by_size, at_level = rows[2], rows[3]
    # "q4_k_m" as a target: the exact size of our own q4_k_m file
    assert at_level["target_of"] == "q4_k_m" and at_level["target_bytes"] == level["size_bytes"]
    assert by_size["target_bytes"] == 900_000 and "target_of" not in by_size
    for row in (by_size, at_level):
        assert row["quant"] == f"target-{short_size(row['target_bytes'])}"
        assert row["size_bytes"] == Path(row["path"]).stat().st_size <= row["target_bytes"]
        assert row["nearest_level"] in QUANTS and math.isfinite(row["perplexity"])
        assert 0 < row["mean_kld"] <= row["kld_p99"] and 0 < row["same_top"] < 1
    # the same bytes as the file `convert --target-size 900K` wrote
    reference.assert_same_tensors(Path(by_size["path"]), mix)
    # kept in --work and reused; converted again once the checkpoint is newer
    mtimes = {p.name: p.stat().st_mtime_ns for p in work.glob("*.gguf")}
    assert len(mtimes) == 4
    again = _quality(capsys, *argv)
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("*.gguf")} == mtimes
    assert again["levels"][2]["mean_kld"] == pytest.approx(by_size["mean_kld"])
    newer = max(mtimes.values()) / 1e9 + 10
    files = list(tiny_model.path.iterdir())
    kept = [(f, f.stat()) for f in files]
    try:
        for f in files:
            os.utime(f, (newer, newer))
        _quality(capsys, *argv)
    finally:  # the checkpoint is shared: test_quality's reuse test must see it as it was
        for f, st in kept:
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert all(p.stat().st_mtime_ns != mtimes[p.name] for p in work.glob("*.gguf"))


def test_also_files_beside_the_levels(tiny_model, tiny_gguf: Path, mix: Path, text_file: Path, tmp_path: Path,
                                      capsys) -> None:
    """Any GGUF of the model as it is: named by its file, or as a mix when it carries the recipe."""
    report = _quality(capsys, str(tiny_model.path), "--quants", "q8_0", "--also", f"{tiny_gguf},{mix}",
                      "--text", str(text_file), "--work", str(tmp_path / "w"))
    plain, target = report["levels"][2:]
    assert plain["quant"] == tiny_gguf.name.removesuffix(".gguf") and plain["kind"] == "file"
    assert "target_bytes" not in plain and plain["path"] == str(tiny_gguf)
    assert target["quant"] == "target-900K" and target["kind"] == "file" and target["target_bytes"] == 900_000
    # our q8_0 from the folder and the --also q8_0 file are the same bytes: the same scores
    assert plain["mean_kld"] == pytest.approx(report["levels"][1]["mean_kld"], rel=1e-9)
    assert plain["size_bytes"] == report["levels"][1]["size_bytes"]


def test_also_rows_of_one_name_take_their_folders() -> None:
    paths = [Path("a/m.Q4_K_M.gguf"), Path("b/m.Q4_K_M.gguf"), Path("c/q8_0.gguf")]
    assert quality.distinct_labels(["m.Q4_K_M", "m.Q4_K_M", "q8_0"], paths) == ["a/m.Q4_K_M", "b/m.Q4_K_M", "q8_0"]
    assert quality.distinct_labels([], []) == []


def test_also_refuses_another_models_file(tiny_model, text_file: Path, tmp_path: Path, capsys) -> None:
    other = tinymodels.build_llama(tmp_path / "other", add_pad=False)  # one token fewer
    from alpaca_local.convert.pipeline import convert

    stranger = convert(other.path, tmp_path / "other.Q8_0.gguf", "q8_0").output
    work = tmp_path / "w"
    _one_line_error(capsys, [str(tiny_model.path), "--quants", "q8_0", "--also", str(stranger),
                             "--text", str(text_file), "--ctx", str(CTX), "--work", str(work)],
                    1, "give a GGUF of the same model")
    assert [p.name for p in work.glob("*.gguf")] == [f"{tiny_model.path.name}.F16.gguf"]  # no level made
    _one_line_error(capsys, [str(tiny_model.path), "--also", str(text_file), "--work", str(work)], 1,
                    "is not a GGUF file")
    _one_line_error(capsys, [str(tiny_model.path), "--also", str(tmp_path / "none.gguf")], 1, "does not exist")


@pytest.mark.parametrize("spec, message", [
    ("q3_k_xl", "neither a size"),
    ("4.2X", "is not a size"),
    ("10", "the smallest file this model can be"),
    ("10G", "more than the f16 file"),
    (",", "names no size"),
])
def test_bad_targets_are_one_line(tiny_model, tmp_path: Path, capsys, spec: str, message: str) -> None:
    _one_line_error(capsys, [str(tiny_model.path), "--target-size", spec, "--work", str(tmp_path)], 2, message)
    assert not list(tmp_path.iterdir())  # refused before anything was converted


def test_target_from_an_f16_gguf_is_refused(tiny_gguf_f16: Path, tmp_path: Path, capsys) -> None:
    _one_line_error(capsys, [str(tiny_gguf_f16), "--target-size", "900K", "--work", str(tmp_path)], 2,
                    "needs the Hugging Face folder")


@pytest.fixture(scope="module")
def report(tiny_model, mix: Path, tmp_path_factory) -> quality.QualityReport:
    work = tmp_path_factory.mktemp("report")
    return quality.measure_quality(tiny_model.path, ["q4_k_m"], TEXT, CTX, work, threads=1, gen_tokens=0,
                                   targets=[quality.SizeTarget("900K", nbytes=900_000)], also=[mix],
                                   imatrix=None)


@pytest.mark.parametrize("width", [80, 200])
def test_table_names_the_mixes(report: quality.QualityReport, width: int) -> None:
    from rich.console import Console

    console = Console(width=width, force_terminal=True, record=True)
    quality_cmd._print_table(report, console)
    text = console.export_text()
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines)
    rows = [line.split() for line in lines  # the table's rows, not the notes under it ("target 900K: ...")
            if line.split()[:1] in (["f16"], ["q4_k_m"], ["target"]) and not line.split()[1].endswith(":")]
    assert [r[0] for r in rows] == ["f16", "q4_k_m", "target", "target"], text
    assert [r[1] for r in rows[2:]] == ["900K", "900K"]  # made here, and the --also file: whole, not cut
    assert sum("per-tensor mix for 900,000 bytes" in line for line in lines) == 2
    assert all(("±" in r) == (width == 200) for r in rows)  # at 80 columns the same rows without the ±


def test_plot_marks_the_targets(report: quality.QualityReport, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    legends: list[list[str]] = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (legends.extend(
        [t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes if ax.get_legend()), close(fig)))
    png = tmp_path / "q.png"
    quality_cmd.write_plot(report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mean KLD, size targets" in legends[0] and "mean KLD, plain" in legends[0]

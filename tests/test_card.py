"""The model card (README.md) of `convert --quant a,b,...`: facts of the run, measured figures only.

Its quality figures must be the ones `quality --json` reports for the same files (run
separately, on llama.cpp's own quantization of the f16), its sizes the files' sizes, its
license the source card's, and nothing it was not given may appear in it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import peft_adapters as pa
import tinymodels
from helpers import cli, one_line
from test_hub import hub, models  # noqa: F401  (the fake Hub fixture and its models)

from alpaca_local.cli.main import main
from alpaca_local.convert.quant_rules import QUANT_FILE_SUFFIX
from alpaca_local.template import PREAMBLE


def _front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _table(card: str, heading: str) -> list[list[str]]:
    """The rows of the first table after `## heading`."""
    section = card.split(f"## {heading}\n", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    out = []
    for line in rows[2:]:
        out.append([cell.strip() for cell in line.strip("|").split("|")])
        if not section.split(line, 1)[1].lstrip("\n").startswith("|"):
            break
    return out


def _convert(capsys, *argv) -> dict:
    rc = main(["convert", *argv, "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tinymodels.build_llama(tmp_path_factory.mktemp("card") / "tiny", n_layer=4).path
    (path / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n# tiny\nA tiny model.\n")
    return path


TEXT = ("The river runs past the mill and the old stone bridge, where the children count the boats. "
        "Bakers carry bread to the tables, and the fishmonger sets out ice before the sun is high. ") * 30


@pytest.fixture(scope="module")
def measured(model, tmp_path_factory):
    """convert --quant f16,q8_0,q4_k_m --card-quality --card-text TEXT: (folder, card, work folder)."""
    work = tmp_path_factory.mktemp("measured")
    text = work / "text.txt"
    text.write_text(TEXT)
    out = work / "out"
    rc = main(["convert", str(model), "--quant", "f16,q8_0,q4_k_m", "-o", str(out), "--card-quality",
               "--card-text", str(text), "--threads", "1", "--json"])
    assert rc == 0
    return out, (out / "README.md").read_text(), work


def test_card_figures_are_quality_json(measured, capsys):
    """`quality` run on its own (levels made by llama.cpp's quantizer from the f16) reports the card's figures."""
    out, card, work = measured
    assert main(["quality", str(out / "tiny.F16.gguf"), "--quants", "q8_0,q4_k_m", "--text", str(work / "text.txt"),
                 "--work", str(work / "q"), "--threads", "1", "--gen-tokens", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    by_level = {lv["quant"]: lv for lv in report["levels"]}
    rows = _table(card, "Quality")
    assert [r[0] for r in rows] == ["F16", "Q8_0", "Q4_K_M"]
    for level, bpw, ppl, ratio, kld, p99, top in rows:
        ref = by_level[level.lower()]
        assert float(bpw) == pytest.approx(ref["bits_per_weight"], abs=0.005)
        assert float(ppl) == pytest.approx(ref["perplexity"], abs=5e-5)
        assert float(ratio) == pytest.approx(ref["ppl_ratio"], abs=5e-5)
        assert float(kld) == pytest.approx(ref["mean_kld"], abs=5e-6)
        assert float(p99) == pytest.approx(ref["kld_p99"], abs=5e-5)
        assert float(top.rstrip("%")) == pytest.approx(100 * ref["same_top"], abs=0.005)
    assert by_level["q4_k_m"]["mean_kld"] > 0  # a real measurement, not zeros
    assert f"{report['chunks']} chunks of {report['n_ctx']} tokens, {report['scored_tokens']} scored tokens" in card


def test_card_sizes_files_and_front_matter(measured):
    out, card, _ = measured
    meta = _front_matter(card)
    assert meta["library_name"] == "gguf" and meta["quantized_by"] == "alpaca-local"
    assert meta["license"] == "apache-2.0"  # carried over from the source's README
    assert "base_model" not in meta  # a local folder: no Hub id to name
    assert {"gguf", "llama"} <= set(meta["tags"])
    rows = _table(card, "Files")
    for level, file_cell, size in rows:
        name = re.search(r"\[([^\]]+)\]", file_cell).group(1)
        assert name == f"tiny.{level}.gguf"
        assert int(size.split(" bytes")[0].replace(",", "")) == (out / name).stat().st_size
    assert "`apache-2.0`, carried over from the source's model card" in card
    assert PREAMBLE in card and "### Response:" in card
    assert "## Importance matrix" not in card  # none was used
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "tiny.F16.gguf", "tiny.Q4_K_M.gguf", "tiny.Q8_0.gguf"]


def test_measured_against_an_f16_that_is_not_published(model, measured, tmp_path, capsys):
    """Without f16 among the levels, its f16 is one more output of the same read, measured on and removed."""
    _, card_with_f16, work = measured
    out = tmp_path / "out"
    _convert(capsys, str(model), "--quant", "q8_0,q4_k_m", "-o", str(out), "--card-quality",
             "--card-text", str(work / "text.txt"), "--threads", "1")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "tiny.Q4_K_M.gguf", "tiny.Q8_0.gguf"]
    card = (out / "README.md").read_text()
    assert "not published" in card
    assert _table(card, "Quality") == _table(card_with_f16, "Quality")[1:]  # the same f16, the same figures


def test_no_quality_no_figures(model, tmp_path, capsys):
    summary = _convert(capsys, str(model), "--quant", "q8_0,q4_0", "-o", str(tmp_path / "out"))
    card = (tmp_path / "out" / "README.md").read_text()
    assert summary["card"] == str(tmp_path / "out" / "README.md") and "quality" not in summary
    assert "## Quality" not in card and "KLD" not in card and "PPL" not in card


def test_imatrix_and_adapter_are_named(tmp_path, capsys):
    from test_imatrix_convert import synthetic_imatrix

    from alpaca_local.convert.imatrix_file import write_imatrix
    from alpaca_local.convert.pipeline import convert

    base = tinymodels.build_llama(tmp_path / "base").path
    adapter = pa.make_adapter(base, tmp_path / "my-lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    imatrix = tmp_path / "imatrix.gguf"
    write_imatrix(synthetic_imatrix(convert(base, tmp_path / "f16.gguf", "f16").output), imatrix)
    _convert(capsys, str(base), "--lora", str(adapter), "--lora-scale", "0.5", "--imatrix", str(imatrix),
             "--quant", "q8_0,q4_k_m", "-o", str(tmp_path / "out"))
    card = (tmp_path / "out" / "README.md").read_text()
    meta = _front_matter(card)
    assert {"lora-merged", "imatrix"} <= set(meta["tags"])
    assert "`my-lora`, scale ×0.5" in card
    assert f"- file: `{imatrix}`" in card and "- computed on: `calibration.txt`" in card
    assert "license" not in meta and "does not state a license" in card


def test_a_hub_source_is_the_base_model(hub, tmp_path, capsys):  # noqa: F811
    _convert(capsys, "me/tiny", "--quant", "q8_0,q4_0", "-o", str(tmp_path / "out"))
    card = (tmp_path / "out" / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["base_model"] == ["me/tiny"] and meta["base_model_relation"] == "quantized"
    assert f"at commit `{hub.repos['me/tiny'].commit}`" in card


@pytest.mark.parametrize("readme", [
    "---\nlicense: \"apache-2.0\\n---\\nevil: yes\"\n---\n",  # not a plain license token
    "---\nlicense: [a, b]\n---\n",
    "---\nlicense: : : :\n---\n",  # not YAML
    "no front matter at all",
    "---\nlicense: mit\n---\n" + "x" * (1 << 20),  # too large to be read
])
def test_a_strange_source_card_states_no_license(tmp_path, readme):
    from alpaca_local.publish.card import source_license

    (tmp_path / "README.md").write_text(readme)
    assert source_license(tmp_path) == (None, None, None)


def test_an_existing_card_needs_force(model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("mine")
    rc, err = cli(capsys, "convert", str(model), "--quant", "q8_0,q4_0", "-o", str(out))
    one_line(rc, err, 2, "README.md", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]  # refused before any level was written
    assert (out / "README.md").read_text() == "mine"


def test_card_text_needs_card_quality(model, tmp_path, capsys):
    rc, err = cli(capsys, "convert", str(model), "--quant", "q8_0,q4_0", "--card-text", str(tmp_path / "t.txt"))
    one_line(rc, err, 2, "--card-quality")


def test_single_level_with_card_quality_gets_a_folder(model, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    _convert(capsys, str(model), "--quant", "q4_0", "-o", str(tmp_path / "out"), "--card-quality",
             "--card-text", str(text), "--threads", "1")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", f"tiny.{QUANT_FILE_SUFFIX['q4_0']}.gguf"]


def test_the_source_folder_is_not_an_output_folder(tmp_path, capsys):
    model = tinymodels.build_llama(tmp_path / "tiny").path
    (model / "README.md").write_text("the source's own card")
    rc, err = cli(capsys, "convert", str(model), "--quant", "q8_0,q4_0", "-o", str(model), "--force")
    one_line(rc, err, 2, "is the source folder")
    assert (model / "README.md").read_text() == "the source's own card"

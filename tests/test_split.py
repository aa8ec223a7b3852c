"""--split-max-size / --split-max-tensors: llama.cpp's split format, as llama-gguf-split writes it.

The parts are compared byte for byte with `llama-gguf-split --split` run on the single file
(built from the vendored sources), `llama-gguf-split --merge` must give the single file back,
and llama.cpp, plan, chat, serve and quality load the parts directly.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

import tinymodels
from helpers import cli, one_line
from servers import Server

from alpaca_local.cli.main import main
from alpaca_local.convert import split
from alpaca_local.convert.levels import layout, plan_levels, write_levels
from alpaca_local.convert.pipeline import convert
from alpaca_local.errors import InputError, UsageError


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tinymodels.build_llama(tmp_path_factory.mktemp("split") / "tiny", n_layer=4).path


@pytest.fixture(scope="module")
def single(model, tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("single")
    return {q: convert(model, work / f"tiny.{q}.gguf", q).output for q in ("f16", "q8_0", "q4_k_m")}


@pytest.fixture(scope="module")
def parts(model, tmp_path_factory) -> dict[str, list[Path]]:
    """q8_0 and f16 in parts of at most 1 MB of tensor data, written in one run."""
    out = tmp_path_factory.mktemp("parts")
    assert main(["convert", str(model), "--quant", "q8_0,f16", "-o", str(out), "--split-max-size", "1M", "--json"]) == 0
    return {q: sorted(out.glob(f"tiny.{q.upper()}-*.gguf")) for q in ("q8_0", "f16")}


def _gguf_split() -> Path:
    from llama_tools import llama_tool

    return llama_tool("llama-gguf-split")


# -- the rule and the names ------------------------------------------------------------------


@pytest.mark.parametrize("sizes, rule, expected", [
    ([32, 32, 32], split.SplitRule(max_bytes=64), [0, 0, 1]),  # exactly full stays, one more byte moves on
    ([32, 64, 32, 32], split.SplitRule(max_bytes=96), [0, 0, 1, 1]),
    ([96, 32, 96], split.SplitRule(max_bytes=96), [0, 1, 2]),
    ([32] * 5, split.SplitRule(max_tensors=2), [0, 0, 1, 1, 2]),
    ([32] * 4, split.SplitRule(max_tensors=4), [0, 0, 0, 0]),
    ([32] * 3, split.SplitRule(max_tensors=1), [0, 1, 2]),
])
def test_parts_follow_gguf_split_rule(sizes, rule, expected):
    assert split.part_of_each(sizes, [f"t{i}" for i in range(len(sizes))], rule) == expected


def test_a_tensor_over_the_size_limit_is_refused():
    with pytest.raises(UsageError, match="tensor big .* more than --split-max-size"):
        split.part_of_each([32, 128], ["small", "big"], split.SplitRule(max_bytes=64))


@pytest.mark.parametrize("text, n", [("45G", 45 * 10**9), ("500M", 500 * 10**6), ("2g", 2 * 10**9), ("7GB", 7 * 10**9)])
def test_sizes_are_decimal_as_gguf_split(text, n):
    assert split.parse_size(text) == n


@pytest.mark.parametrize("text", ["0G", "1.5G", "45", "45T", "-1G", "G", ""])
def test_bad_sizes_are_usage_errors(text):
    with pytest.raises(UsageError):
        split.parse_size(text)


def test_part_names_are_llama_split_path(tmp_path):
    """Our names equal llama.cpp's own llama_split_path (src/llama.cpp:545), called through llama-cpp-python."""
    import llama_cpp

    prefix = tmp_path / "tiny.Q8_0"
    for no, count in ((0, 3), (2, 3), (0, 1), (41, 120)):
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_split_path(buf, len(buf), str(prefix).encode(), no, count)
        assert split.part_path(prefix, no, count) == Path(buf.value[:n].decode())
    assert split.part_paths(tmp_path / "tiny.Q8_0.gguf", 1) == [tmp_path / "tiny.Q8_0.gguf"]


# -- what we write ---------------------------------------------------------------------------


def test_parts_hold_the_single_files_tensors(parts, single):
    """Every part is a GGUF of its own; together they hold the single file's tensors, bytes and metadata."""
    for q, files in parts.items():
        assert len(files) > 2
        whole = {t.name: bytes(t.data) for t in gguf.GGUFReader(single[q]).tensors}
        got = {}
        for i, f in enumerate(files):
            r = gguf.GGUFReader(f)
            assert r.fields["split.no"].contents() == i
            assert r.fields["split.count"].contents() == len(files)
            assert r.fields["split.tensors.count"].contents() == len(whole)
            assert ("general.architecture" in r.fields) == (i == 0)  # metadata in the first part only
            got.update({t.name: bytes(t.data) for t in r.tensors})
        assert list(got) == list(whole) and got == whole


@pytest.mark.integration
@pytest.mark.parametrize("quant, flags", [
    ("q8_0", ["--split-max-size", "1M"]),
    ("f16", ["--split-max-size", "1M"]),
    ("q4_k_m", ["--split-max-tensors", "10"]),
])
def test_parts_are_what_llama_gguf_split_writes(model, single, tmp_path, quant, flags):
    ours = tmp_path / "ours"
    ours.mkdir()
    assert main(["convert", str(model), "--quant", quant, "-o", str(ours / "m.gguf"), *flags, "--json"]) == 0
    ref = tmp_path / "ref"
    ref.mkdir()
    subprocess.run([str(_gguf_split()), "--split", *flags, str(single[quant]), str(ref / "m")],
                   check=True, capture_output=True)
    names = sorted(p.name for p in ours.iterdir())
    assert names == sorted(p.name for p in ref.iterdir()) and len(names) > 1
    for name in names:
        assert (ours / name).read_bytes() == (ref / name).read_bytes(), name


def _without_split_keys(path: Path) -> bytes:
    """The file with its three split.* keys taken out of the metadata (and the header re-padded):
    what `llama-gguf-split --merge` adds to a merged file, spelled out."""
    r = gguf.GGUFReader(path)
    data = path.read_bytes()
    drop = [f for k, f in r.fields.items() if k.startswith("split.")]
    assert len(drop) == 3
    header_end = max(int(t.field.offset) + sum(int(p.nbytes) for p in t.field.parts) for t in r.tensors)
    out, at = bytearray(), 0
    for f in sorted(drop, key=lambda f: f.offset):
        out += data[at:f.offset]
        at = f.offset + sum(int(p.nbytes) for p in f.parts)
    out += data[at:header_end]
    out[16:24] = (int.from_bytes(out[16:24], "little") - 3).to_bytes(8, "little")  # n_kv
    out += b"\0" * (-len(out) % 32)
    return bytes(out) + data[r.data_offset:]


@pytest.mark.integration
def test_gguf_split_merge_gives_back_the_single_file(parts, single, tmp_path):
    for q, files in parts.items():
        merged = tmp_path / f"merged.{q}.gguf"
        subprocess.run([str(_gguf_split()), "--merge", str(files[0]), str(merged)], check=True, capture_output=True)
        assert gguf.GGUFReader(merged).fields["split.count"].contents() == 0  # merge's own mark
        assert _without_split_keys(merged) == single[q].read_bytes()


def test_single_level_split_default_names(model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err = cli(capsys, "convert", str(model), "--quant", "q8_0", "--split-max-tensors", "15")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "tiny.Q8_0-00001-of-00003.gguf", "tiny.Q8_0-00002-of-00003.gguf", "tiny.Q8_0-00003-of-00003.gguf"]


@pytest.mark.parametrize("flags, code, needle", [
    (["--split-max-size", "1M", "--split-max-tensors", "3"], 2, "not allowed with"),
    (["--split-max-size", "1.5G"], 2, "not a size"),
    (["--split-max-tensors", "0"], 2, "at least 1"),
    (["--split-max-size", "1M", "-q", "f16", "--split-max-size", "0M"], 2, "not a size"),
])
def test_split_usage_errors(model, tmp_path, capsys, flags, code, needle):
    rc, err = cli(capsys, "convert", str(model), "-o", str(tmp_path / "m.gguf"), *flags)
    one_line(rc, err, code, needle)
    assert list(tmp_path.iterdir()) == []


# -- what reads them -------------------------------------------------------------------------


def test_read_gguf_model_joins_the_parts(parts, single):
    whole, joined = split.read_gguf_model(single["q8_0"]), split.read_gguf_model(parts["q8_0"][0])
    assert [(t.name, t.shape, t.ggml_type, t.nbytes) for t in joined.tensors] == \
        [(t.name, t.shape, t.ggml_type, t.nbytes) for t in whole.tensors]
    assert joined.file_size == sum(p.stat().st_size for p in parts["q8_0"])
    assert [t.part for t in joined.tensors] == sorted(t.part for t in joined.tensors)
    assert joined.header_bytes + sum(-(-t.nbytes // 32) * 32 for t in joined.tensors) == joined.file_size


def test_bad_split_sets_are_one_line_errors(parts, tmp_path):
    import shutil

    files = [shutil.copy(p, tmp_path / p.name) for p in parts["q8_0"]]
    with pytest.raises(InputError, match="give its first part"):
        split.read_gguf_model(files[1])
    Path(files[-1]).unlink()
    with pytest.raises(InputError, match=r"part \d+ of \d+ .* is missing"):
        split.read_gguf_model(files[0])
    shutil.copy(files[1], files[-1])  # a part in the wrong place: its split.no says so
    with pytest.raises(InputError, match="split.no is 1, expected"):
        split.read_gguf_model(files[0])


def test_llama_cpp_loads_the_parts_and_computes_the_same(parts, single):
    import llama_cpp

    from alpaca_local.run.chat import load_llama

    logits = []
    for path in (single["q8_0"], parts["q8_0"][0]):
        llm = load_llama(path, 64, logits_all=True, n_threads=1)
        llm.eval([1, 5, 9, 42, 7])
        logits.append(np.array(llm.scores[:5]))
        llm.close()
    assert np.array_equal(logits[0], logits[1])
    assert llama_cpp  # loaded through llama-cpp-python, as chat, serve and quality do


def test_plan_reads_every_part(parts, single, capsys):
    reports = []
    for path in (single["q8_0"], parts["q8_0"][0]):
        assert main(["plan", str(path), "--vram", "8", "--json"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    a, b = reports
    q8 = [lv for lv in b["levels"] if lv["level"] == "q8_0"][0]
    assert q8["file_bytes"] == sum(p.stat().st_size for p in parts["q8_0"]) and q8["file_bytes_exact"]
    for r in reports:
        r["model"].pop("name")
        for lv in r["levels"]:
            lv.pop("file_bytes") if lv["level"] == "q8_0" else None
    assert a == b  # the same model, placed the same way


def test_chat_answers_the_same_from_the_parts(parts, single, capsys):
    answers = []
    for path in (single["q8_0"], parts["q8_0"][0]):
        assert main(["chat", str(path), "-p", "Name a color.", "-n", "8", "--temp", "0", "--seed", "1"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].strip()


def test_chat_lists_a_split_model_once(parts):
    from alpaca_local.run.chat import _ggufs

    assert sorted(p.name for p in _ggufs(parts["q8_0"][0].parent) if p.name.startswith("tiny.Q8_0")) == [
        parts["q8_0"][0].name]


def test_serve_loads_the_parts(parts):
    srv = Server.serve(parts["q8_0"][0], 64)
    try:
        import urllib.request

        with urllib.request.urlopen(f"{srv.base}/v1/models", timeout=30) as r:
            ids = [m["id"] for m in json.load(r)["data"]]
        assert ids == ["tiny.Q8_0"]  # named after the model, not after its first part
    finally:
        srv.stop()


def test_quality_takes_a_split_f16(parts, single, tmp_path, capsys):
    """quality measures from the split f16 exactly what it measures from the single f16."""
    text = tmp_path / "text.txt"
    text.write_text("The river runs past the mill and the old stone bridge. " * 40)
    reports = []
    for i, path in enumerate((single["f16"], parts["f16"][0])):
        assert main(["quality", str(path), "--quants", "q8_0", "--text", str(text), "--ctx", "32",
                     "--work", str(tmp_path / f"w{i}"), "--gen-tokens", "0", "--threads", "1", "--json"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    keys = ("perplexity", "mean_kld", "kld_p99", "same_top")
    assert [[lv[k] for k in keys] for lv in reports[0]["levels"]] == [[lv[k] for k in keys] for lv in reports[1]["levels"]]
    assert reports[1]["levels"][0]["size_bytes"] == sum(p.stat().st_size for p in parts["f16"])


def test_layout_of_a_level(model, tmp_path):
    (plan,) = plan_levels(model, ["q8_0"])
    out = layout(plan, tmp_path / "x.gguf", split.SplitRule(max_tensors=100))
    assert out.targets == (tmp_path / "x.gguf",)  # one part: the plain file, no split keys
    write_levels([out])
    assert "split.count" not in gguf.GGUFReader(tmp_path / "x.gguf").fields

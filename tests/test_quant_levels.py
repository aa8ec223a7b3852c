"""Every quant level llama.cpp offers: bit-identical to the reference route, loads and decodes.

The reference for each level: `convert_hf_to_gguf.py --outtype f16`, then `llama_model_quantize`
with default parameters (and, where given, the same importance matrix, set up as
`llama-quantize --imatrix` sets it up); for f16/bf16/f32 the converter alone with that
--outtype. For a bf16 source the converter's file is `--outtype f32` instead of f16: we
quantize bf16 and f32 sources from their own values (README, "Exact"), which is llama.cpp's
route through an f32 file; an f16 file would round weights below 2^-14 to f16 subnormals
first. The converter's file is made once per tiny model (a module-wide cache), then one
quantize per level.

The fast suite runs every level once on the LLaMA-with-[PAD] model (with the imatrix where
llama-quantize needs one, without it otherwise) plus a few level/model pairs that exercise
other rules; the whole matrix (every level, five real-layout models, with and without an
imatrix) is the integration test at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import reference
import tinyarch
import tinymodels
from helpers import cli, leftovers, one_line
from test_imatrix_convert import synthetic_imatrix

from alpaca_local.convert.imatrix_file import write_imatrix
from alpaca_local.convert.pipeline import convert
from alpaca_local.convert.quant_levels import KLD_270M, LADDER, LADDER_SOURCE, LEVELS, PPL_8B
from alpaca_local.convert.quant_rules import QUANTS

# The levels a dense model can have; mxfp4_moe only changes expert tensors (refused below).
DENSE = [q for q in QUANTS if not LEVELS[q].experts_only]
IMATRIX_ONLY = [q for q in DENSE if LEVELS[q].imatrix]
UNNAMED_PRE = "not-named-by-the-reference"  # see test_architectures


def _llama_rows_320(d: Path) -> tinymodels.TinyLlama:
    # rows of 320: every 256-block type falls back (IQ* -> IQ4_NL, Q2_K/Q3_K -> Q4_0...)
    return tinymodels.build_llama(d, hidden=320, n_head=5, n_kv_head=1, intermediate=640)


def _llama_rows_320_ffn_512(d: Path) -> tinymodels.TinyLlama:
    # Gemma 3 270M's pattern: rows of the hidden size (320 here, 640 there) fall back from
    # 256-block types, ffn_down's rows (512 here, 2048 there) do not
    return tinymodels.build_llama(d, hidden=320, n_head=5, n_kv_head=1, intermediate=512)


# kind -> (builder, the converter outtype llama-quantize starts from)
BUILDERS = {
    "llama": (tinymodels.build_llama, "f16"),  # GQA (4 heads, 2 KV heads), [PAD], f16
    "llama-rows-320": (_llama_rows_320, "f16"),
    "llama-rows-320-ffn-512": (_llama_rows_320_ffn_512, "f16"),
    "llama3": (tinyarch.build_llama3, "f16"),  # byte-level BPE, rope_freqs, untied output
    "qwen3": (tinyarch.build_qwen3, "f32"),  # bf16, q/k norms, head_dim 96, tied embeddings
    "gemma3": (tinyarch.build_gemma3, "f32"),  # bf16, 6 layers, attn_output rows of 384 need fallbacks
}


class Case:
    """A tiny model, its reference f16 file and an importance matrix for it, in one folder."""

    def __init__(self, kind: str, work: Path) -> None:
        self.kind, self.work = kind, work
        build, self.start = BUILDERS[kind]
        self.path = build(work / f"tiny-{kind}").path
        self.pre = UNNAMED_PRE if kind in ("llama3", "qwen3") else None  # byte-level BPE: see test_architectures
        self.start_file = reference.reference_file(self.path, work, self.start, self.pre)
        self.imatrix = work / "imatrix.gguf"
        write_imatrix(synthetic_imatrix(self.start_file), self.imatrix)

    def reference(self, quant: str, imatrix: bool) -> Path:
        if quant in reference.CONVERTER_OUTTYPES:
            return reference.reference_file(self.path, self.work, quant, self.pre)
        out = self.work / f"ref.{quant}{'.imatrix' if imatrix else ''}.gguf"
        if not out.exists():
            reference.reference_quantize(self.start_file, out, quant, self.imatrix if imatrix else None)
        return out

    def ours(self, quant: str, imatrix: bool) -> Path:
        out = self.work / f"ours.{quant}{'.imatrix' if imatrix else ''}.gguf"
        return convert(self.path, out, quant, force=True, imatrix=self.imatrix if imatrix else None).output


_CASES: dict[str, Case] = {}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    def get(kind: str) -> Case:
        if kind not in _CASES:
            _CASES[kind] = Case(kind, tmp_path_factory.mktemp(kind))
        return _CASES[kind]

    yield get
    _CASES.clear()


def assert_equal_and_decodes(case: Case, quant: str, imatrix: bool) -> None:
    """Ours equals the reference route tensor for tensor (order, type, offset, bytes) and
    metadata for metadata, and llama.cpp loads it and gives finite logits."""
    ours, ref = case.ours(quant, imatrix), case.reference(quant, imatrix)
    reference.assert_same_tensors(ours, ref)
    assert _file_kv(ours) == _file_kv(ref)
    _assert_decodes(ours)


def _file_kv(path: Path) -> dict:
    """The keys llama-quantize sets (or the converter, for its own outtypes)."""
    import gguf

    fields = gguf.GGUFReader(path).fields
    return {k: fields[k].contents() for k in fields if k == "general.file_type" or k.startswith("quantize.")}


def _assert_decodes(path: Path) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, verbose=False, logits_all=True, seed=0)
    ids = llm.tokenize(b"Hello world, this is a test", add_bos=True)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)])
    assert np.isfinite(logits).all() and logits.std() > 0


# --------------------------------------------------------------------------- fast suite

# Non-imatrix levels run without one; the imatrix-only ones with it (and their refusal below).
# bf16 and f32 run on Gemma 3 (a bf16 source), below. Left to the integration matrix: the
# levels whose ggml lattice grids take seconds to build once per process (ggml_quantize_init:
# IQ1_S/IQ1_M ~10 s, IQ2_S ~2.5 s, IQ2_XS ~1.3 s on 2 cores); IQ2_XXS and the IQ3 grids are quick.
SLOW_GRIDS = ("iq1_s", "iq1_m", "iq2_s", "iq2_m", "iq2_xs")
FAST = [(q, q in IMATRIX_ONLY) for q in DENSE if q not in ("bf16", "f32", *SLOW_GRIDS)] + [
    (q, True) for q in ("q4_k_s", "iq4_xs", "q3_k_m")  # the imatrix changes choices and bytes
]


@pytest.mark.reference
@pytest.mark.parametrize(("quant", "imatrix"), FAST, ids=[f"{q}{'-imatrix' if i else ''}" for q, i in FAST])
def test_every_level_equals_reference(case, quant, imatrix):
    assert_equal_and_decodes(case("llama"), quant, imatrix)


@pytest.mark.reference
@pytest.mark.parametrize(("quant", "imatrix"), [
    ("bf16", False),  # a bf16 source: the converter's bf16 keeps its bits
    ("f32", False),
    ("iq3_xxs", True),  # attn_q/attn_k IQ2_S, rows of 384 fall back to IQ4_NL
    ("q3_k_m", False),  # attn_output of 384 falls back from Q4_K to Q5_0
    ("iq4_xs", False),  # n_gqa 4: attn_v Q5_K; tied embeddings: token_embd takes the output rule
])
def test_gemma3_equals_reference(case, quant, imatrix):
    """A bf16 source, Gemma 3 270M's layout, rows that need fallbacks."""
    assert_equal_and_decodes(case("gemma3"), quant, imatrix)


@pytest.mark.reference
@pytest.mark.parametrize("quant", IMATRIX_ONLY)
def test_imatrix_only_levels_are_refused_without_one(case, quant, tmp_path, capsys, monkeypatch):
    """llama-quantize refuses these without an imatrix; so do we, in one line that says what to
    add, before any tensor data is read and without leaving a file."""
    import alpaca_local.convert.pipeline as pipeline

    c = case("llama")
    with pytest.raises(AssertionError, match="llama_model_quantize failed"):
        reference.reference_quantize(c.start_file, tmp_path / "ref.gguf", quant)
    monkeypatch.setattr(pipeline, "_read", lambda *a: pytest.fail("read tensor data before refusing"))
    out = tmp_path / "out"
    out.mkdir()
    rc, err = cli(capsys, "convert", str(c.path), "-q", quant.upper(), "-o", str(out / "m.gguf"))
    one_line(rc, err, 2, f"{quant} needs an importance matrix", "--imatrix FILE or --calibrate")
    assert leftovers(out) == []


def test_imatrix_only_level_works_in_one_command_with_calibrate(tiny_model, tmp_path, capsys):
    """--calibrate computes the importance matrix first, so IQ2_XXS works in one command."""
    import gguf

    out = tmp_path / "m.gguf"
    rc, err = cli(capsys, "convert", str(tiny_model.path), "-q", "iq2_xxs", "--calibrate", "-o", str(out), "--json")
    assert rc == 0, err
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.1.ffn_up.weight"] == "IQ2_XXS" and types["token_embd.weight"] == "Q2_K"
    _assert_decodes(out)


def test_q1_0_refuses_rows_no_fallback_fits(tmp_path, capsys):
    """Q1_0's blocks are 128 wide and llama-quantize has no fallback for it: rows of 320 stop it
    (llama-quantize's own refusal is in the integration matrix)."""
    model = _llama_rows_320(tmp_path / "m")
    rc, err = cli(capsys, "convert", str(model.path), "-q", "q1_0", "-o", str(tmp_path / "m.gguf"))
    one_line(rc, err, 1, "q1_0", "not a multiple of 128")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(("argv", "code", "needles"), [
    (["-q", "mxfp4_moe"], 2, ("mixture-of-experts", "use --quant q8_0")),
    (["-q", "q2_0"], 2, ("q2_0 is not available", "gguf")),
    (["-q", "q3_k_xl"], 2, ("unknown quant level 'q3_k_xl'", "iq4_xs")),
    (["-q", "bf16", "--calibrate"], 2, ("not bf16",)),
])
def test_levels_a_dense_model_cannot_have(tiny_model, tmp_path, capsys, argv, code, needles):
    rc, err = cli(capsys, "convert", str(tiny_model.path), *argv, "-o", str(tmp_path / "m.gguf"))
    one_line(rc, err, code, *needles)
    assert leftovers(tmp_path) == []


def test_aliases_and_case_name_the_same_file(tiny_model, tmp_path, capsys, monkeypatch):
    """Q4_K is Q4_K_M (quantize.cpp's alias); the default file name carries the canonical tag."""
    import json

    from alpaca_local.cli.main import main

    monkeypatch.chdir(tmp_path)
    assert main(["convert", str(tiny_model.path), "-q", "Q4_K", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["quant"] == "q4_k_m" and Path(summary["output"]).name == "tiny-llama.Q4_K_M.gguf"


def test_ternary_levels_say_what_they_are_for(tiny_model, tmp_path, capsys):
    rc, err = cli(capsys, "convert", str(tiny_model.path), "-q", "tq1_0", "-o", str(tmp_path / "m.gguf"), "--json")
    assert rc == 0
    assert "suits models trained ternary" in err


# --------------------------------------------------------------------------- integration


# llama-rows-320-ffn-512 is only for the iq3_s/iq3_xs test: its fallbacks are llama-rows-320's
# and the plain llama's, each already in the matrix.
MATRIX = [(k, q, i) for k in BUILDERS if k != "llama-rows-320-ffn-512" for q in DENSE for i in (False, True)
          if not (i and q in reference.CONVERTER_OUTTYPES)]


@pytest.mark.integration
@pytest.mark.reference
@pytest.mark.parametrize(("kind", "quant", "imatrix"), MATRIX, ids=[f"{k}-{q}{'-imatrix' if i else ''}" for k, q, i in MATRIX])
def test_whole_matrix_equals_reference(case, kind, quant, imatrix, tmp_path):
    """Every level on every model, with and without an imatrix: the same file as the reference
    route, or refused exactly where llama-quantize refuses."""
    c = case(kind)
    try:
        ref = c.reference(quant, imatrix)
    except AssertionError:  # llama-quantize refused (imatrix-only level, or no fallback for Q1_0)
        from alpaca_local.errors import AlpacaError

        with pytest.raises(AlpacaError):
            c.ours(quant, imatrix)
        return
    ours = c.ours(quant, imatrix)
    reference.assert_same_tensors(ours, ref)
    assert _file_kv(ours) == _file_kv(ref)
    _assert_decodes(ours)


# --------------------------------------------------------------------------- other commands

# One file of each quantizer family, made by us (the fast suite's), and each tool run on it.
TOOL_LEVELS = ("iq2_xxs", "iq3_m", "iq4_nl", "q2_k", "q6_k", "tq1_0", "q1_0", "bf16")


@pytest.fixture(scope="module")
def level_files(tiny_model, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tools")
    f16 = convert(tiny_model.path, d / "f16.gguf", "f16").output
    imatrix = d / "i.gguf"
    write_imatrix(synthetic_imatrix(f16), imatrix)
    return {q: convert(tiny_model.path, d / f"tiny.{q.upper()}.gguf", q,
                       imatrix=imatrix if q in IMATRIX_ONLY else None).output for q in TOOL_LEVELS}


@pytest.mark.parametrize("quant", TOOL_LEVELS)
def test_chat_modelfile_and_imatrix_take_every_level(level_files, quant, tmp_path, capfd):
    import json

    from alpaca_local.cli.main import main

    path = level_files[quant]
    assert main(["chat", str(path), "-p", "Name a color.", "-n", "4", "--temp", "0", "--json"]) == 0
    assert json.loads(capfd.readouterr().out)["model"] == str(path)
    assert main(["modelfile", str(path), "-o", str(tmp_path / "Modelfile")]) == 0
    assert f"FROM {path.resolve()}\n" in (tmp_path / "Modelfile").read_text()
    out = tmp_path / "imatrix.gguf"
    assert main(["imatrix", str(path), "-c", "64", "--chunks", "1", "-o", str(out), "--json"]) == 0
    assert out.stat().st_size > 0
    capfd.readouterr()


def test_serve_takes_an_i_quant(level_files):
    import json
    import urllib.request

    from servers import Server

    server = Server.serve(level_files["iq2_xxs"], 128)
    try:
        body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
        req = urllib.request.Request(f"{server.base}/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
        assert answer["choices"][0]["message"]["role"] == "assistant"
    finally:
        assert server.stop() == 0


def _bench_plan():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_plan", Path(__file__).resolve().parents[1] / "benchmarks" / "plan.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _assert_buffers_match_llama_cpp(path: Path) -> None:
    """The planner's CPU_Mapped and CPU_REPACK for this file, as llama.cpp prints them (2 decimals
    of MiB), and every tensor's bytes counted (benchmarks/plan.py loads it on the CPU)."""
    r = _bench_plan().compare(path, 256)
    assert r["model_size"] == r["tensor_bytes"]
    for buffer, (got, predicted) in r["buffers"].items():
        assert got == round(predicted, 2), (path.name, buffer, got, predicted)
    assert r["repacked"] == (r["buffers"]["repack"][1] > 0)


@pytest.mark.parametrize("quant", TOOL_LEVELS)
def test_planned_buffers_match_llama_cpp(level_files, quant):
    """IQ4_NL and Q2_K are repacked on AVX2 / AVX-512 CPUs (REPACK_RULES), the others mapped."""
    _assert_buffers_match_llama_cpp(level_files[quant])


@pytest.mark.integration
@pytest.mark.parametrize("quant", DENSE)
def test_planned_buffers_match_llama_cpp_for_every_level(case, quant):
    c = case("llama")
    _assert_buffers_match_llama_cpp(c.ours(quant, quant in IMATRIX_ONLY))


# --- the ladder's order: the rules written beside LADDER, checked against their sources ---


_LADDER_JSON = Path(__file__).resolve().parents[1] / "benchmarks" / "ladder-gemma-270m.json"


def _bit_class(name: str) -> str:
    return name.lstrip("i")[1]


def test_ladder_holds_every_dense_level_once_each_with_its_source():
    dense = [n for n, lv in LEVELS.items() if not lv.experts_only]
    assert sorted(LADDER) == sorted(dense) and len(set(LADDER)) == len(LADDER)
    assert set(LADDER_SOURCE) == set(LADDER)


def test_levels_with_a_llama_cpp_figure_follow_it():
    figured = [n for n in LADDER if LADDER_SOURCE[n] == PPL_8B]
    assert figured == sorted(figured, key=lambda n: LEVELS[n].ppl)
    assert set(figured) == {n for n, lv in LEVELS.items() if lv.ppl is not None}


def test_iq_levels_sit_where_the_270m_kld_puts_them_within_their_bit_class():
    kld = {r["level"].removesuffix("+imatrix"): r["mean_kld"] for r in json.loads(_LADDER_JSON.read_text())["rows"]}
    placed = [n for n in LADDER if LADDER_SOURCE[n] == KLD_270M]
    for name in placed:
        figured = [n for n in LADDER if LADDER_SOURCE[n] == PPL_8B and _bit_class(n) == _bit_class(name)]
        worse = [n for n in figured if kld[n] > kld[name]]
        if worse:  # just above the first figured level of its class that measured worse
            above = [n for n in figured if LADDER.index(n) < LADDER.index(worse[0])]
            assert all(LADDER.index(n) < LADDER.index(name) < LADDER.index(worse[0]) for n in above), name
        else:  # below every figured level of its class
            assert LADDER.index(name) > max(LADDER.index(n) for n in figured)
    # within a run of placed levels: more bits per weight first (QUANT_OPTIONS' description)
    bpw = {n: float(LEVELS[n].llama_cpp.split()[0]) for n in placed}
    for a, b in zip(LADDER, LADDER[1:]):
        if a in bpw and b in bpw:
            assert bpw[a] > bpw[b], (a, b)


@pytest.mark.reference
def test_iq3_s_and_iq3_xs_are_the_same_file_where_hidden_rows_fall_back(case):
    """IQ3_XS differs from IQ3_S only in attn_q, attn_k and the middle ffn_gate/ffn_up
    (IQ3_XXS instead of IQ3_S, llama-quant.cpp), all rows of the hidden size. Where that
    is not a multiple of 256 (Gemma 3 270M: 640) both fall back to IQ4_NL, so llama-quantize
    writes the same tensors at both levels (RESULTS.md "Ladder": same size, same KLD), while
    ffn_down (rows of the FFN size) stays IQ3_S at both, and ours matches it at both."""
    c = case("llama-rows-320-ffn-512")
    refs = {q: reference.tensor_table(c.reference(q, False)) for q in ("iq3_s", "iq3_xs")}
    assert refs["iq3_s"] == refs["iq3_xs"]
    assert refs["iq3_s"]["blk.0.ffn_down.weight"][0] == "IQ3_S"
    assert refs["iq3_s"]["blk.0.attn_q.weight"][0] == "IQ4_NL"
    for q in refs:
        reference.assert_same_tensors(c.ours(q, False), c.reference(q, False))

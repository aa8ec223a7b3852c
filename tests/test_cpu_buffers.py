"""Issue 21: weights placed so that no llama.cpp build crashes (AMX), the same everywhere.

Truth: llama.cpp's own reports of the buffers it allocated (benchmarks/plan.py's probe, which
loads as alpaca-local does) and the logits of the same file under llama.cpp's own placement.
The AMX decision is tested on any machine by faking the build's extra buffer types; the
in-process paths are decoded on whatever CPU runs the suite, with the explicit placement
forced, and with the machine's own choice, which on an AMX build is the guard itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

import tinymodels
from alpaca_local.convert import cpu_repack, ggml
from alpaca_local.convert.gguf_read import read_gguf_header
from alpaca_local.convert.pipeline import convert
from alpaca_local.errors import UsageError
from alpaca_local.run import cpu_buffers
from alpaca_local.run.chat import load_llama
from alpaca_local.cli.main import main
from helpers import cli, one_line

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import plan as bench  # noqa: E402  (benchmarks/plan.py: llama.cpp's reported buffers)

T = cpu_repack.T
LEVELS = ("q4_0", "q4_k_m", "q8_0")
BUILD_INFO = cpu_repack.build_facts()
AMX_BUILD = "AMX" in BUILD_INFO[0]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 256-wide rows (K-quants), 4 layers; the 804-row FFN is not a multiple of 8: Q4_0/Q4_K
    # tensors CPU_REPACK must *not* take sit beside ones it must.
    return tinymodels.build_llama(tmp_path_factory.mktemp("hf") / "tiny", hidden=256, n_layer=4, n_head=4,
                                  n_kv_head=2, intermediate=768).path


@pytest.fixture(scope="module")
def ggufs(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gguf")
    return {lv: convert(tiny_hf, d / f"tiny.{lv}.gguf", lv).output for lv in (*LEVELS, "f16")}


@pytest.fixture(autouse=True)
def _own_preflight_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALPACA_LOCAL_CACHE", str(tmp_path_factory.getbasetemp() / "alc-cache"))
    monkeypatch.delenv(cpu_repack.BUFFERS_ENV, raising=False)
    monkeypatch.delenv(cpu_buffers.PREFLIGHT_ENV, raising=False)


# -- the decision ---------------------------------------------------------------------------

def test_requested_mode_from_flag_and_environment() -> None:
    assert cpu_repack.requested_mode(environ={}) == "auto"
    assert cpu_repack.requested_mode(environ={cpu_repack.BUFFERS_ENV: " Explicit "}) == "explicit"
    assert cpu_repack.requested_mode(True, environ={cpu_repack.BUFFERS_ENV: "explicit"}) == "none"  # the flag wins
    with pytest.raises(UsageError, match=r"ALPACA_LOCAL_CPU_BUFFERS='amx' is not one of auto, explicit, none"):
        cpu_repack.requested_mode(environ={cpu_repack.BUFFERS_ENV: "amx"})


@pytest.mark.parametrize("requested, bufts, gpu, mode", [
    ("auto", ("CPU_REPACK",), False, "auto"),  # nothing changes without AMX
    ("auto", ("AMX", "CPU_REPACK"), False, "explicit"),  # a native build on Sapphire Rapids
    ("auto", ("AMX", "CPU_REPACK"), True, "auto"),  # a GPU build: its host buffer comes before AMX
    ("none", ("AMX", "CPU_REPACK"), False, "none"),
    ("explicit", ("CPU_REPACK",), False, "explicit"),  # forced (benchmarks, these tests)
])
def test_effective_mode(requested: str, bufts: tuple[str, ...], gpu: bool, mode: str) -> None:
    assert cpu_repack.effective_mode(requested, bufts, gpu) == mode


SPR_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
            "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | "
            "OPENMP = 1 | REPACK = 1 | ")


@pytest.mark.parametrize("info, features", [
    (SPR_INFO, ("avx2", "avx512f")),
    ("CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | MATMUL_INT8 = 1 | DOTPROD = 1 | REPACK = 1 | ", ("dotprod", "i8mm")),
    ("CPU : SSE3 = 1 | AVX = 1 | AVX2 = 0 | ", ()),
    ("", ()),
])
def test_features_from_system_info(info: str, features: tuple[str, ...]) -> None:
    assert cpu_repack.parse_system_info(info) == features


def test_this_build_reports_what_it_registers() -> None:
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    bufts = ggml.cpu_extra_buffer_types()
    assert ("CPU_REPACK" in bufts) == ("REPACK = 1" in info)
    assert ("AMX" in bufts) == ("AMX_INT8 = 1" in info)
    assert all(isinstance(p, int) and p for p in bufts.values())
    if sys.platform == "linux" and os.path.exists("/proc/cpuinfo"):
        # A native build: the library's features are the machine's (what the planner reads).
        assert cpu_repack.parse_system_info(info) == cpu_repack.detect_cpu().features


def test_override_patterns_match_exactly_the_names(ggufs: dict[str, Path]) -> None:
    names = [t.name for t in read_gguf_header(ggufs["q4_k_m"]).tensors]
    rng = np.random.default_rng(0)
    for _ in range(50):
        chosen = {n for n in names if rng.random() < 0.5}
        patterns = cpu_buffers.override_patterns(sorted(chosen))
        assert {n for n in names if any(re.search(p, n) for p in patterns)} == chosen
        # grouped: at most one pattern per kind of layer tensor, plus one per tensor outside the layers
        kinds = {n.split(".", 2)[2] for n in chosen if n.startswith("blk.")}
        assert len(patterns) <= len(kinds) + sum(not n.startswith("blk.") for n in chosen)
    every_layer = cpu_buffers.override_patterns([f"blk.{i}.{k}.weight" for i in range(32) for k in ("attn_q", "ffn_up")])
    assert every_layer == [r"^blk\.(" + "|".join(map(str, range(32))) + r")\.(attn_q\.weight|ffn_up\.weight)$"]


def _fake_amx_build(monkeypatch: pytest.MonkeyPatch, gpu: bool = False) -> None:
    x86 = cpu_repack.CpuFeatures(("avx2", "avx512f"), "test")
    monkeypatch.setattr(cpu_buffers, "build_facts", lambda: (("AMX", "CPU_REPACK"), gpu, x86))
    monkeypatch.setattr(ggml, "cpu_extra_buffer_types", lambda: {"AMX": 0x1000, "CPU_REPACK": 0x2000})


@pytest.mark.parametrize("level", LEVELS)
def test_faked_amx_build_hands_exactly_the_repack_tensors(ggufs: dict[str, Path], level: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_amx_build(monkeypatch)
    header = read_gguf_header(ggufs[level])
    p = cpu_buffers.load_placement(header)
    assert (p.requested, p.mode, p.repack_buft, p.use_extra_bufts) == ("auto", "explicit", 0x2000, False)
    assert "#20824" in p.reason
    # Written out from repack.cpp for x86 (AVX2 + AVX-512): Q4_0, Q4_K, IQ4_NL, MXFP4 and Q2_K
    # matrices with ne[1] % 8 == 0, never the GET_ROWS token_embd.
    want = [t.name for t in header.tensors if t.ggml_type in (T.Q4_0, T.Q4_K, T.IQ4_NL, T.MXFP4, T.Q2_K)
            and len(t.shape) == 2 and t.shape[0] % 8 == 0 and t.name != "token_embd.weight"]
    assert list(p.repack) == want
    assert bool(want) == (level != "q8_0")  # q8_0: nothing repacks on x86, the list is empty
    types = {t.name: t.ggml_type for t in header.tensors}
    assert all(types[n] not in (T.Q6_K, T.Q8_0, T.Q5_0, T.F32) for n in p.repack)  # repack would crash on these
    assert cpu_buffers.load_placement(header, no_repack=True).mode == "none"
    assert cpu_buffers.load_placement(header, n_gpu_layers=0).mode == "explicit"


def test_faked_amx_gpu_build_keeps_llama_cpp_placement(ggufs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_amx_build(monkeypatch, gpu=True)
    header = read_gguf_header(ggufs["q4_0"])
    assert cpu_buffers.load_placement(header, n_gpu_layers=99).mode == "auto"
    assert cpu_buffers.load_placement(header, n_gpu_layers=0).mode == "explicit"  # all on the CPU after all


def test_placement_is_set_on_model_params() -> None:
    import ctypes

    import llama_cpp

    p = cpu_buffers.LoadPlacement("auto", "explicit", ("blk.0.ffn_up.weight", "blk.1.ffn_up.weight", "output.weight"),
                                  0x2000)
    params = llama_cpp.llama_model_default_params()
    assert params.use_extra_bufts  # llama.cpp's default
    keep = cpu_buffers.apply(params, p)
    assert not params.use_extra_bufts
    array = ctypes.cast(params.tensor_buft_overrides, ctypes.POINTER(cpu_buffers._BuftOverride))
    got = [(array[i].pattern.decode(), array[i].buft) for i in range(2)]
    assert got == [(r"^blk\.(0|1)\.(ffn_up\.weight)$", 0x2000), (r"^output\.weight$", 0x2000)]
    assert array[2].pattern is None  # the NULL terminator
    assert keep is not None
    cpu_buffers.apply(params, cpu_buffers.LoadPlacement("auto", "auto"))
    assert params.use_extra_bufts and not params.tensor_buft_overrides


def test_tied_output_is_not_repacked_by_name() -> None:
    from alpaca_local.plan import memory as plan

    tied = plan.ModelShape(name="t", arch="llama", n_layer=2, hidden=256, n_head=4, n_kv_head=4, head_dim=64,
                           intermediate=512, vocab_size=1000, n_ctx=2048, tie_embeddings=True, source="catalog")
    embd = plan.PlannedTensor("token_embd.weight", (1000, 256), T.Q4_0, 1000 * 144)
    rows = cpu_repack.CpuFeatures(("avx2",), "test").repack_rows
    assert plan.weights_split((embd,), tied, 0, "cpu", rows, tied_output_repacked=True)[2] > 0
    assert plan.weights_split((embd,), tied, 0, "cpu", rows, tied_output_repacked=False)[2] == 0
    avx2 = cpu_repack.CpuFeatures(("avx2",), "test")
    for mode, repacked in (("auto", True), ("explicit", False), ("none", False)):
        s = plan.RunSettings(backend="cpu", cpu=avx2, cpu_buffers=mode)
        assert plan.cpu_placement(s, tied, (embd,))[1] is repacked
    assert plan.cpu_placement(plan.RunSettings(backend="cpu", cpu=avx2, cpu_buffers="none"), tied, (embd,))[0] == {}


# -- llama.cpp's own buffers under each placement -------------------------------------------

@pytest.mark.parametrize("mode", ["explicit", "none"])
@pytest.mark.parametrize("level", LEVELS)
def test_llama_cpp_allocates_what_the_planner_predicts(ggufs: dict[str, Path], level: str, mode: str) -> None:
    r = bench.compare(ggufs[level], 512, cpu_buffers=mode)
    assert r["other_buffers"] == []  # no AMX buffer, whatever the CPU
    for buffer, (got, predicted) in r["buffers"].items():  # CPU_Mapped and CPU_REPACK, as llama.cpp prints them
        assert got == round(predicted, 2), buffer
    assert r["model_size"] == r["tensor_bytes"]
    repacks = mode == "explicit" and level != "q8_0" and "avx2" in BUILD_INFO[2].features
    # With extra buffer types off, a CPU_REPACK buffer exists only through our overrides.
    assert r["repacked"] is repacks and (r["buffers"]["repack"][0] > 0) is repacks


def _logits(path: Path, monkeypatch: pytest.MonkeyPatch, mode: str | None, tokens: list[int]) -> np.ndarray:
    with monkeypatch.context() as m:
        if mode:
            m.setenv(cpu_repack.BUFFERS_ENV, mode)
        llm = load_llama(path, 64, n_threads=2, logits_all=True, seed=0)
        try:
            assert llm.placement.mode == (mode or cpu_repack.machine_mode())
            llm.eval(tokens)
            return np.array(llm.scores[: len(tokens)], dtype=np.float64)
        finally:
            llm.close()


@pytest.mark.parametrize("level", LEVELS)
def test_same_logits_under_every_placement(ggufs: dict[str, Path], level: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = [1, 37, 105, 260, 9, 77, 301, 18, 44, 201, 3, 150]
    machine = _logits(ggufs[level], monkeypatch, None, tokens)
    explicit = _logits(ggufs[level], monkeypatch, "explicit", tokens)
    mapped = _logits(ggufs[level], monkeypatch, "none", tokens)
    assert np.isfinite(machine).all() and np.abs(machine).max() > 0
    # The same tensors in the same buffers run the same kernels: bit-identical logits.
    assert np.array_equal(explicit, machine)
    # Without CPU_REPACK the plain kernels quantize the activations and sum in another order:
    # close, not equal (q8_0 repacks nothing on x86: equal there). Measured on this model, AVX-512:
    # at most 0.28% (q4_0) and 0.42% (q4_k_m) of the logit range; bound 0.65%.
    spread = float(machine.max() - machine.min())
    assert np.abs(mapped - machine).max() <= 6.5e-3 * spread


# -- every in-process path decodes a quantized model ----------------------------------------

def _run_json(capsys, *argv: str) -> dict:
    """Run `alpaca-local ARGV --json` in-process; its JSON output (exit 0 asserted)."""
    rc = main([*argv, "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


@pytest.mark.parametrize("mode", [None, "explicit"], ids=["this-machine", "explicit"])
@pytest.mark.parametrize("level", LEVELS)
def test_every_in_process_path_decodes(ggufs: dict[str, Path], level: str, mode: str | None,
                                       monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path) -> None:
    """chat, serve, quality and imatrix each load and decode `level` (on an AMX machine, with
    this machine's placement, this is the test that crashed before issue 21)."""
    from alpaca_local.measure import quality
    from alpaca_local.measure.imatrix import ImatrixRun
    from alpaca_local.run.serve import load_server_model

    if mode:
        monkeypatch.setenv(cpu_repack.BUFFERS_ENV, mode)
    if AMX_BUILD and mode is None:
        assert cpu_repack.machine_mode() == "explicit"  # the guard is what runs here
    path = ggufs[level]
    assert _run_json(capsys, "chat", str(path), "-p", "Name three colors.", "-n", "6", "--temp", "0")["completion_tokens"] > 0
    llm = load_server_model(path, 128, n_threads=2)
    try:
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
        assert reply["usage"]["completion_tokens"] > 0
    finally:
        llm.close()
    llm = quality.load(path, 64, 2)
    try:
        logits, _ = quality.chunk_logits(llm, list(range(1, 65)))
        assert np.isfinite(logits).all()
    finally:
        llm.close()
    run = ImatrixRun(path, 32, 2)
    try:
        run.run(run.chunks("one two three four five six seven eight nine ten " * 20, 2))
        assert run.result(["t"]).entries
    finally:
        run.close()


def test_runtime_lora_decodes_under_the_explicit_placement(ggufs: dict[str, Path], tiny_hf: Path,
                                                           monkeypatch: pytest.MonkeyPatch, capsys,
                                                           tmp_path: Path) -> None:
    import peft_adapters as pa

    monkeypatch.setenv(cpu_repack.BUFFERS_ENV, "explicit")
    adapter = pa.make_adapter(tiny_hf, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    lora = tmp_path / "lora.gguf"
    assert cli(capsys, "convert", str(adapter), "--base", str(tiny_hf), "-o", str(lora), "--json")[0] == 0
    capsys.readouterr()
    out = _run_json(capsys, "chat", str(ggufs["q4_0"]), "--lora", str(lora), "-p", "Hi", "-n", "4", "--temp", "0")
    assert out["completion_tokens"] > 0


def test_no_repack_flags(ggufs: dict[str, Path], capsys) -> None:
    default = _run_json(capsys, "plan", str(ggufs["q4_0"]), "--vram", "1", "--cpu")
    off = _run_json(capsys, "plan", str(ggufs["q4_0"]), "--vram", "1", "--cpu", "--no-repack")
    assert off["device"]["cpu"]["buffers"] == "none" and off["device"]["cpu"]["repack_types"] == {}
    assert all(r["repack_bytes"] == 0 for r in off["levels"])
    assert default["device"]["cpu"]["buffers"] == cpu_repack.machine_mode()
    if "avx2" in BUILD_INFO[2].features:
        assert any(r["repack_bytes"] > 0 for r in default["levels"])
    out = _run_json(capsys, "chat", str(ggufs["q4_0"]), "--no-repack", "-p", "Hi", "-n", "3", "--temp", "0")
    assert out["completion_tokens"] > 0


def test_bad_buffer_mode_is_one_line(ggufs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv(cpu_repack.BUFFERS_ENV, "fast")
    one_line(*cli(capsys, "chat", str(ggufs["q4_0"]), "-p", "Hi", "-n", "2"), 2, "ALPACA_LOCAL_CPU_BUFFERS='fast'")
    one_line(*cli(capsys, "plan", str(ggufs["q4_0"]), "--vram", "1", "--cpu"), 2, "is not one of auto, explicit, none")


# -- the pre-flight decode: a native crash is one line ---------------------------------------

def _fake_python(tmp_path: Path, body: str) -> Path:
    exe = tmp_path / "python"
    exe.write_text(f"#!/bin/sh\n{body}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_a_crash_in_the_native_library_is_one_line(ggufs: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    # The pre-flight child dies of SIGSEGV, as llama-cpp-python 0.3.36 does at the first decode on AMX.
    monkeypatch.setenv("ALPACA_LOCAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "executable", str(_fake_python(tmp_path, 'echo "Fatal Python error: Segmentation fault" >&2; kill -SEGV $$')))
    line = one_line(*cli(capsys, "chat", str(ggufs["q4_0"]), "-p", "Hi", "-n", "2"), 1,
                    "llama.cpp crashed (SIGSEGV)", "tiny.q4_0.gguf", "try --no-repack")
    log = Path(re.search(r"its trace is in (\S+)$", line)[1])
    assert "Segmentation fault" in log.read_text()
    assert [p.suffix for p in (tmp_path / "cache" / "preflight").iterdir()] == [".txt"]  # no success recorded
    one_line(*cli(capsys, "imatrix", str(ggufs["q4_0"]), "-o", str(tmp_path / "i.gguf")), 1, "llama.cpp crashed (SIGSEGV)")
    assert not (tmp_path / "i.gguf").exists()


def test_preflight_runs_once_per_kind_of_load(ggufs: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALPACA_LOCAL_CACHE", str(tmp_path / "cache"))
    calls: list[list[str]] = []
    real = cpu_buffers.subprocess.run

    def counting(cmd, **kw):
        calls.append(cmd)
        return real(cmd, **kw)

    monkeypatch.setattr(cpu_buffers.subprocess, "run", counting)
    for _ in range(2):
        load_llama(ggufs["q4_0"], 64).close()
    assert len(calls) == 1  # the real child decoded fine; the second load trusts the record
    load_llama(ggufs["q8_0"], 64).close()  # other weight types: another kind of load
    monkeypatch.setenv(cpu_repack.BUFFERS_ENV, "none")
    load_llama(ggufs["q4_0"], 64).close()  # another placement
    assert len(calls) == 3
    monkeypatch.setenv(cpu_buffers.PREFLIGHT_ENV, "0")
    load_llama(ggufs["f16"], 64).close()
    assert len(calls) == 3


def test_preflight_failure_without_a_signal_is_left_to_the_real_load(ggufs: dict[str, Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALPACA_LOCAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "executable", str(_fake_python(tmp_path, "exit 1")))
    load_llama(ggufs["q4_0"], 64).close()  # loads: the child's exit 1 is not a crash
    assert not (tmp_path / "cache" / "preflight").exists() or not list((tmp_path / "cache" / "preflight").iterdir())


def test_crash_message_names_the_signal_and_the_fix() -> None:
    p = cpu_buffers.LoadPlacement("auto", "explicit", ("a", "b"), 1)
    msg = cpu_buffers.crash_message(Path("m.gguf"), signal.SIGBUS, p)
    assert msg == ("llama.cpp crashed (SIGBUS) in a test decode of m.gguf with 2 weights handed to CPU_REPACK by "
                   "name and extra buffer types off, before anything ran; try --no-repack (or "
                   "ALPACA_LOCAL_CPU_BUFFERS=none)")
    none = cpu_buffers.LoadPlacement("none", "none")
    assert "try a file of another quant level" in cpu_buffers.crash_message(Path("m.gguf"), signal.SIGSEGV, none)

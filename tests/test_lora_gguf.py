"""`convert ADAPTER --base BASE`: llama.cpp LoRA adapter GGUFs, and applying them at run time.

Truth: llama.cpp's vendored convert_lora_to_gguf.py for the file (tensor for
tensor), and for what the adapter does, the logits of the merged model
(`convert BASE --lora`, itself equal to PEFT's merge, tests/test_lora_merge.py)
next to the base with the adapter applied by llama.cpp at run time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import peft_adapters as pa
import reference
import tinymodels
from alpaca_local.convert.lora_gguf import write_adapter_gguf
from alpaca_local.convert.pipeline import convert
from alpaca_local.source.adapter import read_adapter
from alpaca_local.cli.main import main
from helpers import cli, leftovers, one_line

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = [1, 37, 105, 260, 9, 77, 301, 18, 44, 201, 3, 150]
# Logits of the base + run-time adapter vs the merged F16 file: the merged weights are
# rounded to f16 once, the run-time path adds the f32 delta to f16 weights. Measured on this
# tiny model: about 0.1% of the logit range (0.007-0.011 of ~11), while the adapter moves
# the logits by 30-70% of it (asserted, so the comparison is not vacuous). Bound: 0.5%.
REL_TOL = 0.005


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodels.build_llama(tmp_path_factory.mktemp("base") / "tiny-base", hidden=64, intermediate=128).path


@pytest.fixture(scope="module")
def base_gguf(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "base.F16.gguf"
    convert(base, out, "f16")
    return out


def _vendored(adapter: Path, base: Path, out: Path, outtype: str) -> Path:
    script = reference.vendor_dir() / "convert_lora_to_gguf.py"
    proc = subprocess.run([sys.executable, str(script), str(adapter), "--base", str(base), "--outtype", outtype,
                           "--outfile", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _logits(model: Path, lora: Path | None = None) -> np.ndarray:
    from alpaca_local.run.chat import load_llama  # the one loader: weights placed as users get them

    kwargs = {"lora_path": str(lora)} if lora else {}
    llm = load_llama(model, 64, logits_all=True, n_threads=2, **kwargs)
    try:
        llm.eval(TOKENS)
        return np.array(llm.scores[: len(TOKENS)], dtype=np.float64)
    finally:
        llm.close()


def _assert_close(got: np.ndarray, want: np.ndarray, base: np.ndarray) -> None:
    spread = float(want.max() - want.min())
    effect, error = np.abs(base - want).max(), np.abs(got - want).max()
    print(f"logit range {spread:.3f}, adapter effect {effect:.4f}, runtime vs merged {error:.5f}")
    assert effect > 5 * REL_TOL * spread, "the adapter barely moves the logits: vacuous test"
    assert error < REL_TOL * spread


@pytest.mark.reference
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_equals_vendored_convert_lora_to_gguf(outtype: str, base: Path, tmp_path: Path) -> None:
    adapter = pa.make_adapter(base, tmp_path / "lora", r=4, lora_alpha=8, target_modules=[*ALL, "embed_tokens"])
    ref = reference.tensor_table(_vendored(adapter, base, tmp_path / "ref.gguf", outtype))
    ours_path = write_adapter_gguf(read_adapter(adapter), base, tmp_path / "ours.gguf", outtype).output
    assert reference.tensor_table(ours_path) == ref
    fields = gguf.GGUFReader(ours_path).fields
    assert fields["general.type"].contents() == "adapter"
    assert fields["adapter.type"].contents() == "lora"
    assert fields["adapter.lora.alpha"].contents() == 8.0


@pytest.mark.reference
def test_runtime_adapter_matches_merged_model(base: Path, base_gguf: Path, tmp_path: Path) -> None:
    adapter = pa.make_adapter(base, tmp_path / "lora", r=8, lora_alpha=16, target_modules=ALL, std=0.1)
    merged = convert(base, tmp_path / "merged.gguf", "f16", adapters=[read_adapter(adapter)]).output
    lora = write_adapter_gguf(read_adapter(adapter), base, tmp_path / "lora.gguf", "f32").output
    _assert_close(_logits(base_gguf, lora), _logits(merged), _logits(base_gguf))


@pytest.mark.reference
@pytest.mark.parametrize("kind", ["rslora", "patterns"])
def test_scales_llama_cpp_script_gets_wrong(kind: str, base: Path, base_gguf: Path, tmp_path: Path) -> None:
    """rsLoRA (alpha/sqrt r) and rank/alpha patterns: ours matches PEFT's merge, the vendored script does not."""
    extra = ({"use_rslora": True} if kind == "rslora"
             else {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 64, "down_proj": 2}})
    adapter = pa.make_adapter(base, tmp_path / "lora", r=16, lora_alpha=16, target_modules=ALL, std=0.05, **extra)
    merged = convert(base, tmp_path / "merged.gguf", "f16", adapters=[read_adapter(adapter)]).output
    ours = write_adapter_gguf(read_adapter(adapter), base, tmp_path / "ours.gguf", "f32").output
    theirs = _vendored(adapter, base, tmp_path / "theirs.gguf", "f32")
    want, plain = _logits(merged), _logits(base_gguf)
    _assert_close(_logits(base_gguf, ours), want, plain)
    spread = float(want.max() - want.min())
    assert np.abs(_logits(base_gguf, theirs) - want).max() > 5 * REL_TOL * spread


@pytest.mark.parametrize("kind, needle", [
    ("dora", "DoRA"), ("modules_to_save", "modules_to_save"), ("resized", "resized vocabulary"),
    ("tokens", "trainable_token_indices"),
])
def test_refuses_what_llama_cpp_cannot_apply(kind: str, needle: str, base: Path, tmp_path: Path, capsys) -> None:
    kwargs = {"dora": dict(use_dora=True, target_modules=["q_proj"]),
              "modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
              "resized": dict(target_modules=["q_proj", "embed_tokens"], vocab_rows=515),
              "tokens": dict(target_modules=["q_proj"], trainable_token_indices=[3, 9])}[kind]
    adapter = pa.make_adapter(base, tmp_path / "lora", r=4, lora_alpha=8, **kwargs)
    capsys.readouterr()  # PEFT's own warnings
    out = tmp_path / "out"
    out.mkdir()
    rc, err = cli(capsys, "convert", str(adapter), "--base", str(base), "-o", str(out / "a.gguf"))
    one_line(rc, err, 1, needle, "--lora")
    assert leftovers(out) == []


def test_embedding_base_layer_copy_is_not_a_replacement(base: Path, tmp_path: Path) -> None:
    """PEFT saves embed_tokens.base_layer.weight beside an embedding LoRA; unchanged, it is the base's own."""
    adapter = pa.make_adapter(base, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["embed_tokens"])
    assert read_adapter(adapter).base_layer_copies == {"model.embed_tokens.weight"}
    result = write_adapter_gguf(read_adapter(adapter), base, tmp_path / "a.gguf", "f16")
    assert result.n_tensors == 2


def test_chat_and_plan_with_lora(base: Path, base_gguf: Path, tmp_path: Path, capsys) -> None:
    adapter = pa.make_adapter(base, tmp_path / "lora", r=4, lora_alpha=8, target_modules=ALL)
    lora = tmp_path / "lora.gguf"
    assert cli(capsys, "convert", str(adapter), "--base", str(base), "-o", str(lora), "--json")[0] == 0
    capsys.readouterr()
    rc, _ = cli(capsys, "chat", str(base_gguf), "--lora", str(lora), "-p", "Say hi", "-n", "4", "--temp", "0", "--json")
    assert rc == 0
    capsys.readouterr()
    assert main(["plan", str(base_gguf), "--vram", "1", "--lora", str(lora), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lora"]["tensors"] == 2 * 7 * 2  # 7 modules x 2 layers, A and B
    assert report["lora"]["bytes"] == sum(int(t.n_bytes) for t in gguf.GGUFReader(lora).tensors)


def test_chat_refuses_a_lora_for_another_base(base: Path, base_gguf: Path, tmp_path: Path, capsys) -> None:
    other = tinymodels.build_llama(tmp_path / "other", hidden=32, n_head=2, n_kv_head=1, intermediate=64).path
    adapter = pa.make_adapter(other, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["q_proj"])
    lora = write_adapter_gguf(read_adapter(adapter), other, tmp_path / "lora.gguf", "f16").output
    capsys.readouterr()
    rc, err = cli(capsys, "chat", str(base_gguf), "--lora", str(lora), "-p", "hi", "-n", "2")
    one_line(rc, err, 1, "do not fit")
    rc, err = cli(capsys, "chat", str(base_gguf), "--lora", str(base_gguf), "-p", "hi", "-n", "2")
    one_line(rc, err, 1, "not a LoRA adapter")


def test_serve_applies_the_lora(base: Path, base_gguf: Path, tmp_path: Path, capsys) -> None:
    """serve --lora: the server's model is loaded with the adapter (same logits as llama.cpp applying it);
    a file that is not a LoRA for the model is refused before the port is bound."""
    pytest.importorskip("uvicorn")
    from alpaca_local.run.chat import lora_kwargs
    from alpaca_local.run.serve import load_server_model

    adapter = pa.make_adapter(base, tmp_path / "lora", r=4, lora_alpha=8, target_modules=ALL, std=0.1)
    lora = write_adapter_gguf(read_adapter(adapter), base, tmp_path / "lora.gguf", "f16").output
    llm = load_server_model(base_gguf, 64, n_threads=2, logits_all=True, **lora_kwargs(lora, 1.0, base_gguf))
    try:
        llm.eval(TOKENS)
        served = np.array(llm.scores[len(TOKENS) - 1], dtype=np.float64)
    finally:
        llm.close()
    assert np.array_equal(served, _logits(base_gguf, lora)[-1])
    capsys.readouterr()
    rc, err = cli(capsys, "serve", str(base_gguf), "--port", "0", "--lora", str(base_gguf))
    one_line(rc, err, 1, "not a LoRA adapter")


@pytest.mark.reference
@pytest.mark.parametrize("arch", ["mistral", "llama3", "qwen2", "gemma2"])
def test_other_architectures_equal_vendored(arch: str, tmp_path: Path) -> None:
    import tinyarch

    model = getattr(tinyarch, f"build_{arch}")(tmp_path / f"tiny-{arch}").path
    adapter = pa.make_adapter(model, tmp_path / "lora", r=4, lora_alpha=8, target_modules=ALL)
    ref = reference.tensor_table(_vendored(adapter, model, tmp_path / "ref.gguf", "f16"))
    ours = write_adapter_gguf(read_adapter(adapter), model, tmp_path / "ours.gguf", "f16").output
    assert reference.tensor_table(ours) == ref

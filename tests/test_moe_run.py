"""chat and serve on mixture-of-experts models: --n-cpu-moe and -ngl, the planner's split by default
when a GPU is found, and the override list reaching llama.cpp (run.cpu_buffers, issue 21's module)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap

import pytest
import tinymoe
from helpers import cli, one_line

from alpaca_local.cli import gpu_split
from alpaca_local.cli.main import main
from alpaca_local.convert.pipeline import convert
from alpaca_local.plan import memory as plan
from alpaca_local.plan import moe_fit
from alpaca_local.plan.gpu import GPU, Device

MiB = 1 << 20


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe-run")
    model = tinymoe.build_qwen3moe(d / "tiny-qwen3moe", shard="10MB")
    return convert(model.path, d / "tiny-qwen3moe.Q4_K_M.gguf", "q4_k_m").output


def _args(ngl=None, n_cpu_moe=None, ctx=256) -> argparse.Namespace:
    return argparse.Namespace(n_gpu_layers=ngl, n_cpu_moe=n_cpu_moe, ctx=ctx)


def _cuda(budget: int) -> Device:
    return Device("cuda", (GPU("Test GPU", budget, budget),), "test")


def test_flags_as_given_and_no_gpu_means_cpu(moe_gguf, monkeypatch):
    monkeypatch.setattr(gpu_split, "_gpu", lambda: None)
    assert gpu_split.resolve(_args(), moe_gguf) == gpu_split.Split(0, 0)
    assert gpu_split.resolve(_args(5, 2), moe_gguf) == gpu_split.Split(5, 2)
    assert gpu_split.resolve(_args(None, 2), moe_gguf) == gpu_split.Split(0, 2)
    monkeypatch.setattr(gpu_split, "_gpu", lambda: _cuda(8 << 30))
    assert gpu_split.resolve(_args(None, 1), moe_gguf) == gpu_split.Split(-1, 1)  # every layer but those experts
    assert gpu_split.resolve(_args(3, None), moe_gguf) == gpu_split.Split(3, 0)


def test_default_is_the_planners_split_when_a_gpu_is_found(moe_gguf, monkeypatch):
    """A GPU just too small for the whole model at n_cpu_moe 0: the default is the planner's
    smallest split, the one `plan` recommends for this file."""
    from alpaca_local.convert.gguf_read import read_gguf_header

    shape = plan.shape_from_gguf(read_gguf_header(moe_gguf))
    s = plan.RunSettings(n_ctx=256, backend="cuda", cpu=plan.detect_cpu())
    totals = [plan.plan_level(shape, "q4_k_m", s, None, n).total_gpu for n in range(shape.n_layer + 1)]
    assert totals[1] < totals[0]
    budget = totals[1] + plan.SAFETY_MIN  # usable = budget - 256 MiB below 5 GiB
    monkeypatch.setattr(gpu_split, "_gpu", lambda: _cuda(budget))
    split = gpu_split.resolve(_args(), moe_gguf)
    expected = moe_fit.split_for(shape, "q4_k_m", s, budget, 64 << 30)
    assert (split.n_gpu_layers, split.n_cpu_moe) == (shape.n_layer + 1, expected.n_cpu_moe) == (shape.n_layer + 1, 1)
    assert "-ngl 3 --n-cpu-moe 1, the planner's split" in split.note
    monkeypatch.setattr(gpu_split, "_gpu", lambda: _cuda(budget + 64 * MiB))
    assert gpu_split.resolve(_args(), moe_gguf).n_cpu_moe == 0  # room for every expert on the GPU


def test_bad_n_cpu_moe_is_one_line(moe_gguf, capsys):
    one_line(*cli(capsys, "chat", str(moe_gguf), "-p", "hi", "--n-cpu-moe", "-1"), 2, "--n-cpu-moe -1")
    one_line(*cli(capsys, "serve", str(moe_gguf), "--n-cpu-moe", "-2"), 2, "--n-cpu-moe -2")


_VERBOSE_LOAD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from llama_cpp import Llama
    from alpaca_local.convert.gguf_read import read_gguf_header
    from alpaca_local.run import cpu_buffers
    path, n = Path(sys.argv[1]), int(sys.argv[2])
    placement = cpu_buffers.load_placement(read_gguf_header(path), n_cpu_moe=n)
    with cpu_buffers.llama_defaults(placement):
        Llama(str(path), n_ctx=64, verbose=True)
""")


@pytest.mark.parametrize("n", [0, 1])
def test_the_override_list_reaches_llama_cpp(moe_gguf, n):
    """With n_cpu_moe the load carries llama.cpp's own --n-cpu-moe overrides to its CPU buffer type:
    the loader matches them and says so once (src/llama-model-loader.cpp:1240-1247)."""
    proc = subprocess.run([sys.executable, "-c", _VERBOSE_LOAD, str(moe_gguf), str(n)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("tensor overrides to CPU are used with mmap enabled" in proc.stderr) == (n > 0)


def test_chat_with_experts_in_cpu_buffers_answers_the_same(moe_gguf, capsys):
    """On the CPU the override changes no buffer: the greedy answer is the same with and without."""
    answers = []
    for flags in ((), ("--n-cpu-moe", "2", "-ngl", "0")):
        assert main(["chat", str(moe_gguf), "-p", "Say hello", "-n", "12", "--temp", "0", "--seed", "1", *flags]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].strip()

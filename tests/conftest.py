"""Shared fixtures: tiny models built on the fly (never downloaded)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import ci_skips  # noqa: E402
import tinymodels  # noqa: E402

# huggingface_hub's library logger gets a StreamHandler bound to sys.stderr as it is at first
# import. Imported first inside a test, that is the test's capsys stream, closed after it, and
# every later retry warning becomes a "--- Logging error ---" traceback on the next test's stderr.
import huggingface_hub.utils.logging  # noqa: E402,F401  (huggingface_hub itself imports lazily)


def pytest_configure(config: pytest.Config) -> None:
    ci_skips.register(config)  # CI=true: a skip not on tests/ci_allowed_skips.txt fails the session
    config.addinivalue_line("markers", "integration: real models (Gemma 3 270M) or llama.cpp tools built from the vendored sources (slow; `make test-integration`)")
    config.addinivalue_line("markers", "reference: runs llama.cpp's own converter and quantizer (needs torch)")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tinymodels.TinyLlama:
    """A LLaMA-shaped HF folder: GQA (4 heads, 2 KV heads), [PAD] added, f16 safetensors."""
    return tinymodels.build_llama(tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model: tinymodels.TinyLlama, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_model` converted by our converter at q8_0 (loads in llama-cpp-python)."""
    from alpaca_local.convert.pipeline import convert

    out = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf"
    convert(tiny_model.path, out, "q8_0")
    return out


@pytest.fixture(scope="session")
def tiny_gguf_f16(tiny_model: tinymodels.TinyLlama, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from alpaca_local.convert.pipeline import convert

    out = tmp_path_factory.mktemp("gguf") / "tiny-llama.F16.gguf"
    convert(tiny_model.path, out, "f16")
    return out

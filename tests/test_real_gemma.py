"""convert on real trained weights: Gemma 3 270M rebuilt as a Hugging Face folder
(tests/real_gemma.py). Our GGUF equals llama.cpp's route tensor for tensor at f16,
q8_0 and q4_k_m, tokenizes like the HF tokenizer, and the q4_k_m answers simple
factual questions correctly through `alpaca-local chat` (greedy)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import real_gemma
import reference
import tinymodels

from alpaca_local.convert.pipeline import convert

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SP_KNOWN_DIFFERENCES = {"tokenizer.ggml.scores", "tokenizer.ggml.token_type"}  # see test_architectures

# Whitespace runs and indentation are where Gemma's added tokens matter.
CORPUS = [
    *tinymodels.VARIED_CORPUS,
    "two  spaces, three   spaces, eight        spaces",
    "def f(x):\n    if x:\n        return 1\n\n\n    return 0\n",
    "tabs\t\tand\n\n\n\nnewlines\n \n  \n",
    "<start_of_turn> and <end_of_turn> as literal text",
    "Question: What is the capital of France?\nAnswer:",
]
SPECIAL_TEXT = "<start_of_turn>user\nWhat is 2 + 2?<end_of_turn>\n<start_of_turn>model\n"

# (question, a word the answer must hold): what this base 270M model answers
# correctly in the Alpaca format (it also says "Japan is the capital of Japan").
QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Italy?", "Rome"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What language is spoken in Spain?", "Spanish"),
    ("What is the boiling point of water in degrees Celsius?", "100"),
]


@pytest.fixture(scope="module")
def gemma() -> Path:
    return real_gemma.real_gemma_hf(real_gemma.DEFAULT_ROOT)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("real-gemma")


def _ours(gemma: Path, work: Path, quant: str) -> Path:
    out = work / f"ours.{quant}.gguf"
    return out if out.exists() else convert(gemma, out, quant).output


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m"])
def test_tensors_equal_reference_route(gemma, work, quant):
    ref = reference.tensor_table(reference.reference_file(gemma, work, quant))
    ours = reference.tensor_table(_ours(gemma, work, quant))
    assert sorted(ours) == sorted(ref)
    mismatched = [(n, ref[n][:2], ours[n][:2]) for n in ref if ours[n] != ref[n]]
    assert not mismatched, mismatched[:5]


def test_metadata_equals_reference_route(gemma, work):
    def kv(path: Path) -> dict:
        return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith(("GGUF.", "general."))}

    ref, ours = kv(reference.reference_file(gemma, work, "f16")), kv(_ours(gemma, work, "f16"))
    differing = sorted(k for k in set(ref) | set(ours) if k not in SP_KNOWN_DIFFERENCES and ref.get(k) != ours.get(k))
    assert not differing, [(k, str(ours.get(k))[:80], str(ref.get(k))[:80]) for k in differing]
    assert ours["gemma3.attention.sliding_window"] == 512 and ours["gemma3.rope.freq_base_swa"] == 10000.0
    # The whitespace runs are USER_DEFINED, spaces written as spaces, as the reference writes them.
    types, tokens = ours["tokenizer.ggml.token_type"], ours["tokenizer.ggml.tokens"]
    assert [types[tokens.index(run)] for run in ("  ", "\n\n", "    ")] == [gguf.TokenType.USER_DEFINED] * 3


def test_tokenization_equals_hf_tokenizer(gemma, work):
    import llama_cpp
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma, local_files_only=True)
    llm = llama_cpp.Llama(str(_ours(gemma, work, "f16")), vocab_only=True, verbose=False)
    ref = llama_cpp.Llama(str(reference.reference_file(gemma, work, "f16")), vocab_only=True, verbose=False)
    # Text as text (llama.cpp parse_special=False; HF split_special_tokens=True: "<unk>" is
    # five characters), and text whose special tokens are parsed (both defaults otherwise).
    ours = {t: llm.tokenize(t.encode(), add_bos=True, special=False) for t in CORPUS}
    assert ours == {t: ref.tokenize(t.encode(), add_bos=True, special=False) for t in CORPUS}
    # Gemma's "</s>" is a user-defined piece, but llama.cpp retypes it CONTROL at load
    # (its end-of-generation guess, src/llama-vocab.cpp:2901), for the reference's file too:
    # plain "</s>" is then "</" "s" ">" there.
    differing = [t for t in CORPUS if "</s>" not in t and ours[t] != tok(t, split_special_tokens=True).input_ids]
    assert not differing, differing
    for text in (SPECIAL_TEXT, *CORPUS):
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text), repr(text)


def _chat(model: Path, question: str, *extra: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "alpaca_local", "chat", str(model), "-p", question, "--temp", "0", "-n", "32",
         "--seed", "1", *extra],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.parametrize("question, expected", QUESTIONS)
def test_q4_k_m_answers_factual_questions(gemma, work, question, expected):
    answer = _chat(_ours(gemma, work, "q4_k_m"), question)
    assert expected in answer, answer


def test_template_model_prompt_equals_transformers(gemma, work):
    """--template model sends exactly the ids transformers' apply_chat_template makes with
    the real vocabulary. (This base model does not follow Gemma's chat turns; it answers
    in the Alpaca format, above.)"""
    from transformers import AutoTokenizer

    from alpaca_local.run.chat import load_model, prompt_format, read_model_info
    from alpaca_local.template import Turn

    path = _ours(gemma, work, "q4_k_m")
    model = load_model(path, n_ctx=512)
    fmt = prompt_format("model", read_model_info(path), model)
    turns = [Turn("What is the capital of France?", response="Paris."), Turn("And  of\n\n  Italy?")]
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And  of\n\n  Italy?"}]
    tok = AutoTokenizer.from_pretrained(gemma, local_files_only=True)
    assert fmt.ids(model, turns, "Answer briefly.") == tok.apply_chat_template(
        [{"role": "system", "content": "Answer briefly."}, *messages], add_generation_prompt=True)

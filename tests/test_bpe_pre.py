"""Byte-level BPE pre-tokenizers: every entry of `bpe_pre.PRE_TOKENIZERS` tokenizes through
our GGUF (llama.cpp, parse_special=False) exactly as the Hugging Face `tokenizers`
tokenizer does, on a varied corpus, for a tokenizer.json built here in that family's
structure (Split regexes, Digits, ByteLevel, in the released order). Structures llama.cpp
cannot reproduce are refused with one line naming the supported ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tinyarch
import tinymodels

from alpaca_local.convert.pipeline import convert, plan_conversion
from alpaca_local.errors import UnsupportedError
from alpaca_local.source import bpe_pre

CORPUS = [
    *tinymodels.VARIED_CORPUS,
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 1,234,567.89 0x1F 2026-11-30",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }\n\treturn sum;",
    "    indented four\n        indented eight\n\n\n\nfour newlines",
    "Ankara'da kaldım, İstanbul'a gittim.",
    "我想在apple工作1314151天～ 日本語とカタカナ、ひらがな。한국어 문장입니다.",
    "🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3",
    "------======= нещо на Български '''''''```````\"\"\"\"......!!!!!!??????",
    "CamelCaseWords and ALLCAPS and mixedUPPERlower words",
    "x  y   z\r\n\r\n  \t tail  ",
]
# Special tokens written in the text: the HF tokenizer matches them before splitting,
# as llama.cpp does when asked to parse specials.
SPECIAL_TEXT = "<|im_start|>user\nliteral special-token text<|im_end|>\n<|im_start|>assistant\n"


def _hf_pre_tokenizer(regexes: tuple[str, ...]):
    """The tokenizers pre-tokenizer a released tokenizer.json of this family holds."""
    from tokenizers import Regex, pre_tokenizers

    *splits, last = regexes
    use_regex = last == bpe_pre.GPT2_REGEX
    steps = list(splits) if use_regex else list(regexes)
    parts = []
    for regex in steps:
        if regex in (bpe_pre.DIGIT, bpe_pre.DIGITS):
            parts.append(pre_tokenizers.Digits(individual_digits=regex == bpe_pre.DIGIT))
        else:
            parts.append(pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False))
    parts.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=use_regex))
    return pre_tokenizers.Sequence(parts)


def _bpe_llama(dirpath: Path, pre_tokenizer) -> Path:
    """A one-layer LlamaForCausalLM whose tokenizer.json has `pre_tokenizer`."""
    dirpath.mkdir(parents=True)
    tok = tinyarch._bpe_tokenizer("", [("<|im_start|>", True), ("<|im_end|>", True)],
                                  ignore_merges=False, nfc=False, bos=None, pre_tokenizer=pre_tokenizer)
    n_vocab = tinyarch._write_bpe(dirpath, tok, {"eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"})
    cfg = tinyarch._base_config("LlamaForCausalLM", "llama", "F16", hidden_size=64, intermediate_size=128,
                                num_hidden_layers=1, vocab_size=n_vocab, tie_word_embeddings=True)
    tinyarch._finish(dirpath, "llama", cfg, "F16", 0, "bpe", None)
    return dirpath


@pytest.mark.parametrize("entry", bpe_pre.PRE_TOKENIZERS, ids=lambda e: e.name)
def test_tokenizes_like_hf(entry: bpe_pre.PreTokenizer, tmp_path):
    import llama_cpp
    from tokenizers import Tokenizer

    folder = _bpe_llama(tmp_path / entry.name, _hf_pre_tokenizer(entry.regexes))
    out = convert(folder, tmp_path / "m.gguf", "f16").output
    assert plan_conversion(folder, "f16").vocab.pre == entry.name
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    differing = [
        text for text in CORPUS
        if llm.tokenize(text.encode(), add_bos=False, special=False) != hf.encode(text, add_special_tokens=False).ids
    ]
    assert not differing, differing
    assert llm.tokenize(SPECIAL_TEXT.encode(), add_bos=False, special=True) == hf.encode(SPECIAL_TEXT).ids


def test_smollm_layout_is_smollm(tmp_path):
    """SmolLM2's pre-tokenizer, as its tokenizer.json writes it, is llama.cpp's smollm."""
    data = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ]}}
    assert bpe_pre.pre_tokenizer_name(data, tmp_path / "tokenizer.json") == "smollm"
    data["pre_tokenizer"]["pretokenizers"].reverse()  # order matters: digits split after the regex is no entry
    with pytest.raises(UnsupportedError):
        bpe_pre.pre_tokenizer_name(data, tmp_path / "tokenizer.json")


def test_single_byte_level_is_gpt2(tmp_path):
    data = {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}}
    assert bpe_pre.pre_tokenizer_name(data, tmp_path / "tokenizer.json") == "gpt-2"


def test_regex_written_with_control_characters_matches(tmp_path):
    """tokenizer.json may hold "[\\r\\n]" as the characters or as regex escapes."""
    steps = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
             for r in ("[\\r\\n]", r"\s?\p{L}+", r"\s?\p{P}+", bpe_pre.DEEPSEEK_CJK)]
    steps += [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": False}]
    data = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": steps}}
    assert bpe_pre.pre_tokenizer_name(data, tmp_path / "tokenizer.json") == "deepseek-coder"


@pytest.mark.parametrize("change", ["prefix_space", "regex", "merged_behavior", "metaspace", "no_byte_level"])
def test_unreproducible_pre_tokenizer_is_refused(change, tmp_path):
    model = tinyarch.build_qwen2(tmp_path / "q")
    path = model.path / "tokenizer.json"
    tok = json.loads(path.read_text())
    split, byte_level = tok["pre_tokenizer"]["pretokenizers"]
    if change == "prefix_space":  # llama.cpp's BPE never adds a leading space
        byte_level["add_prefix_space"] = True
    elif change == "regex":
        split["pattern"]["Regex"] = r"\s+|\w+"
    elif change == "merged_behavior":
        split["behavior"] = "MergedWithPrevious"
    elif change == "metaspace":
        tok["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first"}
    else:
        tok["pre_tokenizer"]["pretokenizers"] = [split]
    path.write_text(json.dumps(tok))
    with pytest.raises(UnsupportedError, match="pre-tokenizer.*supported: llama-bpe, qwen2"):
        plan_conversion(model.path, "q8_0")


def test_tiny_aya_digit_split_is_refused(tmp_path):
    """llama.cpp's tiny_aya splits digits followed by a letter unlike tokenizers (its \\b
    differs): refused rather than converted into a model that tokenizes differently."""
    steps = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
             for r in (r"\d{1,3}(?=(?:\d{3})*\b)", bpe_pre.GPT4O_REGEX)]
    data = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [*steps, {"type": "ByteLevel", "use_regex": False}]}}
    with pytest.raises(UnsupportedError, match="not one llama.cpp is known to reproduce"):
        bpe_pre.pre_tokenizer_name(data, tmp_path / "tokenizer.json")

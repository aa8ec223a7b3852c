"""A byte-level BPE tokenizer.json's pre-tokenizer -> llama.cpp's `tokenizer.ggml.pre` name.

In: the parsed `tokenizer.json`. Out: the name llama.cpp reads to pick its
split regexes (src/llama-vocab.cpp, `llm_tokenizer_bpe`), or `UnsupportedError`
when llama.cpp has no pre-tokenizer that splits the same way.

The reference converter names the pre-tokenizer by hashing the tokens of a
check string (`get_vocab_base_pre`), which only recognises the exact released
vocabularies: a fine-tune that retrained or extended its vocabulary, or any
tokenizer it has not seen, is refused there. We read the pre-tokenizer's own
structure instead. Every step of a `Sequence` becomes the regex it splits
with, in order, exactly as llama.cpp applies its `regex_exprs` one after the
other (each regex splits every piece the previous ones made, keeping matches
and gaps, which is `Split(behavior="Isolated")`):

- `Split(Regex r, Isolated)`             -> r
- `Digits(individual_digits=true)`       -> `\\p{N}`   (one piece per digit)
- `Digits(individual_digits=false)`      -> `\\p{N}+`
- `ByteLevel(use_regex=true)` (last)     -> GPT-2's regex, then byte encoding
- `ByteLevel(use_regex=false)` (last)    -> byte encoding only

The resulting regex list is looked up in `PRE_TOKENIZERS`: one entry per
llama.cpp pre-tokenizer, holding the regexes as tokenizer.json writes them
(llama-vocab.cpp quotes them as "original regex from tokenizer.json" where it
had to rewrite them for its own engine). Several llama.cpp names share one
regex list (e.g. smollm, starcoder, refact, command-r); the entry uses the
name the reference gives the model people fine-tune today.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alpaca_local.errors import UnsupportedError

# The regex of tokenizers' ByteLevel pre-tokenizer (tokenizers/src/pre_tokenizers/byte_level.rs),
# which llama.cpp implements as its "gpt2" regex (llama-vocab.cpp LLAMA_VOCAB_PRE_TYPE_GPT2).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
DIGIT = r"\p{N}"  # Digits(individual_digits=true)
DIGITS = r"\p{N}+"  # Digits(individual_digits=false)

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN35_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SEED_CODER_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\r\n]+"
    "|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
)
EXAONE_MOE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"
)
BAILINGMOE_REGEX = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
)
UFAKZEKA_REGEX = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
JAIS2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)"
    r"|\s{1,2}(?!\S)|\s{1}"
)
MINICPM5_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
DEEPSEEK3_CJK = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
DEEPSEEK3_MAIN = (
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
)


@dataclass(frozen=True)
class PreTokenizer:
    name: str  # tokenizer.ggml.pre
    regexes: tuple[str, ...]  # the splits, in order, as tokenizer.json writes them
    models: str  # released vocabularies the reference gives this name (get_vocab_base_pre)


# One entry per llama.cpp pre-tokenizer (llama-vocab.cpp, llm_tokenizer_bpe's switch)
# whose tokenizer.json structure is known and which llama.cpp reproduces (each is
# checked against the HF tokenizer in tests/test_bpe_pre.py). Left out, so refused:
# tiny_aya / cohere2moe (its digit regex "\d{1,3}(?=(?:\d{3})*\b)" splits "1314151ab"
# as 1|3|14|15|1 in llama.cpp but 13|1|4|15|1 in tokenizers: llama.cpp's \b differs),
# and the pre-types whose regexes llama.cpp rewrote without quoting the original
# (falcon, bloom/poro, viking, chameleon, youtu, spark2_5, afmoe, laguna, superbpe,
# kimi-k2, deepseek-llm, granite-embed-multi, gemma4 and sarvam-moe's SentencePiece-style BPE).
PRE_TOKENIZERS: tuple[PreTokenizer, ...] = (
    PreTokenizer("llama-bpe", (LLAMA3_REGEX,), "Llama 3.x (also dbrx, smaug-bpe, chatglm-bpe: same regex)"),
    PreTokenizer("qwen2", (QWEN2_REGEX,), "Qwen2, Qwen2.5, Qwen3 (also stablelm2, hunyuan, grok-2: same regex)"),
    PreTokenizer("qwen35", (QWEN35_REGEX,), "Qwen3.5"),
    PreTokenizer("smollm", (DIGIT, GPT2_REGEX), "SmolLM, SmolLM2 (also starcoder, refact, command-r, codeshell)"),
    PreTokenizer("gpt-2", (GPT2_REGEX,), "GPT-2, Phi-2, OLMo, MPT"),
    PreTokenizer("tekken", (TEKKEN_REGEX,), "Mistral Nemo, Pixtral"),
    PreTokenizer("gpt-4o", (GPT4O_REGEX,), "GPT-4o style, Llama 4, Phi-4-mini"),
    PreTokenizer("seed-coder", (SEED_CODER_REGEX,), "Seed-Coder"),
    PreTokenizer("exaone-moe", (EXAONE_MOE_REGEX,), "EXAONE MoE"),
    PreTokenizer("bailingmoe", (BAILINGMOE_REGEX,), "Ling / BailingMoE"),
    PreTokenizer("ufakzeka", (UFAKZEKA_REGEX,), "Qwen2's regex without contractions"),
    PreTokenizer("jais-2", (JAIS2_REGEX,), "Jais 2"),
    PreTokenizer("minicpm5", (r"\p{N}{1,3}", MINICPM5_REGEX), "MiniCPM5"),
    PreTokenizer(
        "deepseek-coder",
        ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", DEEPSEEK_CJK, DIGIT),
        "DeepSeek Coder",
    ),
    PreTokenizer("deepseek-v3", (r"\p{N}{1,3}", DEEPSEEK3_CJK, DEEPSEEK3_MAIN), "DeepSeek V3 / R1"),
)


def _canonical(regex: str) -> str:
    # tokenizer.json may hold a control character itself or its regex escape
    # ("[\\r\\n]" or "[\r\n]" once parsed): the same regex either way.
    return regex.replace("\r", r"\r").replace("\n", r"\n").replace("\t", r"\t")


BY_REGEXES: dict[tuple[str, ...], str] = {tuple(map(_canonical, p.regexes)): p.name for p in PRE_TOKENIZERS}


def _steps(pre: Any) -> list[dict]:
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers")
        return parts if isinstance(parts, list) else [None]
    return [pre]


def split_regexes(pre: Any) -> tuple[str, ...] | None:
    """The regexes `pre` (tokenizer.json's "pre_tokenizer") splits with, in order, or
    None when it is not a byte-level BPE pre-tokenizer built from the steps above."""
    steps = _steps(pre)
    if not steps or not all(isinstance(s, dict) for s in steps):
        return None
    *splits, last = steps
    # Byte encoding comes last; a prefix space is something llama.cpp's BPE never adds.
    if last.get("type") != "ByteLevel" or last.get("add_prefix_space", False):
        return None
    regexes: list[str] = []
    for step in splits:
        kind = step.get("type")
        pattern = step.get("pattern")
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        if kind == "Split" and isinstance(regex, str) and step.get("behavior") == "Isolated" and not step.get("invert"):
            regexes.append(_canonical(regex))
        elif kind == "Digits":
            regexes.append(DIGIT if step.get("individual_digits") else DIGITS)
        else:
            return None
    if last.get("use_regex", True):
        regexes.append(GPT2_REGEX)
    return tuple(regexes)


def pre_tokenizer_name(data: dict, path: Path) -> str:
    """tokenizer.ggml.pre for a parsed tokenizer.json, or UnsupportedError naming the known ones."""
    pre = data.get("pre_tokenizer")
    regexes = split_regexes(pre)
    if regexes is not None and regexes in BY_REGEXES:
        return BY_REGEXES[regexes]
    known = ", ".join(p.name for p in PRE_TOKENIZERS)
    raise UnsupportedError(
        f"{path}: the BPE pre-tokenizer is not one llama.cpp is known to reproduce here "
        f"(supported: {known}); its pre_tokenizer section is {json.dumps(pre)[:200]}"
    )

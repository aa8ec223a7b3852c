"""The quant levels a user can ask for: names, llama.cpp file types, and what is known of each.

In:  a level name as typed ("Q4_K_M", "q4_k", "iq3_m"...).
Out: one `Level` (canonical lower-case name, llama_ftype, file-name tag, llama.cpp's own
     description) or a UsageError that lists the valid names.

The list is llama-quantize's (`QUANT_OPTIONS` in tools/quantize/quantize.cpp of the
llama.cpp vendored in llama-cpp-python 0.3.36), with its aliases Q3_K / Q4_K / Q5_K for
the _M mixes; names are case-insensitive there and here. Three levels are the
converter's own output types (`convert_hf_to_gguf.py --outtype f16|bf16|f32`): the
reference route for them is the converter alone. Every other level is llama-quantize's
file type applied to the converter's f16 file, which `quant_rules` reproduces per tensor.

Which tensors get which type is not here: that is `quant_rules`.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import GGMLQuantizationType, LlamaFileType

from alpaca_local.errors import UsageError

F = LlamaFileType


@dataclass(frozen=True)
class Level:
    """One quant level.

    `llama_cpp` is llama.cpp's description (QUANT_OPTIONS); `size_gb`/`ppl` are the
    file size and perplexity increase it quotes for Llama-3-8B where it quotes them
    (`+ppl @ Llama-3-8B`), None where it gives bits per weight only.
    `imatrix`: llama-quantize refuses the level without an importance matrix on the
    usual shapes (the exact, per-tensor rule is `quant_rules.imatrix_required`).
    `trained_for`: the level only keeps a sign/ternary pattern and a scale, so it is
    meaningful only for a model trained that way (said in the help and on use).
    `unavailable`: why this build cannot write the level, or None.
    `experts_only`: the level only differs from Q8_0 on expert tensors.
    """

    name: str
    ftype: int  # a LlamaFileType, or llama.h's number where gguf lacks the member
    llama_cpp: str
    size_gb: float | None = None
    ppl: float | None = None
    imatrix: bool = False
    trained_for: str | None = None
    unavailable: str | None = None
    experts_only: bool = False

    @property
    def tag(self) -> str:
        """The tag in file names: alpaca-7b.Q4_K_M.gguf."""
        return self.name.upper()

    @property
    def converter_outtype(self) -> bool:
        """Written by convert_hf_to_gguf.py itself (--outtype NAME), not by llama-quantize."""
        return self.ftype in _CONVERTER_OUTTYPES


_CONVERTER_OUTTYPES = frozenset({F.MOSTLY_F16, F.MOSTLY_BF16, F.ALL_F32})

# Q2_0 is newer than the gguf package on PyPI (0.19.0 has neither the ftype nor the GGML
# type): llama.h's number for the file type, and the reason while gguf lacks the type.
_MOSTLY_Q2_0 = getattr(F, "MOSTLY_Q2_0", 41)
_Q2_0_MISSING = None if hasattr(GGMLQuantizationType, "Q2_0") else (
    "the installed gguf package does not know GGML type Q2_0 (llama.cpp added it after gguf "
    "0.19.0), so such files can be neither written nor read here"
)

# In llama-quantize's QUANT_OPTIONS order (tools/quantize/quantize.cpp:34-75), without COPY.
_TABLE: tuple[Level, ...] = (
    Level("q1_0", F.MOSTLY_Q1_0, "1.125 bpw quantization", trained_for="1-bit (binary)"),
    Level("q2_0", _MOSTLY_Q2_0, "2.25 bpw quantization (group 64)", trained_for="2-bit",
          unavailable=_Q2_0_MISSING),
    Level("q4_0", F.MOSTLY_Q4_0, "4.34G, +0.4685 ppl @ Llama-3-8B", 4.34, 0.4685),
    Level("q4_1", F.MOSTLY_Q4_1, "4.78G, +0.4511 ppl @ Llama-3-8B", 4.78, 0.4511),
    Level("mxfp4_moe", F.MOSTLY_MXFP4_MOE, "MXFP4 MoE", experts_only=True),
    Level("q5_0", F.MOSTLY_Q5_0, "5.21G, +0.1316 ppl @ Llama-3-8B", 5.21, 0.1316),
    Level("q5_1", F.MOSTLY_Q5_1, "5.65G, +0.1062 ppl @ Llama-3-8B", 5.65, 0.1062),
    Level("iq2_xxs", F.MOSTLY_IQ2_XXS, "2.06 bpw quantization", imatrix=True),
    Level("iq2_xs", F.MOSTLY_IQ2_XS, "2.31 bpw quantization", imatrix=True),
    Level("iq2_s", F.MOSTLY_IQ2_S, "2.5  bpw quantization", imatrix=True),
    Level("iq2_m", F.MOSTLY_IQ2_M, "2.7  bpw quantization", imatrix=True),
    Level("iq1_s", F.MOSTLY_IQ1_S, "1.56 bpw quantization", imatrix=True),
    Level("iq1_m", F.MOSTLY_IQ1_M, "1.75 bpw quantization", imatrix=True),
    Level("tq1_0", F.MOSTLY_TQ1_0, "1.69 bpw ternarization", trained_for="ternary (BitNet b1.58, TriLM)"),
    Level("tq2_0", F.MOSTLY_TQ2_0, "2.06 bpw ternarization", trained_for="ternary (BitNet b1.58, TriLM)"),
    Level("q2_k", F.MOSTLY_Q2_K, "2.96G, +3.5199 ppl @ Llama-3-8B", 2.96, 3.5199),
    Level("q2_k_s", F.MOSTLY_Q2_K_S, "2.96G, +3.1836 ppl @ Llama-3-8B", 2.96, 3.1836, imatrix=True),
    Level("iq3_xxs", F.MOSTLY_IQ3_XXS, "3.06 bpw quantization", imatrix=True),
    Level("iq3_s", F.MOSTLY_IQ3_S, "3.44 bpw quantization"),
    Level("iq3_m", F.MOSTLY_IQ3_M, "3.66 bpw quantization mix"),
    Level("iq3_xs", F.MOSTLY_IQ3_XS, "3.3 bpw quantization", imatrix=True),
    Level("q3_k_s", F.MOSTLY_Q3_K_S, "3.41G, +1.6321 ppl @ Llama-3-8B", 3.41, 1.6321),
    Level("q3_k_m", F.MOSTLY_Q3_K_M, "3.74G, +0.6569 ppl @ Llama-3-8B", 3.74, 0.6569),
    Level("q3_k_l", F.MOSTLY_Q3_K_L, "4.03G, +0.5562 ppl @ Llama-3-8B", 4.03, 0.5562),
    Level("iq4_nl", F.MOSTLY_IQ4_NL, "4.50 bpw non-linear quantization"),
    Level("iq4_xs", F.MOSTLY_IQ4_XS, "4.25 bpw non-linear quantization"),
    Level("q4_k_s", F.MOSTLY_Q4_K_S, "4.37G, +0.2689 ppl @ Llama-3-8B", 4.37, 0.2689),
    Level("q4_k_m", F.MOSTLY_Q4_K_M, "4.58G, +0.1754 ppl @ Llama-3-8B", 4.58, 0.1754),
    Level("q5_k_s", F.MOSTLY_Q5_K_S, "5.21G, +0.1049 ppl @ Llama-3-8B", 5.21, 0.1049),
    Level("q5_k_m", F.MOSTLY_Q5_K_M, "5.33G, +0.0569 ppl @ Llama-3-8B", 5.33, 0.0569),
    Level("q6_k", F.MOSTLY_Q6_K, "6.14G, +0.0217 ppl @ Llama-3-8B", 6.14, 0.0217),
    Level("q8_0", F.MOSTLY_Q8_0, "7.96G, +0.0026 ppl @ Llama-3-8B", 7.96, 0.0026),
    Level("f16", F.MOSTLY_F16, "14.00G, +0.0020 ppl @ Mistral-7B"),
    Level("bf16", F.MOSTLY_BF16, "14.00G, -0.0050 ppl @ Mistral-7B"),
    Level("f32", F.ALL_F32, "26.00G              @ 7B"),
)

LEVELS: dict[str, Level] = {lv.name: lv for lv in _TABLE}

# Every level a dense model can have, best quality first: what `plan` recommends from (the
# first that fits) and the order of `--levels all`. Bits per weight alone do not give it;
# three sources do, in this order of trust (each level's source is in LADDER_SOURCE):
#  1. llama.cpp's "+ppl @ Llama-3-8B" column (QUANT_OPTIONS, `Level.ppl`): every level that
#     has a figure is ranked by it, lower first (so q5_k_s +0.1049 above q5_1 +0.1062, and
#     q2_k_s +3.1836 above q2_k +3.5199). An 8B model is what people quantize; its figures win.
#  2. Levels without a figure (the IQ-quants) are placed among the figured levels of their own
#     bit class (the digit in the name: iq4_* among q4_*, iq3_* among q3_*, iq2_* among q2_*)
#     by our mean KL divergence from f16 on Gemma 3 270M (benchmarks/RESULTS.md, "Ladder"):
#     just above the first figured level of that class that measured a higher KLD (below the
#     last if none did). Only the own class is compared because that model is mostly its
#     262k-row embedding (kept at q6_k/q8_0 by most levels), so across classes its order is
#     not an 8B's (it measures iq2_m+imatrix better than q3_k_s, q3_k_l better than q4_1).
#  3. Within such a run of IQ levels: more bits per weight first (QUANT_OPTIONS' bpw; same
#     grid family, more bits), since the 270M's order there is its row fallbacks' (on it
#     iq3_s and iq3_xs are the same file, and iq3_xxs beats iq3_m).
# iq1_* (no 1-bit figured level) follow the 2-bit levels; f32 > bf16 > f16 lead (no rounding;
# llama.cpp's Mistral-7B figures: bf16 -0.0050, f16 +0.0020); the levels only meaningful for
# models trained for them (q1_0, tq1_0, tq2_0) come last.
LADDER: tuple[str, ...] = (
    "f32", "bf16", "f16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s",
    "iq4_nl", "iq4_xs", "q4_1", "q4_0", "q3_k_l", "q3_k_m", "iq3_m", "iq3_s", "iq3_xs", "iq3_xxs",
    "q3_k_s", "iq2_m", "iq2_s", "q2_k_s", "q2_k", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s",
    "tq2_0", "tq1_0", "q1_0", "q2_0",
)

PPL_8B = "llama.cpp +ppl @ Llama-3-8B"
KLD_270M = "Gemma 3 270M KLD within its bit class, then bpw"
# Which source placed each level in LADDER (rules 1-3 above); tests check the order obeys them.
LADDER_SOURCE: dict[str, str] = {
    **{n: "unquantized (f32 exact; bf16 vs f16: llama.cpp @ Mistral-7B)" for n in ("f32", "bf16", "f16")},
    **{n: PPL_8B for n in LADDER if LEVELS[n].ppl is not None},
    **{n: KLD_270M for n in ("iq4_nl", "iq4_xs", "iq3_m", "iq3_s", "iq3_xs", "iq3_xxs", "iq2_m", "iq2_s",
                             "iq2_xs", "iq2_xxs")},
    **{n: "below every 2-bit level (no 1-bit figure); bpw" for n in ("iq1_m", "iq1_s")},
    **{n: "last: only for models trained for it" for n in ("tq2_0", "tq1_0", "q1_0", "q2_0")},
}

# quantize.cpp's aliases: the plain K names are the _M mixes.
ALIASES: dict[str, str] = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}


# Named sets a level list may name (`convert --quant publish`, `--quant publish,f16`). "all": every
# level this build can write, in LADDER order. "publish": what GGUF publishers commonly ship
# (the set issue 26 names: 8-bit for near-lossless, the 6/5/4-bit K mixes, IQ4_XS as the
# smallest good 4-bit one that needs no importance matrix).
SETS: dict[str, tuple[str, ...]] = {
    "all": tuple(n for n in LADDER if not LEVELS[n].unavailable),
    "publish": ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_xs"),
}


def canonical(name: str) -> str:
    """The level's canonical name for `name` (any case, aliases resolved); UsageError if unknown."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in LEVELS:
        raise UsageError(f"unknown quant level {name!r}; choose one of: {', '.join(LEVELS)} "
                         f"(any case; {', '.join(ALIASES)} mean the _m mixes)")
    return key


def level(name: str) -> Level:
    """The `Level` for a name as a user types it; UsageError if unknown."""
    return LEVELS[canonical(name)]


def usable(name: str) -> Level:
    """`level(name)`, refusing (UsageError) a level this build cannot write, with the reason."""
    lv = level(name)
    if lv.unavailable:
        raise UsageError(f"{lv.name} is not available: {lv.unavailable}")
    return lv


def parse_list(text: str) -> list[str]:
    """"q6_k,Q4_K_M, iq4_xs" -> canonical names, in order, without repeats; a set's name (`SETS`:
    "all", "publish") stands for its levels, alone or among others ("publish,f16")."""
    names: list[str] = []
    for part in text.split(","):
        key = part.strip().lower()
        if not key:
            continue
        if key not in SETS and ALIASES.get(key, key) not in LEVELS:
            sets = "; ".join(f"{n} ({','.join(levels)})" if n != "all" else "all" for n, levels in SETS.items())
            raise UsageError(f"unknown quant level {part.strip()!r}; choose from: {', '.join(LEVELS)} "
                             f"(any case; {', '.join(ALIASES)} mean the _m mixes), several separated by "
                             f"commas, or a set: {sets}")
        for name in SETS.get(key) or (usable(key).name,):
            if name not in names:
                names.append(name)
    if not names:
        raise UsageError(f"no quant level in {text!r}; give a comma-separated list such as q6_k,q4_k_m,iq4_xs")
    return names

"""llama-quant.cpp's per-tensor rules for every ftype, spot by spot, on real model shapes.

Expected types are written out by hand from llama_tensor_get_type_impl (src/llama-quant.cpp of
the llama.cpp vendored in llama-cpp-python 0.3.36), not computed with the code under test;
tests/test_quant_levels.py checks the same rules end to end against llama_model_quantize.
"""

from __future__ import annotations

import pytest
from gguf.constants import GGMLQuantizationType as T
from test_quant_rules import FACTS_7B, LLAMA_7B, MORE_BITS_32, llama_tensors, typed

from alpaca_local.convert.llama_quant import requires_imatrix
from alpaca_local.convert.quant_rules import ModelFacts, TensorSpec, choose_types, imatrix_required

# Llama-3-8B: 8 KV heads for 32 query heads (n_gqa 4), untied output.
LLAMA3_8B = llama_tensors(32, 4096, 14336, 128256, n_head_kv=8, rope_freqs=True)
FACTS_8B = ModelFacts(arch="llama", n_layer=32, n_head=32, n_head_kv=8)


def kinds(got: dict[str, T], kind: str) -> list[T]:
    """The type of blk.i.KIND.weight for i = 0..31."""
    return [got[f"blk.{i}.{kind}.weight"] for i in range(32)]


def test_q3_k_m() -> None:
    got = typed(LLAMA_7B, "q3_k_m", FACTS_7B)
    assert kinds(got, "attn_v") == [T.Q5_K] * 2 + [T.Q4_K] * 30  # i_attention_wv < 2
    assert kinds(got, "ffn_down") == [T.Q5_K] * 2 + [T.Q4_K] * 30  # n_layer/16, then Q4_K (not Falcon)
    assert set(kinds(got, "attn_output")) == {T.Q4_K}
    assert set(kinds(got, "attn_q") + kinds(got, "ffn_up") + kinds(got, "ffn_gate")) == {T.Q3_K}
    assert (got["token_embd.weight"], got["output.weight"]) == (T.Q3_K, T.Q6_K)


@pytest.mark.parametrize(("quant", "attn_v", "ffn_down", "attn_output", "base"), [
    ("q3_k_s", T.Q3_K, T.Q3_K, T.Q3_K, T.Q3_K),
    ("q3_k_l", T.Q5_K, T.Q5_K, T.Q5_K, T.Q3_K),
    ("q2_k", T.Q3_K, T.Q3_K, T.Q3_K, T.Q2_K),  # attn_v Q3_K: n_gqa 1 < 4
    ("q5_k_s", T.Q5_K, T.Q5_K, T.Q5_K, T.Q5_K),
    ("q6_k", T.Q6_K, T.Q6_K, T.Q6_K, T.Q6_K),
    ("q4_1", T.Q4_1, T.Q4_1, T.Q4_1, T.Q4_1),
    ("q5_1", T.Q5_1, T.Q5_1, T.Q5_1, T.Q5_1),
    ("iq3_s", T.IQ3_S, T.IQ3_S, T.IQ3_S, T.IQ3_S),  # attn_v stays: n_gqa 1
    ("tq1_0", T.TQ1_0, T.TQ1_0, T.TQ1_0, T.TQ1_0),
    ("q1_0", T.Q1_0, T.Q1_0, T.Q1_0, T.Q1_0),
])
def test_uniform_mixes(quant, attn_v, ffn_down, attn_output, base) -> None:
    got = typed(LLAMA_7B, quant, FACTS_7B)
    assert set(kinds(got, "attn_v")) == {attn_v}
    assert set(kinds(got, "ffn_down")) == {ffn_down}
    assert set(kinds(got, "attn_output")) == {attn_output}
    assert set(kinds(got, "attn_q") + kinds(got, "attn_k") + kinds(got, "ffn_up")) == {base}
    assert got["output.weight"] == T.Q6_K  # everything but Q8_0 and the IQ1/IQ2/IQ3_XXS mixes
    # token_embd (untied) keeps the default type, except the ternary mixes: Q4_K
    assert got["token_embd.weight"] == (T.Q4_K if quant == "tq1_0" else base)


def test_q4_k_s() -> None:
    got = typed(LLAMA_7B, "q4_k_s", FACTS_7B)
    assert kinds(got, "attn_v") == [T.Q5_K] * 4 + [T.Q4_K] * 28  # i_attention_wv < 4
    assert kinds(got, "ffn_down") == [T.Q5_K] * 4 + [T.Q4_K] * 28  # i_layer < n_layer/8
    assert set(kinds(got, "attn_q")) == {T.Q4_K}


@pytest.mark.parametrize("quant", ["iq4_nl", "iq4_xs"])
def test_iq4_on_gqa(quant) -> None:
    base = T.IQ4_NL if quant == "iq4_nl" else T.IQ4_XS
    plain = typed(LLAMA3_8B, quant, FACTS_8B)
    assert set(kinds(plain, "attn_v")) == {T.Q5_K}  # n_gqa >= 4
    assert kinds(plain, "ffn_down") == [T.Q5_K] * 4 + [base] * 28  # first eighth, without an imatrix
    assert set(kinds(plain, "attn_k")) == {base} and plain["output.weight"] == T.Q6_K
    with_imatrix = dict(zip([t.name for t in LLAMA3_8B], choose_types(LLAMA3_8B, quant, FACTS_8B, True)))
    assert set(kinds(with_imatrix, "ffn_down")) == {base}


def test_iq3_xs() -> None:
    got = typed(LLAMA3_8B, "iq3_xs", FACTS_8B)
    assert set(kinds(got, "attn_q") + kinds(got, "attn_k")) == {T.IQ3_XXS}
    middle = [T.IQ3_S] * 4 + [T.IQ3_XXS] * 24 + [T.IQ3_S] * 4  # n_layer/8 <= i < 7*n_layer/8
    assert kinds(got, "ffn_gate") == kinds(got, "ffn_up") == middle
    assert set(kinds(got, "attn_v")) == {T.Q4_K}  # n_gqa >= 4
    assert set(kinds(got, "ffn_down") + kinds(got, "attn_output")) == {T.IQ3_S}


@pytest.mark.parametrize("imatrix", [False, True])
def test_iq3_xxs(imatrix) -> None:
    got = dict(zip([t.name for t in LLAMA_7B], choose_types(LLAMA_7B, "iq3_xxs", FACTS_7B, imatrix)))
    assert (got["token_embd.weight"], got["output.weight"]) == (T.IQ3_S, T.Q5_K)
    assert set(kinds(got, "attn_q") + kinds(got, "attn_k")) == {T.IQ2_S}
    assert set(kinds(got, "attn_v")) == {T.IQ3_XXS if imatrix else T.IQ3_S}  # n_gqa 1
    assert kinds(got, "ffn_down") == ([T.IQ3_XXS] * 32 if imatrix else [T.Q4_K] * 4 + [T.Q3_K] * 28)
    assert set(kinds(got, "attn_output")) == {T.IQ3_S}
    assert set(kinds(got, "ffn_up")) == {T.IQ3_XXS}


@pytest.mark.parametrize(("quant", "base", "embd", "small", "attn_output"), [
    ("iq2_xxs", T.IQ2_XXS, T.Q2_K, T.Q2_K, T.IQ2_XXS),
    ("iq2_xs", T.IQ2_XS, T.Q2_K, T.Q2_K, T.IQ2_XS),
    ("iq2_s", T.IQ2_XS, T.IQ3_S, T.IQ3_S, T.IQ3_S),  # IQ2_S files hold IQ2_XS tensors
    ("iq2_m", T.IQ2_S, T.IQ3_S, T.IQ3_S, T.IQ3_S),
    ("iq1_s", T.IQ1_S, T.Q2_K, T.Q2_K, T.IQ2_XXS),
    ("iq1_m", T.IQ1_M, T.Q2_K, T.Q2_K, T.IQ2_XXS),
])
def test_iq2_and_iq1_mixes(quant, base, embd, small, attn_output) -> None:
    got = typed(LLAMA_7B, quant, FACTS_7B)
    assert (got["token_embd.weight"], got["output.weight"]) == (embd, T.Q5_K)
    assert set(kinds(got, "attn_v")) == {small}  # n_gqa 1, no experts
    assert kinds(got, "ffn_down") == [small] * 4 + [base] * 28  # i_ffn_down < n_ffn_down/8
    assert set(kinds(got, "attn_output")) == {attn_output}
    assert set(kinds(got, "attn_q") + kinds(got, "ffn_gate")) == {base}
    gqa = typed(LLAMA3_8B, quant, FACTS_8B)
    assert set(kinds(gqa, "attn_v")) == {T.Q4_K}  # n_gqa >= 4


def test_iq3_m() -> None:
    got = typed(LLAMA_7B, "iq3_m", FACTS_7B)
    assert set(kinds(got, "attn_v") + kinds(got, "attn_output")) == {T.Q4_K}
    assert kinds(got, "ffn_down") == [T.Q4_K] * 4 + [T.IQ3_S] * 28
    assert set(kinds(got, "attn_q")) == {T.IQ3_S} and got["output.weight"] == T.Q6_K


def test_q2_k_s_and_q2_k_on_gqa() -> None:
    s = typed(LLAMA3_8B, "q2_k_s", FACTS_8B)
    assert set(kinds(s, "attn_v")) == {T.Q4_K}
    assert kinds(s, "ffn_down") == [T.Q4_K] * 4 + [T.Q2_K] * 28
    assert set(kinds(s, "attn_output")) == {T.Q2_K}
    k = typed(LLAMA3_8B, "q2_k", FACTS_8B)
    assert set(kinds(k, "attn_v")) == {T.Q4_K} and set(kinds(k, "attn_output")) == {T.Q3_K}


def test_70b_lifts_q3_k_attn_v() -> None:
    tensors = llama_tensors(80, 8192, 28672, 32000, n_head=64, n_head_kv=8)
    got = typed(tensors, "q3_k_m", ModelFacts(arch="llama", n_layer=80, n_head=64, n_head_kv=8))
    # Q5_K for the first two anyway; Q4_K -> Q5_K for LLM_TYPE_70B
    assert {got[f"blk.{i}.attn_v.weight"] for i in range(80)} == {T.Q5_K}


def test_falcon_q3_k_l_attn_output() -> None:
    tensors = [TensorSpec("blk.0.attn_output.weight", (8192, 8192)), TensorSpec("output.weight", (65024, 8192))]
    facts = ModelFacts(arch="falcon", n_layer=1, n_head=128, n_head_kv=8)  # Falcon-40B widths
    assert choose_types(tensors, "q3_k_l", facts) == [T.Q4_K, T.Q8_0]  # Falcon's output is always Q8_0


# ---- mixture of experts ---------------------------------------------------------


def mixtral_layer(i: int) -> list[TensorSpec]:
    """One Mixtral-8x7B layer as convert_hf_to_gguf writes it: experts stacked in 3-D tensors."""
    p = f"blk.{i}."
    return [
        TensorSpec(p + "attn_q.weight", (4096, 4096)), TensorSpec(p + "attn_k.weight", (1024, 4096)),
        TensorSpec(p + "attn_v.weight", (1024, 4096)), TensorSpec(p + "attn_output.weight", (4096, 4096)),
        TensorSpec(p + "ffn_gate_inp.weight", (8, 4096)),
        TensorSpec(p + "ffn_gate_exps.weight", (8, 14336, 4096)), TensorSpec(p + "ffn_up_exps.weight", (8, 14336, 4096)),
        TensorSpec(p + "ffn_down_exps.weight", (8, 4096, 14336)),
        TensorSpec(p + "attn_norm.weight", (4096,)), TensorSpec(p + "ffn_norm.weight", (4096,)),
    ]


MIXTRAL = ([TensorSpec("token_embd.weight", (32000, 4096))] + [t for i in range(32) for t in mixtral_layer(i)]
           + [TensorSpec("output_norm.weight", (4096,)), TensorSpec("output.weight", (32000, 4096))])
FACTS_MIXTRAL = ModelFacts(arch="llama", n_layer=32, n_head=32, n_head_kv=8, n_expert=8)


@pytest.mark.parametrize(("quant", "attn_v", "attn_k", "attn_output", "down_first", "down_rest"), [
    ("q4_k_m", T.Q8_0, T.Q8_0, T.Q5_K, T.Q6_K, T.Q4_K),
    ("iq3_m", T.Q8_0, T.Q8_0, T.Q5_K, T.Q4_K, T.IQ3_S),  # ffn_down: first eighth, plus use_more_bits
    ("iq2_xxs", T.Q4_K, T.Q4_K, T.Q5_K, T.Q2_K, T.IQ2_XXS),  # the IQ2 branch: n_expert >= 4 / == 8
    ("q2_k", T.Q8_0, T.Q8_0, T.Q5_K, T.Q3_K, T.Q3_K),
])
def test_eight_experts(quant, attn_v, attn_k, attn_output, down_first, down_rest) -> None:
    got = typed(MIXTRAL, quant, FACTS_MIXTRAL)
    assert {got[f"blk.{i}.attn_v.weight"] for i in range(32)} == {attn_v}
    assert {got[f"blk.{i}.attn_k.weight"] for i in range(32)} == {attn_k}
    assert {got[f"blk.{i}.attn_output.weight"] for i in range(32)} == {attn_output}
    assert got["blk.0.ffn_down_exps.weight"] == down_first
    assert got["blk.5.ffn_down_exps.weight"] == down_rest  # 5: not in use_more_bits(i, 32)
    assert got["blk.0.ffn_gate_inp.weight"] == T.F32


def test_moe_ffn_down_layer_comes_from_the_name() -> None:
    """With experts, layer_info parses blk.N (llama-quant.cpp:456): the tensors' order does not matter."""
    got = typed(MIXTRAL, "q4_k_m", FACTS_MIXTRAL)
    more = [T.Q6_K if i in MORE_BITS_32 else T.Q4_K for i in range(32)]
    assert [got[f"blk.{i}.ffn_down_exps.weight"] for i in range(32)] == more
    stray = MIXTRAL + [TensorSpec("blk.40.ffn_down_exps.weight", (8, 4096, 14336))]
    from alpaca_local.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match=r"Bad layer 40 .* \[0, 32\)"):
        choose_types(stray, "q4_k_m", FACTS_MIXTRAL)


def test_mxfp4_moe() -> None:
    got = typed(MIXTRAL, "mxfp4_moe", FACTS_MIXTRAL)
    assert {got[f"blk.3.ffn_{k}_exps.weight"] for k in ("gate", "up", "down")} == {T.MXFP4}  # ne[2] > 1
    assert {got[f"blk.3.attn_{k}.weight"] for k in ("q", "k", "v", "output")} == {T.Q8_0}
    assert (got["token_embd.weight"], got["output.weight"]) == (T.Q8_0, T.Q8_0)
    # bailingmoe3's 3-D MLA projections are not experts: Q8_0
    mla = [TensorSpec("blk.0.attn_q_b.weight", (4, 128, 256)), TensorSpec("blk.0.ffn_up_exps.weight", (4, 64, 256))]
    facts = ModelFacts(arch="bailingmoe3", n_layer=1, n_head=4, n_head_kv=4, n_expert=4)
    assert choose_types(mla, "mxfp4_moe", facts) == [T.Q8_0, T.MXFP4]


# ---- imatrix requirement ----------------------------------------------------------


@pytest.mark.parametrize(("name", "ggml_type", "quant", "needs"), [
    ("blk.0.ffn_up.weight", T.IQ2_XXS, "iq2_xxs", True),
    ("blk.0.ffn_up.weight", T.IQ3_XXS, "iq3_xs", True),
    ("blk.0.ffn_up.weight", T.IQ1_M, "iq1_m", True),
    ("blk.0.ffn_up.weight", T.IQ2_S, "iq2_m", True),
    ("blk.0.ffn_up.weight", T.IQ3_S, "iq3_s", False),
    ("blk.0.ffn_up.weight", T.IQ4_XS, "iq4_xs", False),
    ("blk.0.ffn_up.weight", T.Q2_K, "q2_k_s", True),  # "the only exception": Q2_K in a Q2_K_S file
    ("blk.0.ffn_up.weight", T.Q2_K, "iq2_xxs", False),
    ("blk.0.ffn_up.weight", T.Q2_K, "q2_k", False),
    ("token_embd.weight", T.IQ2_XXS, "iq2_xxs", False),  # embeddings and output never need one
    ("output.weight", T.IQ1_S, "iq1_s", False),
])
def test_requires_imatrix(name, ggml_type, quant, needs) -> None:
    from alpaca_local.convert.quant_levels import level

    assert requires_imatrix(name, ggml_type, level(quant).ftype) == needs


@pytest.mark.parametrize(("quant", "needs"), [
    ("iq2_xxs", True), ("iq2_xs", True), ("iq2_s", True), ("iq2_m", True), ("iq1_s", True), ("iq1_m", True),
    ("q2_k_s", True), ("iq3_xxs", True), ("iq3_xs", True),
    ("q2_k", False), ("iq3_s", False), ("iq3_m", False), ("iq4_xs", False), ("q3_k_s", False), ("tq1_0", False),
])
def test_which_levels_need_an_imatrix_on_llama_7b(quant, needs) -> None:
    assert bool(imatrix_required(LLAMA_7B, choose_types(LLAMA_7B, quant, FACTS_7B), quant)) == needs


def test_rows_that_fall_back_need_no_imatrix() -> None:
    """OpenLLaMA-3B's rows of 3200: IQ2_XXS falls back to IQ4_NL everywhere, so no imatrix is needed."""
    tensors = llama_tensors(26, 3200, 8640, 32000)
    facts = ModelFacts(arch="llama", n_layer=26, n_head=32, n_head_kv=32)
    types = choose_types(tensors, "iq2_xxs", facts)
    assert T.IQ2_XXS not in types and T.IQ4_NL in types
    assert imatrix_required(tensors, types, "iq2_xxs") == []

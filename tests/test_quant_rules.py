"""Per-tensor type choice and byte sizes, as llama.cpp's convert + quantize give them.

Expected types are written out by hand from the rules in
src/llama-quant.cpp (llama_tensor_get_type_impl) and conversion/base.py
(prepare_tensors), not computed with the code under test.
"""

from __future__ import annotations

import random

import pytest
from gguf.constants import GGMLQuantizationType as T
from gguf.constants import LlamaFileType as F

from alpaca_local.errors import UsageError
from alpaca_local.convert.quant_rules import (
    QUANT_FILE_SUFFIX,
    QUANTS,
    ModelFacts,
    TensorSpec,
    choose_types,
    f16_type,
    file_type,
    llama_quantize_order,
    tensor_nbytes,
)

# use_more_bits(i, 32): i < 4, i >= 28, or (i - 4) % 3 == 2.
MORE_BITS_32 = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
# use_more_bits(i, 80): i < 10, i >= 70, or (i - 10) % 3 == 2.
MORE_BITS_80 = set(range(10)) | set(range(70, 80)) | set(range(12, 70, 3))


def llama_tensors(
    n_layer: int,
    hidden: int,
    ffn: int,
    vocab: int,
    n_head: int = 32,
    n_head_kv: int = 32,
    tied: bool = False,
    rope_freqs: bool = False,
) -> list[TensorSpec]:
    """A LLaMA tensor list in the order convert_hf_to_gguf writes an HF
    LlamaForCausalLM state dict (q, k, v, o, gate, down, up, norms per layer)."""
    kv = hidden // n_head * n_head_kv
    out = []
    if rope_freqs:  # generate_extra_tensors comes first (conversion/llama.py:298)
        out.append(TensorSpec("rope_freqs.weight", (hidden // n_head // 2,)))
    out.append(TensorSpec("token_embd.weight", (vocab, hidden)))
    for i in range(n_layer):
        out += [
            TensorSpec(f"blk.{i}.attn_q.weight", (hidden, hidden)),
            TensorSpec(f"blk.{i}.attn_k.weight", (kv, hidden)),
            TensorSpec(f"blk.{i}.attn_v.weight", (kv, hidden)),
            TensorSpec(f"blk.{i}.attn_output.weight", (hidden, hidden)),
            TensorSpec(f"blk.{i}.ffn_gate.weight", (ffn, hidden)),
            TensorSpec(f"blk.{i}.ffn_down.weight", (hidden, ffn)),
            TensorSpec(f"blk.{i}.ffn_up.weight", (ffn, hidden)),
            TensorSpec(f"blk.{i}.attn_norm.weight", (hidden,)),
            TensorSpec(f"blk.{i}.ffn_norm.weight", (hidden,)),
        ]
    out.append(TensorSpec("output_norm.weight", (hidden,)))
    if not tied:
        out.append(TensorSpec("output.weight", (vocab, hidden)))
    return out


LLAMA_7B = llama_tensors(32, 4096, 11008, 32001)
FACTS_7B = ModelFacts(arch="llama", n_layer=32, n_head=32, n_head_kv=32)


def typed(tensors: list[TensorSpec], quant: str, facts: ModelFacts) -> dict[str, T]:
    return {t.name: ty for t, ty in zip(tensors, choose_types(tensors, quant, facts), strict=True)}


def layer_of(name: str) -> int:
    return int(name.split(".")[1])


def expected_7b(name: str, quant: str) -> T:
    """Hand-written llama.cpp result for one LLaMA-7B tensor."""
    if name.endswith("_norm.weight"):
        return T.F32  # convert: norms F32; quantize: never quantizes norms
    base = {"f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_k_m": T.Q4_K, "q5_k_m": T.Q5_K}[quant]
    if name == "output.weight":
        # F16 is untouched; Q8_0 stays Q8_0; everything else -> Q6_K
        return {"f16": T.F16, "q8_0": T.Q8_0}.get(quant, T.Q6_K)
    if quant in ("q4_k_m", "q5_k_m") and name.endswith((".attn_v.weight", ".ffn_down.weight")):
        return T.Q6_K if layer_of(name) in MORE_BITS_32 else base
    return base


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m"])
def test_llama_7b_every_tensor(quant: str) -> None:
    got = typed(LLAMA_7B, quant, FACTS_7B)
    want = {t.name: expected_7b(t.name, quant) for t in LLAMA_7B}
    assert got == want


@pytest.mark.parametrize(
    ("quant", "name", "want"),
    [
        ("q4_k_m", "token_embd.weight", T.Q4_K),
        ("q4_k_m", "output.weight", T.Q6_K),
        ("q4_k_m", "output_norm.weight", T.F32),
        ("q4_k_m", "blk.0.attn_v.weight", T.Q6_K),
        ("q4_k_m", "blk.4.attn_v.weight", T.Q4_K),
        ("q4_k_m", "blk.6.ffn_down.weight", T.Q6_K),
        ("q4_k_m", "blk.7.ffn_down.weight", T.Q4_K),
        ("q4_k_m", "blk.31.ffn_down.weight", T.Q6_K),
        ("q4_k_m", "blk.5.attn_k.weight", T.Q4_K),
        ("q4_k_m", "blk.5.ffn_up.weight", T.Q4_K),
        ("q5_k_m", "token_embd.weight", T.Q5_K),
        ("q5_k_m", "blk.27.attn_v.weight", T.Q6_K),
        ("q5_k_m", "blk.26.attn_v.weight", T.Q5_K),
        ("q4_0", "output.weight", T.Q6_K),
        ("q4_0", "token_embd.weight", T.Q4_0),
        ("q4_0", "blk.0.ffn_down.weight", T.Q4_0),  # Q4_1 only with an imatrix
        ("q8_0", "output.weight", T.Q8_0),
        ("f16", "blk.0.attn_norm.weight", T.F32),
    ],
)
def test_llama_7b_spot_checks(quant: str, name: str, want: T) -> None:
    assert typed(LLAMA_7B, quant, FACTS_7B)[name] == want


def test_half_of_attn_v_and_ffn_down_get_more_bits() -> None:
    got = typed(LLAMA_7B, "q4_k_m", FACTS_7B)
    for kind in ("attn_v", "ffn_down"):
        six = [i for i in range(32) if got[f"blk.{i}.{kind}.weight"] == T.Q6_K]
        assert set(six) == MORE_BITS_32 and len(six) == 16


def test_input_order_does_not_matter() -> None:
    # llama-quantize replays tensors in its own (layer, name) order.
    shuffled = list(LLAMA_7B)
    random.Random(7).shuffle(shuffled)
    assert typed(shuffled, "q4_k_m", FACTS_7B) == typed(LLAMA_7B, "q4_k_m", FACTS_7B)


def test_llama_quantize_order() -> None:
    names = ["blk.10.attn_q.weight", "token_embd.weight", "blk.2.ffn_up.weight",
             "output.weight", "blk.2.attn_k.weight", "output_norm.weight", "blk.9.attn_v.weight"]
    order = [names[i] for i in llama_quantize_order(names)]
    assert order == [
        "output.weight", "output_norm.weight", "token_embd.weight",  # no layer: -1, by name
        "blk.2.attn_k.weight", "blk.2.ffn_up.weight",
        "blk.9.attn_v.weight", "blk.10.attn_q.weight",  # numeric, not "10" < "9"
    ]


def test_gqa_llama3_8b() -> None:
    # Llama-3-8B: 8 KV heads (n_gqa 4), rope_freqs, ffn 14336 = 56 * 256.
    tensors = llama_tensors(32, 4096, 14336, 128256, n_head_kv=8, rope_freqs=True)
    facts = ModelFacts(arch="llama", n_layer=32, n_head=32, n_head_kv=8)
    got = typed(tensors, "q4_k_m", facts)
    assert got["rope_freqs.weight"] == T.F32
    assert got["token_embd.weight"] == T.Q4_K
    assert got["output.weight"] == T.Q6_K
    for i in range(32):
        more = T.Q6_K if i in MORE_BITS_32 else T.Q4_K
        assert got[f"blk.{i}.attn_v.weight"] == more
        assert got[f"blk.{i}.ffn_down.weight"] == more
        assert got[f"blk.{i}.attn_k.weight"] == T.Q4_K


@pytest.mark.parametrize(
    ("n_head_kv", "quant", "plain_attn_v"),
    [
        (8, "q4_k_m", T.Q5_K),  # LLaMA-2-70B is LLM_TYPE_70B: Q4_K attn_v -> Q5_K
        (8, "q5_k_m", T.Q5_K),  # the 70B bump only lifts Q3_K / Q4_K
        (64, "q4_k_m", T.Q4_K),  # 80 layers without GQA is LLaMA-65B: no bump
        (8, "q4_0", T.Q4_0),
    ],
)
def test_70b_attn_v(n_head_kv: int, quant: str, plain_attn_v: T) -> None:
    tensors = llama_tensors(80, 8192, 28672, 32000, n_head=64, n_head_kv=n_head_kv)
    facts = ModelFacts(arch="llama", n_layer=80, n_head=64, n_head_kv=n_head_kv)
    got = typed(tensors, quant, facts)
    for i in range(80):
        more = quant in ("q4_k_m", "q5_k_m") and i in MORE_BITS_80
        assert got[f"blk.{i}.attn_v.weight"] == (T.Q6_K if more else plain_attn_v)


@pytest.mark.parametrize(
    ("quant", "want"),
    [("q4_k_m", T.Q6_K), ("q5_k_m", T.Q6_K), ("q4_0", T.Q6_K), ("q8_0", T.Q8_0), ("f16", T.F16)],
)
def test_tied_embeddings_take_the_output_rule(quant: str, want: T) -> None:
    tensors = llama_tensors(2, 256, 512, 1000, n_head=2, n_head_kv=2, tied=True)
    facts = ModelFacts(arch="llama", n_layer=2, n_head=2, n_head_kv=2)
    assert typed(tensors, quant, facts)["token_embd.weight"] == want


# OpenLLaMA-3B: hidden 3200 (= 12.5 * 256, = 100 * 32), ffn 8640 (= 33.75 * 256).
OPEN_LLAMA_3B = llama_tensors(26, 3200, 8640, 32000)
FACTS_3B = ModelFacts(arch="llama", n_layer=26, n_head=32, n_head_kv=32)
# use_more_bits(i, 26): i < 3, i >= 22, or (i - 3) % 3 == 2.
MORE_BITS_26 = {0, 1, 2, 5, 8, 11, 14, 17, 20, 22, 23, 24, 25}


@pytest.mark.parametrize(
    ("quant", "plain", "more", "output"),
    [
        # tensor_type_fallback: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0
        ("q4_k_m", T.Q5_0, T.Q8_0, T.Q8_0),  # output: ne0 % 256 != 0 -> Q8_0 directly
        ("q5_k_m", T.Q5_1, T.Q8_0, T.Q8_0),
        ("q4_0", T.Q4_0, T.Q4_0, T.Q8_0),  # output: Q6_K, then falls back to Q8_0
        ("q8_0", T.Q8_0, T.Q8_0, T.Q8_0),
    ],
)
def test_rows_not_multiple_of_256_fall_back(quant: str, plain: T, more: T, output: T) -> None:
    got = typed(OPEN_LLAMA_3B, quant, FACTS_3B)
    assert got["output.weight"] == output
    assert got["token_embd.weight"] == plain
    for i in range(26):
        assert got[f"blk.{i}.attn_q.weight"] == plain
        assert got[f"blk.{i}.ffn_down.weight"] == (more if i in MORE_BITS_26 else plain)
        assert got[f"blk.{i}.attn_v.weight"] == (more if i in MORE_BITS_26 else plain)
        assert got[f"blk.{i}.attn_norm.weight"] == T.F32


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_k_m", "q5_k_m"])
def test_rows_not_multiple_of_32_become_f16(quant: str) -> None:
    # hidden 100: no 32-block type fits, "must use F16 due to unusual shape".
    tensors = llama_tensors(1, 100, 64, 50, n_head=1, n_head_kv=1)
    facts = ModelFacts(arch="llama", n_layer=1, n_head=1, n_head_kv=1)
    got = typed(tensors, quant, facts)
    assert got["blk.0.attn_q.weight"] == T.F16
    assert got["output.weight"] == T.F16
    assert got["blk.0.attn_norm.weight"] == T.F32
    # ffn_down's rows are 64 long: fine for 32-block types, not for K-quants.
    assert got["blk.0.ffn_down.weight"] == {
        "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_k_m": T.Q8_0, "q5_k_m": T.Q8_0}[quant]


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        (TensorSpec("blk.0.attn_q.weight", (4096, 4096)), T.F16),
        (TensorSpec("blk.0.attn_norm.weight", (4096,)), T.F32),
        (TensorSpec("blk.0.attn_q.bias", (4096,)), T.F32),
        (TensorSpec("blk.0.attn_q.bias", (1, 4096)), T.F32),  # not a weight
        (TensorSpec("rope_freqs.weight", (64,)), T.F32),
        (TensorSpec("blk.0.q_norm.weight", (8, 128)), T.F32),  # 2-D but a norm
    ],
)
def test_convert_f16_step(spec: TensorSpec, want: T) -> None:
    assert f16_type(spec, FACTS_7B) == want


def test_2d_tensor_with_one_row_is_f16_not_quantized() -> None:
    # convert sees numpy rank 2 -> F16; quantize sees ggml_n_dims 1 -> keeps F16.
    tensors = LLAMA_7B + [TensorSpec("blk.0.extra.weight", (1, 4096))]
    assert typed(tensors, "q4_k_m", FACTS_7B)["blk.0.extra.weight"] == T.F16


def test_ffn_gate_inp_stays_f32_for_mixtral() -> None:
    spec = TensorSpec("blk.0.ffn_gate_inp.weight", (8, 4096))
    facts = ModelFacts(arch="llama", n_layer=32, n_head=32, n_head_kv=8, n_expert=8)
    assert f16_type(spec, facts) == T.F32
    assert choose_types([spec], "q4_k_m", facts) == [T.F32]


def test_eight_experts_bump_attention() -> None:
    # Mixtral-style: attn_v / attn_k -> Q8_0, attn_output -> Q5_K under Q4_K_M.
    facts = ModelFacts(arch="llama", n_layer=1, n_head=32, n_head_kv=8, n_expert=8)
    tensors = [
        TensorSpec("blk.0.attn_v.weight", (1024, 4096)),
        TensorSpec("blk.0.attn_k.weight", (1024, 4096)),
        TensorSpec("blk.0.attn_output.weight", (4096, 4096)),
        TensorSpec("blk.0.ffn_down_exps.weight", (8, 4096, 14336)),
    ]
    assert choose_types(tensors, "q4_k_m", facts) == [T.Q8_0, T.Q8_0, T.Q5_K, T.Q6_K]


# ---- byte sizes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "ggml_type", "nbytes"),
    [
        ((4096,), T.F32, 16384),
        ((4096, 4096), T.F16, 4096 * 4096 * 2),
        ((4096, 4096), T.Q8_0, 4096 * 128 * 34),
        ((4096, 4096), T.Q4_0, 4096 * 128 * 18),
        ((4096, 4096), T.Q4_K, 4096 * 16 * 144),
        ((4096, 4096), T.Q5_K, 4096 * 16 * 176),
        ((4096, 4096), T.Q6_K, 4096 * 16 * 210),
        ((4096, 11008), T.Q6_K, 4096 * 43 * 210),
        ((8, 4096, 14336), T.Q4_K, 8 * 4096 * 56 * 144),
        ((3200, 3200), T.Q5_0, 3200 * 100 * 22),
    ],
)
def test_tensor_nbytes(shape: tuple[int, ...], ggml_type: T, nbytes: int) -> None:
    assert tensor_nbytes(shape, ggml_type) == nbytes


def test_tensor_nbytes_rejects_partial_blocks() -> None:
    with pytest.raises(ValueError, match="3200"):
        tensor_nbytes((3200, 3200), T.Q4_K)


def total(tensors: list[TensorSpec], quant: str, facts: ModelFacts) -> int:
    types = choose_types(tensors, quant, facts)
    return sum(tensor_nbytes(t.shape, ty) for t, ty in zip(tensors, types, strict=True))


def test_llama_7b_q4_0_size() -> None:
    per_layer = (
        4 * 4096 * 4096 // 32 * 18  # q, k, v, o
        + 3 * 11008 * 4096 // 32 * 18  # gate, up, down
        + 2 * 4096 * 4  # two norms
    )
    want = (
        32 * per_layer
        + 32001 * 4096 // 32 * 18  # token_embd Q4_0
        + 32001 * 4096 // 256 * 210  # output Q6_K
        + 4096 * 4  # output_norm
    )
    assert want == 3_825_071_648  # ~3.8 GB of tensor data
    assert total(LLAMA_7B, "q4_0", FACTS_7B) == want


def test_llama_7b_q4_k_m_size() -> None:
    def q4k(rows: int, cols: int) -> int:
        return rows * cols // 256 * 144

    def q6k(rows: int, cols: int) -> int:
        return rows * cols // 256 * 210

    layers = 0
    for i in range(32):
        wide = q6k if i in MORE_BITS_32 else q4k
        layers += 3 * q4k(4096, 4096) + wide(4096, 4096)  # q, k, o + v
        layers += 2 * q4k(11008, 4096) + wide(4096, 11008)  # gate, up + down
        layers += 2 * 4096 * 4
    want = layers + q4k(32001, 4096) + q6k(32001, 4096) + 4096 * 4
    assert total(LLAMA_7B, "q4_k_m", FACTS_7B) == want


def test_llama_7b_f16_size() -> None:
    n_params_2d = 32 * (4 * 4096 * 4096 + 3 * 11008 * 4096) + 2 * 32001 * 4096
    n_params_1d = 32 * 2 * 4096 + 4096
    assert total(LLAMA_7B, "f16", FACTS_7B) == 2 * n_params_2d + 4 * n_params_1d


# ---- names ----------------------------------------------------------------------


def test_quant_names() -> None:
    assert {n: QUANTS[n] for n in ("f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k", "iq4_xs", "bf16", "f32")} == {
        "f16": F.MOSTLY_F16, "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0, "q4_k_m": F.MOSTLY_Q4_K_M,
        "q5_k_m": F.MOSTLY_Q5_K_M, "q6_k": F.MOSTLY_Q6_K, "iq4_xs": F.MOSTLY_IQ4_XS, "bf16": F.MOSTLY_BF16,
        "f32": F.ALL_F32,
    }
    assert QUANT_FILE_SUFFIX["q4_k_m"] == "Q4_K_M" and QUANT_FILE_SUFFIX["iq2_xxs"] == "IQ2_XXS"
    assert file_type("q4_k_m") == file_type("Q4_K_M") == file_type("q4_k") == F.MOSTLY_Q4_K_M
    assert file_type("Q3_K") == F.MOSTLY_Q3_K_M and file_type("q5_k") == F.MOSTLY_Q5_K_M


@pytest.mark.parametrize("bad", ["q4_k_xl", "Q4_K_Q", "", "q3_k_xs", "q4"])
def test_unknown_quant_lists_valid_ones(bad: str) -> None:
    with pytest.raises(UsageError, match=r"q4_k_m") as err:
        file_type(bad)
    assert repr(bad) in str(err.value)
    with pytest.raises(UsageError):
        choose_types(LLAMA_7B, bad, FACTS_7B)

"""`convert BASE --lora ADAPTER`: the merged GGUF equals the three-step reference route.

Truth: PEFT's own `merge_and_unload()` (the real library) of the base plus the
adapters, saved as a float32 HF folder, then llama.cpp's vendored
convert_hf_to_gguf.py --outtype f16 (and llama-quantize for the quant levels).
Both sides merge in float32 (PEFT on a float32 model; we widen the f16 base
rows), so the F16 files are compared tensor for tensor, byte for byte.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import peft_adapters as pa
import reference
import tinyarch
import tinymodels
from alpaca_local.convert.pipeline import convert
from alpaca_local.source.adapter import read_adapter

pytestmark = pytest.mark.reference

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodels.build_llama(tmp_path_factory.mktemp("base") / "tiny-base", hidden=64, intermediate=128).path


def _equal_to_reference(tmp: Path, base: Path, adapters: list[Path], quant: str = "f16", scales=None,
                        vocab_rows: int | None = None, pre: str | None = None) -> dict:
    merged = pa.peft_merged(base, adapters, tmp / "peft-merged", vocab_rows=vocab_rows)
    if pre is None:
        ref = reference.reference_file(merged, tmp, quant)
    else:  # a tiny BPE vocabulary: the reference runs with the pre-tokenizer named (test_architectures)
        from test_architectures import _reference_file

        ref = _reference_file(tinyarch.TinyModel(merged, {}, {}, "bpe", pre), tmp, quant)
    ours = tmp / f"ours.{quant}.gguf"
    convert(base, ours, quant, adapters=[read_adapter(a, s) for a, s in zip(adapters, scales or [1.0] * len(adapters))])
    a, b = reference.tensor_table(ours), reference.tensor_table(ref)
    assert a.keys() == b.keys()
    differ = reference.lora_mismatches(a, b)
    assert not differ, f"{len(differ)} tensors differ from the reference route, e.g. {differ[:3]}"
    return a


CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR,
                     rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6},
                     alpha_pattern={"layers.0.self_attn.q_proj": 3, "up_proj": 32}),
    # PEFT resets fan_in_fan_out to False on nn.Linear; so must we.
    "fan_in_fan_out": dict(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["q_proj", "o_proj"]),
    "embedding": dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"]),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["k_proj"], modules_to_save=["lm_head"]),
    # TrainableTokensLayer: the listed rows are replaced (a list: the input embedding's; a dict: by module)
    "trainable_tokens": dict(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[3, 100, 7]),
    "trainable_tokens_dict": dict(r=4, lora_alpha=8, target_modules=["v_proj"],
                                  trainable_token_indices={"embed_tokens": [5, 2], "lm_head": [2, 511, 9]}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_equals_peft_then_reference(case: str, base: Path, tmp_path: Path) -> None:
    adapter = pa.make_adapter(base, tmp_path / f"lora-{case}", **CASES[case])
    _equal_to_reference(tmp_path, base, [adapter])


def test_bin_adapter_read_without_torch_load(base: Path, tmp_path: Path) -> None:
    adapter = pa.make_adapter(base, tmp_path / "lora-bin", bin_format=True, **CASES["plain"])
    assert (adapter / "adapter_model.bin").is_file()
    _equal_to_reference(tmp_path, base, [adapter])


def test_two_adapters_stacked_in_order(base: Path, tmp_path: Path) -> None:
    first = pa.make_adapter(base, tmp_path / "first", seed=1, **CASES["dora"])  # DoRA: order matters
    second = pa.make_adapter(base, tmp_path / "second", seed=2, **CASES["plain"])
    _equal_to_reference(tmp_path, base, [first, second])


def test_resized_vocab_and_added_tokens(base: Path, tmp_path: Path) -> None:
    import gguf

    rows = 515  # the base has 513 rows (512 pieces + [PAD])
    adapter = pa.make_adapter(base, tmp_path / "lora-chat", vocab_rows=rows, r=4, lora_alpha=8,
                              target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])
    table = _equal_to_reference(tmp_path, base, [adapter], vocab_rows=rows)
    assert table["token_embd.weight"][1] == (64, rows)
    reader = gguf.GGUFReader(tmp_path / "ours.f16.gguf")
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert [bytes(tokens.parts[i]).decode() for i in tokens.data[-2:]] == list(pa.ADDED)


def test_resized_vocab_with_embeddings_in_modules_to_save(base: Path, tmp_path: Path) -> None:
    """Issue 22: a fine-tune that adds tokens and trains both embeddings whole. PEFT saves each
    as `X.weight`, `X.modules_to_save.weight` and `X.original_module.weight`; PEFT's merge keeps
    the first (the trained copy), and so must we."""
    from safetensors import safe_open

    rows = 515
    adapter = pa.make_adapter(base, tmp_path / "lora-added-tokens", vocab_rows=rows, r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])
    with safe_open(adapter / "adapter_model.safetensors", "np") as f:
        saved = {k for k in f.keys() if "lora_" not in k}
    assert saved == {f"base_model.model.{m}{part}.weight" for m in ("model.embed_tokens", "lm_head")
                     for part in ("", ".modules_to_save", ".original_module")}
    table = _equal_to_reference(tmp_path, base, [adapter], vocab_rows=rows)
    assert table["token_embd.weight"][1] == table["output.weight"][1] == (64, rows)


def test_resized_vocab_with_trainable_token_rows(base: Path, tmp_path: Path) -> None:
    """Added tokens trained alone: PEFT saves the resized embeddings whole (the input one as
    its token_adapter's base layer) and the new ids' rows, which replace those rows."""
    rows = 515
    adapter = pa.make_adapter(base, tmp_path / "lora-new-tokens", vocab_rows=rows, r=4, lora_alpha=8,
                              target_modules=["q_proj"], trainable_token_indices=[513, 514, 1])
    table = _equal_to_reference(tmp_path, base, [adapter], vocab_rows=rows)
    assert table["token_embd.weight"][1] == (64, rows)


@pytest.mark.parametrize("embeddings", ["modules_to_save", "trainable_tokens"])
def test_dora_and_rslora_on_a_resized_vocabulary(embeddings: str, base: Path, tmp_path: Path) -> None:
    """The combinations a chat fine-tune meets at once: DoRA and rsLoRA on every linear layer,
    added tokens, the embeddings trained whole or only their new rows."""
    rows = 515
    extra = (dict(modules_to_save=["embed_tokens", "lm_head"]) if embeddings == "modules_to_save"
             else dict(trainable_token_indices={"embed_tokens": [513, 514], "lm_head": [514, 0]}))
    adapter = pa.make_adapter(base, tmp_path / "lora", vocab_rows=rows, r=8, lora_alpha=16, use_dora=True,
                              use_rslora=True, target_modules=ALL_LINEAR, **extra)
    _equal_to_reference(tmp_path, base, [adapter], vocab_rows=rows)


def test_quant_levels_follow_from_the_merged_f16(base: Path, tmp_path: Path) -> None:
    adapter = pa.make_adapter(base, tmp_path / "lora", **CASES["plain"])
    _equal_to_reference(tmp_path, base, [adapter], quant="q4_k_m")


def test_lora_scale_multiplies_the_peft_scale(base: Path, tmp_path: Path) -> None:
    """--lora-scale 0.5 on an adapter = PEFT merging the same adapter with lora_alpha halved."""
    import json

    adapter = pa.make_adapter(base, tmp_path / "lora", **CASES["plain"])
    halved = tmp_path / "halved"
    shutil.copytree(adapter, halved)
    cfg = json.loads((halved / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] / 2
    (halved / "adapter_config.json").write_text(json.dumps(cfg))
    expected = tmp_path / "expected.gguf"
    convert(base, expected, "f16", adapters=[read_adapter(halved)])
    convert(base, tmp_path / "scaled.gguf", "f16", adapters=[read_adapter(adapter, 0.5)])
    assert reference.tensor_table(tmp_path / "scaled.gguf") == reference.tensor_table(expected)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gemma2"])
def test_other_architectures(arch: str, tmp_path: Path) -> None:
    model = getattr(tinyarch, f"build_{arch}")(tmp_path / f"tiny-{arch}")
    adapter = pa.make_adapter(model.path, tmp_path / "lora", r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    _equal_to_reference(tmp_path, model.path, [adapter], pre=model.pre)


def test_trainable_tokens_on_tied_embeddings(tmp_path: Path) -> None:
    """Gemma 2 ties lm_head to embed_tokens: PEFT saves the rows once (the lm_head's adapter is
    tied to the embedding's), and the GGUF's output is token_embd, rows replaced."""
    model = tinyarch.build_gemma2(tmp_path / "tiny-gemma2")
    adapter = pa.make_adapter(model.path, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["q_proj"],
                              trainable_token_indices=[4, 40])
    assert list(read_adapter(adapter).token_rows) == ["model.embed_tokens.weight"]
    _equal_to_reference(tmp_path, model.path, [adapter], pre=model.pre)


def _kv(path: Path) -> dict:
    import gguf

    fields = gguf.GGUFReader(path).fields
    return {k: f.contents() for k, f in fields.items() if k.startswith(("general.", "alpaca_local.", "tokenizer.chat"))}


def test_provenance_and_chat_template(base: Path, tmp_path: Path) -> None:
    """Metadata names the base and the adapters; the chat template is the adapter's, else the base's, else Alpaca."""
    import json

    from alpaca_local.template import ALPACA_CHAT_TEMPLATE

    adapter = pa.make_adapter(base, tmp_path / "my-alpaca-lora", r=4, lora_alpha=8, target_modules=["q_proj"])
    kv = _kv(convert(base, tmp_path / "a.gguf", "q8_0", adapters=[read_adapter(adapter, 0.5)]).output)
    assert kv["general.name"] == "my-alpaca-lora"
    assert kv["general.base_model.0.name"] == "tiny-base"
    assert kv["alpaca_local.lora.merged"] == ["my-alpaca-lora"]
    assert kv["alpaca_local.lora.scale"] == [0.5]
    assert kv["tokenizer.chat_template"] == ALPACA_CHAT_TEMPLATE  # neither folder has one
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    (adapter / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    kv = _kv(convert(base, tmp_path / "b.gguf", "q8_0", adapters=[read_adapter(adapter)]).output)
    assert kv["tokenizer.chat_template"] == template


def test_default_output_is_named_after_the_fine_tune(base: Path, tmp_path: Path) -> None:
    adapter = pa.make_adapter(base, tmp_path / "alpaca-lora-7b", r=4, lora_alpha=8, target_modules=["q_proj"])
    result = convert(base, None, "q8_0", models_dir=tmp_path / "models", adapters=[read_adapter(adapter)])
    assert result.output == tmp_path / "models" / "alpaca-lora-7b.Q8_0.gguf"


def test_round_to_f16_is_numpys_rounding() -> None:
    """The merged rows' trip through f16 (ggml's row conversions) rounds exactly as numpy's astype,
    which is what the reference route's F16 file holds: normals, f16 subnormals, ties, signed zeros."""
    import numpy as np

    from alpaca_local.convert.ggml import round_to_f16

    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.standard_normal(4096) * 0.02, rng.standard_normal(1024) * 1e-6, rng.standard_normal(512) * 300,
        np.float32([0.0, -0.0, 1 + 2**-11, 1 + 3 * 2**-11, 2**-24, 3 * 2**-25, 65504.0]),
    ]).astype(np.float32).reshape(1, -1)
    want = values.astype(np.float16).astype(np.float32)
    assert np.array_equal(round_to_f16(values).view(np.uint32), want.view(np.uint32))
    for n in (1, 7, 8, 15, 16, 17, 63, 64, 65, 1000):  # ggml's SIMD loops and the tail after them
        v = (rng.standard_normal((2, n)) * 10.0 ** rng.integers(-9, 4, (2, n))).astype(np.float32)
        with np.errstate(over="ignore"):
            want = v.astype(np.float16).astype(np.float32)
        assert np.array_equal(round_to_f16(v).view(np.uint32), want.view(np.uint32)), n


def test_dora_row_norms_are_torchs() -> None:
    """DoRA divides by torch.linalg.norm of each merged row; ours sums in torch's order, so the
    quotient, and the f16 it rounds to, is PEFT's bit for bit (an einsum is an ulp off in ~25% of rows)."""
    import numpy as np
    import torch

    from alpaca_local.convert.lora_merge import row_norms

    rng = np.random.default_rng(0)
    for width in (8, 64, 128, 2304, 4096, 11008):
        rows = (rng.standard_normal((256, width)) * 10.0 ** rng.integers(-4, 2, (256, 1))).astype(np.float32)
        want = torch.linalg.norm(torch.from_numpy(rows), dim=1).numpy()
        assert np.array_equal(row_norms(rows).view(np.uint32), want.view(np.uint32)), width

"""Hostile and broken adapters: one line naming the problem, non-zero exit, nothing written.

Each case starts from a real PEFT adapter (tests/peft_adapters.py) and breaks one
thing: the file (truncated, overlapping, a pickle payload), the values (NaN/Inf),
the config (missing, contradictory, unsupported features), or the base it meets.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import peft_adapters as pa
import tinymodels
from helpers import cli, leftovers, one_line, write_config
from torchbin_writer import write_malicious_bin

ST = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    base = tinymodels.build_llama(root / "base", hidden=64, intermediate=128).path
    return {
        "base": base,
        "plain": pa.make_adapter(base, root / "plain", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "dora": pa.make_adapter(base, root / "dora", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"]),
    }


@pytest.fixture
def adapter(made: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(made["plain"], tmp_path / "adapter"))


def _merge(capsys, made: dict[str, Path], adapter: Path, tmp_path: Path, *extra: str, base: Path | None = None):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    capsys.readouterr()
    rc, err = cli(capsys, "convert", str(base or made["base"]), "--lora", str(adapter), "-o", str(out / "m.gguf"),
                  "--quant", "q8_0", *extra)
    assert leftovers(out) == [], "a failed merge left a file behind"
    return rc, err


def _edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _edit_tensors(adapter: Path, fn) -> None:
    tensors = load_file(adapter / ST)
    fn(tensors)
    save_file(tensors, adapter / ST)


def _first(tensors: dict, suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix))


@pytest.mark.parametrize("which, value", [("lora_A.weight", np.nan), ("lora_B.weight", np.inf)])
def test_nan_or_inf(which: str, value: float, made, adapter: Path, tmp_path: Path, capsys) -> None:
    def poison(t):
        t[_first(t, which)].flat[3] = value

    _edit_tensors(adapter, poison)
    one_line(*_merge(capsys, made, adapter, tmp_path), 1, "NaN or Inf", which.split(".")[0])


def test_truncated_safetensors(made, adapter: Path, tmp_path: Path, capsys) -> None:
    data = (adapter / ST).read_bytes()
    (adapter / ST).write_bytes(data[: len(data) - 100])
    one_line(*_merge(capsys, made, adapter, tmp_path), 1, "truncated")


def test_overlapping_safetensors(made, adapter: Path, tmp_path: Path, capsys) -> None:
    raw = (adapter / ST).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    names = sorted(k for k in header if k.endswith("lora_A.weight"))
    header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]  # same shapes: both point at one span
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    (adapter / ST).write_bytes(raw[:8] + text + raw[8 + n :])
    one_line(*_merge(capsys, made, adapter, tmp_path), 1, "overlap")


def test_pickle_payload_is_never_run(made, adapter: Path, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    (adapter / ST).unlink()
    write_malicious_bin(adapter / "adapter_model.bin", "os.system", marker)
    one_line(*_merge(capsys, made, adapter, tmp_path), 1, "refusing to load", "os.system")
    assert not marker.exists()


def test_missing_config(made, adapter: Path, tmp_path: Path, capsys) -> None:
    (adapter / "adapter_config.json").unlink()
    one_line(*_merge(capsys, made, adapter, tmp_path), 1, "adapter_config.json")


def test_config_not_json(made, adapter: Path, tmp_path: Path, capsys) -> None:
    (adapter / "adapter_config.json").write_text("{ not json")
    one_line(*_merge(capsys, made, adapter, tmp_path), 1, "not valid JSON")


@pytest.mark.parametrize("changes, needles", [
    ({"r": 8}, ("rank 4", "r=8")),
    ({"peft_type": "IA3"}, ("peft_type", "IA3")),
    ({"bias": "all"}, ("bias='all'",)),
    ({"lora_bias": True}, ("lora_bias",)),
    ({"layer_replication": [[0, 2]]}, ("layer_replication",)),
    ({"alora_invocation_tokens": [5, 6]}, ("alora_invocation_tokens",)),
    ({"trainable_token_indices": [3]}, ("trainable_token_indices", "0 trainable_tokens_delta")),
    ({"trainable_token_indices": {"embed_tokens": "3"}}, ("trainable_token_indices", "list of token ids")),
    ({"r": "four"}, ("r is 'four'",)),
    ({"lora_alpha": None}, ("lora_alpha",)),
    ({"rank_pattern": {"q_proj": 2}}, ("rank 4", "r=2")),
    ({"auto_mapping": {"base_model_class": "Qwen2ForCausalLM"}}, ("Qwen2ForCausalLM", "LlamaForCausalLM")),
])
def test_contradictory_or_unsupported_config(changes, needles, made, adapter: Path, tmp_path: Path, capsys) -> None:
    _edit_config(adapter, **changes)
    one_line(*_merge(capsys, made, adapter, tmp_path), 1, *needles)


def test_dora_magnitude_without_use_dora(made, tmp_path: Path, capsys) -> None:
    adapter = Path(shutil.copytree(made["dora"], tmp_path / "adapter"))
    _edit_config(adapter, use_dora=False)
    one_line(*_merge(capsys, made, adapter, tmp_path), 1, "use_dora is false")


def test_ranks_disagree(made, adapter: Path, tmp_path: Path, capsys) -> None:
    def cut(t):
        key = _first(t, "lora_B.weight")
        t[key] = np.ascontiguousarray(t[key][:, :3])

    _edit_tensors(adapter, cut)
    one_line(*_merge(capsys, made, adapter, tmp_path), 1, "ranks disagree")


def test_module_the_base_lacks(made, adapter: Path, tmp_path: Path, capsys) -> None:
    def move(t):
        for key in [k for k in t if ".layers.1." in k]:
            t[key.replace(".layers.1.", ".layers.7.")] = t.pop(key)

    _edit_tensors(adapter, move)
    one_line(*_merge(capsys, made, adapter, tmp_path), 1, "layers.7", "lacks")


def test_whole_tensor_not_in_modules_to_save(made, adapter: Path, tmp_path: Path, capsys) -> None:
    def add(t):
        t["base_model.model.model.norm.weight"] = np.ones(64, np.float32)

    _edit_tensors(adapter, add)
    one_line(*_merge(capsys, made, adapter, tmp_path), 1, "modules_to_save")


@pytest.fixture(scope="module")
def resized(made: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both embeddings in modules_to_save on a resized vocabulary: PEFT saves X.weight,
    X.modules_to_save.weight and X.original_module.weight for each (test_lora_merge)."""
    return pa.make_adapter(made["base"], tmp_path_factory.mktemp("resized") / "lora", vocab_rows=515, r=4,
                           lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])


LM_HEAD = "base_model.model.lm_head"


@pytest.mark.parametrize("edit, needles", [
    ("copies_differ", ("lm_head.modules_to_save.weight", "different values")),
    ("trained_missing", ("no 'base_model.model.lm_head.weight'", "incomplete")),
    ("not_listed", ("lm_head.modules_to_save.weight", "does not list")),
    ("wrong_shape", ("lm_head.original_module.weight", "corrupt")),
])
def test_modules_to_save_copies_that_disagree(edit: str, needles, made, resized: Path, tmp_path: Path, capsys) -> None:
    """What PEFT never writes (or could not load again) is refused, not guessed at."""
    adapter = Path(shutil.copytree(resized, tmp_path / "adapter"))

    def change(t):
        if edit == "copies_differ":
            t[f"{LM_HEAD}.modules_to_save.weight"].flat[5] += 1
        elif edit == "trained_missing":
            del t[f"{LM_HEAD}.weight"]
        elif edit == "wrong_shape":
            t[f"{LM_HEAD}.original_module.weight"] = np.ascontiguousarray(t[f"{LM_HEAD}.original_module.weight"][:513])

    _edit_tensors(adapter, change)
    if edit == "not_listed":
        _edit_config(adapter, modules_to_save=["embed_tokens"])
    one_line(*_merge(capsys, made, adapter, tmp_path), 1, *needles)


@pytest.fixture(scope="module")
def tokens(made: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """trainable_token_indices [3, 100, 7]: a (3, 64) trainable_tokens_delta for embed_tokens."""
    return pa.make_adapter(made["base"], tmp_path_factory.mktemp("tokens") / "lora", r=4, lora_alpha=8,
                           target_modules=["q_proj"], trainable_token_indices=[3, 100, 7])


@pytest.mark.parametrize("ids, needles", [
    ([3, 3, 7], ("repeats a token id", "undefined")),
    (None, ("sets no trainable_token_indices",)),
    ([3, 100, 600], ("token ids up to 600", "right base")),
    ([3, 100], ("shape [3, 64] for 2 token ids",)),
    ({"lm_head": [3, 100, 7]}, ("names 'lm_head'", "no trainable_tokens_delta")),
    ({"tokens": [3, 100, 7], "embed_tokens": [1, 2, 4]}, ("twice", "ambiguous")),
])
def test_trainable_tokens_that_disagree(ids, needles, made, tokens: Path, tmp_path: Path, capsys) -> None:
    adapter = Path(shutil.copytree(tokens, tmp_path / "adapter"))
    _edit_config(adapter, trainable_token_indices=ids)
    one_line(*_merge(capsys, made, adapter, tmp_path), 1, *needles)


def test_trainable_tokens_nan(made, tokens: Path, tmp_path: Path, capsys) -> None:
    adapter = Path(shutil.copytree(tokens, tmp_path / "adapter"))

    def poison(t):
        t[_first(t, "trainable_tokens_delta")].flat[7] = np.nan

    _edit_tensors(adapter, poison)
    one_line(*_merge(capsys, made, adapter, tmp_path), 1, "NaN or Inf", "embed_tokens.token_adapter")


def test_wrong_base(made, adapter: Path, tmp_path: Path, capsys) -> None:
    other = tinymodels.build_llama(tmp_path / "other", hidden=32, n_head=2, n_kv_head=1, intermediate=64).path
    one_line(*_merge(capsys, made, adapter, tmp_path, base=other), 1, "right base")


def test_quantized_base(made, adapter: Path, tmp_path: Path, capsys) -> None:
    base = Path(shutil.copytree(made["base"], tmp_path / "base-4bit"))
    write_config(base, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    one_line(*_merge(capsys, made, adapter, tmp_path, base=base), 1, "quantized", "bitsandbytes")


@pytest.mark.parametrize("flags, needle", [
    (("--lora-scale", "1", "--lora-scale", "2"), "--lora-scale"),
    (("--lora-scale", "nan"), "finite"),
    (("--outtype", "f16"), "--outtype"),
])
def test_flag_misuse(flags, needle, made, adapter: Path, tmp_path: Path, capsys) -> None:
    one_line(*_merge(capsys, made, adapter, tmp_path, *flags), 2, needle)


def test_adapter_without_base_flag(made, adapter: Path, tmp_path: Path, capsys) -> None:
    rc, err = cli(capsys, "convert", str(adapter), "-o", str(tmp_path / "a.gguf"))
    one_line(rc, err, 2, "--base")
    assert not (tmp_path / "a.gguf").exists()


def test_lora_on_a_tensor_the_gguf_drops(tmp_path: Path, capsys) -> None:
    """Gemma 2 ties the output to the embedding; a saved lm_head is dropped, so a LoRA on it would be lost."""
    import tinyarch

    base = tinyarch.build_gemma2(tmp_path / "gemma2").path
    weights = load_file(base / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].copy()
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    vocab, hidden = weights["lm_head.weight"].shape
    adapter = tmp_path / "lm-head-lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["lm_head"], "bias": "none"}))
    rng = np.random.default_rng(0)
    save_file({"base_model.model.lm_head.lora_A.weight": rng.standard_normal((2, hidden), dtype=np.float32),
               "base_model.model.lm_head.lora_B.weight": rng.standard_normal((vocab, 2), dtype=np.float32)},
              adapter / ST)
    out = tmp_path / "out"
    out.mkdir()
    rc, err = cli(capsys, "convert", str(base), "--lora", str(adapter), "-o", str(out / "m.gguf"))
    one_line(rc, err, 1, "lm_head.weight", "does not use")
    assert leftovers(out) == []


def test_existing_output_needs_force(made, adapter: Path, tmp_path: Path, capsys) -> None:
    for argv in (["convert", str(made["base"]), "--lora", str(adapter)],
                 ["convert", str(adapter), "--base", str(made["base"])]):
        target = tmp_path / "taken.gguf"
        target.write_bytes(b"keep me")
        capsys.readouterr()
        rc, err = cli(capsys, *argv, "-o", str(target))
        one_line(rc, err, 2, "--force")
        assert target.read_bytes() == b"keep me"

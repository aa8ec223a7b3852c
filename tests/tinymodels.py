"""Tiny LLaMA-shaped Hugging Face model folders, built on the fly for tests.

In:  a folder path and a few shape knobs.  Out: a real HF layout (config.json,
tokenizer.model, tokenizer_config.json, special_tokens_map.json, added_tokens.json,
generation_config.json, safetensors or torch .bin shards with an index), plus the
float32 values actually stored, so `tests/numpy_llama.py` can run a reference forward.

Nothing is downloaded: the SentencePiece model is trained here on a small built-in
corpus (cached per process, ~0.05 s) with the settings of LLaMA's tokenizer.
"""

from __future__ import annotations

import io
import json
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------------
# Corpus and tokenizer
# ---------------------------------------------------------------------------------------

# Strings for tokenization comparisons (ours vs sentencepiece vs llama.cpp). Every one
# round-trips through the trained model: decode(encode(s)) == s. Some characters here are
# absent from the training corpus on purpose, so they go through byte fallback.
VARIED_CORPUS: list[str] = [
    "",
    " ",
    "   ",
    "Hello world",
    " Hello world",
    "   three leading spaces",
    "trailing spaces   ",
    "multiple     spaces\tand\ttabs",
    "line one\nline two\n\nline four\n",
    "\n",
    "\n\nstarts with newlines",
    "Windows\r\nline endings",
    "numbers 1234567890 and 3.14159 and 1,000,000",
    "mixed123abc456def",
    "café naïve résumé Ünïcödé façade",
    "日本語のテキスト 中文 한국어",
    "emoji 🦙🚀✨ llama",
    "Ελληνικά и русский текст",
    "def square(x):\n    return x ** 2  # comment",
    "</s> is literal text, so are <s> and <unk>",
    "[PAD] literal",
    "rare: ℵ ∮ ⊕ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ᚠᛇᚻ",  # not in training: byte fallback
    "\u00a0non-breaking\u200bzero-width",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "🦙🦙🦙",
    "Below is an instruction that describes a task.\n\n### Instruction:\nSay hi.\n\n### Response:\n",
]

_TRAIN_PARAGRAPHS = [
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.",
    "### Instruction:\nSummarize the following paragraph in one sentence.\n\n### Response:\n",
    "The quick brown fox jumps over the lazy dog while the llama watches from the hill.",
    "Alpacas and llamas are camelids from South America; they are gentle and curious.",
    "In 2023, 7 billion parameters fit in 4 GB after 4-bit quantization, roughly.",
    "Prices rose 12.5% to $1,234.56 on 2024-03-15 at 09:30.",
    "café crème brûlée, naïve façade, résumé, jalapeño, Zürich, Øresund, São Paulo",
    "Привет, мир! Как дела? Ελληνικά γράμματα. Türkçe ve Polski język.",
    "日本語の文章です。東京は大きな都市です。中文句子，北京很大。한국어 문장입니다.",
    "Emoji time 🦙 🚀 ✨ 😀 👍 🎉 and symbols → ← ≤ ≥ ± × ÷ °",
    "def main(argv: list[str]) -> int:\n    for i, x in enumerate(argv):\n"
    "        print(f\"{i}: {x}\")\n    return 0",
    "if (x != 0 && y >= 10) { return x * y; } else { return -1; }",
    "<html><body><p class=\"note\">Hello &amp; welcome</p></body></html>",
    "{\"name\": \"tiny\", \"layers\": 2, \"heads\": [4, 2], \"ok\": true, \"x\": null}",
    "    indented with four spaces\n\ttab indented\n        eight spaces",
    "Spaces   between    words     vary      here.",
    "SELECT id, name FROM users WHERE age > 30 ORDER BY name;",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 65536 3.14159 2.71828",
]

_WORDS = (
    "the of and to in is that for it as with was on be by at this are from or have an "
    "they which one you were all we their there been has when who will more no if out "
    "so said what up its about into than them can only other new some could time these "
    "two may then do first any my now such like our over man me even most made after "
    "also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own "
    "see men work long get here between both life being under never day same another "
    "know while last might us great old year off come since against go came right used "
    "take three model token layer weight tensor vector llama alpaca convert quantize"
).split()


def _training_lines(n_sentences: int = 600, seed: int = 1234) -> list[str]:
    """Corpus lines for training. Split on newlines, as LLaMA's trainer saw text, so
    that "\\n" is never a piece and encodes to the byte piece <0x0A> like LLaMA."""
    rng = random.Random(seed)
    text = list(_TRAIN_PARAGRAPHS) * 3
    for _ in range(n_sentences):
        words = rng.choices(_WORDS, k=rng.randint(4, 14))
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        sentence = " ".join(words)
        text.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "?", "!", ","]))
    return [line for para in text for line in para.split("\n") if line]


_SP_CACHE: dict[tuple, bytes] = {}


def sentencepiece_model_bytes(vocab_size: int = 512, model_type: str = "bpe") -> bytes:
    """Serialized SentencePiece ModelProto, trained once per (vocab_size, model_type)
    per process. Settings mirror LLaMA's tokenizer.model trainer_spec."""
    key = (vocab_size, model_type)
    if key not in _SP_CACHE:
        import sentencepiece as spm

        out = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_training_lines()),
            model_writer=out,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=True,  # <0x00>..<0xFF> at ids 3..258, as in LLaMA
            split_digits=True,
            add_dummy_prefix=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_by_unicode_script=True,
            split_by_whitespace=True,
            max_sentencepiece_length=16,
            character_coverage=1.0,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,  # LLaMA's sp model has no pad; [PAD] is an HF added token
            unk_surface=" \u2047 ",
            num_threads=1,  # deterministic
            minloglevel=2,
        )
        _SP_CACHE[key] = out.getvalue()
    return _SP_CACHE[key]


def train_sentencepiece(dirpath: str | Path, vocab_size: int = 512, model_type: str = "bpe") -> Path:
    """Write a LLaMA-like `tokenizer.model` into `dirpath` and return its path."""
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    path = dirpath / "tokenizer.model"
    path.write_bytes(sentencepiece_model_bytes(vocab_size, model_type))
    return path


# ---------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------

_TORCH_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even like torch."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def encode_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the array to store: float32, float16 or bf16 bits as uint16."""
    if dtype == "F32":
        return np.asarray(x, dtype=np.float32)
    if dtype == "F16":
        return np.asarray(x, dtype=np.float16)
    if dtype == "BF16":
        return f32_to_bf16_bits(x)
    raise ValueError(f"dtype {dtype!r}: expected one of {sorted(_TORCH_DTYPE)}")


def decode_dtype(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Inverse of `encode_dtype`: the exact float32 values a stored array holds."""
    if dtype == "BF16":
        return bf16_bits_to_f32(stored)
    return np.asarray(stored, dtype=np.float32)


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape ([out, in] for linears), in HF's save order."""
    h = config["hidden_size"]
    n_head = config["num_attention_heads"]
    n_kv = config["num_key_value_heads"]
    hd = config.get("head_dim") or h // n_head
    inter = config["intermediate_size"]
    vocab = config["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (n_head * hd, h)
        shapes[p + "self_attn.k_proj.weight"] = (n_kv * hd, h)
        shapes[p + "self_attn.v_proj.weight"] = (n_kv * hd, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, n_head * hd)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, h)
    return shapes


def make_weights(config: dict, seed: int = 0, dtype: str = "F16") -> dict[str, np.ndarray]:
    """Deterministic random weights as float32, already rounded to `dtype`.

    Scales keep activations O(1) and logits spread (std ~1-2) so argmax/top-k
    comparisons are meaningful: embeddings 0.1 (tied lm_head: logit std ~0.1*sqrt(h)),
    linears 1/sqrt(fan_in), lm_head 1.5/sqrt(h), norm weights 1 + 0.1*noise.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in tensor_shapes(config).items():
        if len(shape) == 1:
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight":
            w = 0.1 * rng.standard_normal(shape)
        elif name == "lm_head.weight":
            w = 1.5 / np.sqrt(shape[1]) * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        out[name] = decode_dtype(encode_dtype(w.astype(np.float32), dtype), dtype)
    return out


# ---------------------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------------------


def write_safetensors_bf16(path: Path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write a safetensors file whose arrays are bf16 bit patterns (uint16).

    Hand-written because safetensors.numpy cannot express bf16 (numpy has no bf16).
    Layout (https://github.com/huggingface/safetensors#format): u64 little-endian N,
    then N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__"},
    space-padded to a multiple of 8 like the library does, then the raw data; offsets
    are relative to the start of the data.
    """
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, arr in tensors.items():
        n = arr.size * 2
        header[name] = {"dtype": "BF16", "shape": list(arr.shape), "data_offsets": [offset, offset + n]}
        offset += n
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr, dtype="<u2").tobytes())


def _split_shards(names: list[str], sizes: dict[str, int], shards: int) -> list[list[str]]:
    """Contiguous groups of roughly equal bytes, none empty (like HF's max_shard_size)."""
    if not 1 <= shards <= len(names):
        raise ValueError(f"shards={shards}: expected 1..{len(names)}")
    total = sum(sizes.values())
    groups: list[list[str]] = [[]]
    acc = 0
    for i, name in enumerate(names):
        unopened = shards - len(groups)
        full = acc >= total * len(groups) / shards
        if groups[-1] and unopened and (full or len(names) - i <= unopened):
            groups.append([])
        groups[-1].append(name)
        acc += sizes[name]
    return groups


def _write_weights(dirpath: Path, stored: dict[str, np.ndarray], dtype: str, shards: int, fmt: str) -> list[Path]:
    names = list(stored)
    sizes = {n: stored[n].nbytes for n in names}
    groups = _split_shards(names, sizes, shards)
    if fmt == "safetensors":
        stem, ext, index_name = "model", "safetensors", "model.safetensors.index.json"
    elif fmt == "bin":
        stem, ext, index_name = "pytorch_model", "bin", "pytorch_model.bin.index.json"
    else:
        raise ValueError(f"fmt {fmt!r}: expected 'safetensors' or 'bin'")
    files = []
    weight_map: dict[str, str] = {}
    for k, group in enumerate(groups, start=1):
        fname = f"{stem}.{ext}" if shards == 1 else f"{stem}-{k:05d}-of-{shards:05d}.{ext}"
        part = {n: stored[n] for n in group}
        path = dirpath / fname
        if fmt == "safetensors":
            if dtype == "BF16":
                write_safetensors_bf16(path, part)
            else:
                from safetensors.numpy import save_file

                save_file(part, str(path), metadata={"format": "pt"})
        else:
            _torchbin_writer().write_torch_bin(path, part, bf16_names=tuple(part) if dtype == "BF16" else ())
        weight_map.update({n: fname for n in group})
        files.append(path)
    if shards > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (dirpath / index_name).write_text(json.dumps(index, indent=2) + "\n")
    return files


def _torchbin_writer():
    """tests/torchbin_writer.py, whether tests/ is a package or a sys.path entry."""
    if __package__:
        from . import torchbin_writer
    else:
        import torchbin_writer
    return torchbin_writer


def read_safetensors_f32(dirpath: str | Path) -> dict[str, np.ndarray]:
    """Read every *.safetensors file in a folder back to float32, parsing the format
    by hand (so bf16 works and the check is independent of the writer)."""
    out: dict[str, np.ndarray] = {}
    np_dtype = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}
    for path in sorted(Path(dirpath).glob("*.safetensors")):
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            b, e = info["data_offsets"]
            arr = np.frombuffer(data[base + b : base + e], dtype=np_dtype[info["dtype"]]).reshape(info["shape"])
            if name in out:
                raise ValueError(f"tensor {name} appears in more than one shard")
            out[name] = decode_dtype(arr, info["dtype"]).copy()
    return out


# ---------------------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyLlama:
    """What `build_llama` wrote: the folder, its config, and the stored values as f32."""

    path: Path
    config: dict
    weights: dict[str, np.ndarray]  # HF names -> float32, exactly the stored values
    sp_vocab_size: int
    pad_id: int | None  # id of "[PAD]" (== sp_vocab_size) or None
    weight_files: list[Path]


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _dump(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def build_llama(
    dirpath: str | Path,
    *,
    hidden: int = 256,
    n_layer: int = 2,
    n_head: int = 4,
    n_kv_head: int = 2,
    intermediate: int = 512,
    dtype: str = "F16",
    add_pad: bool = True,
    shards: int = 1,
    fmt: str = "safetensors",
    tie_embeddings: bool = False,
    rope_theta: float = 10000.0,
    rms_eps: float = 1e-6,
    max_pos: int = 2048,
    seed: int = 0,
    chat_template: str | None = None,
    name: str = "tiny-llama",
    sp_vocab_size: int = 512,
    vocab_size: int | None = None,
) -> TinyLlama:
    """Write a tiny LlamaForCausalLM folder into `dirpath` (created if needed).

    `vocab_size`: embedding rows (default: the SentencePiece pieces plus [PAD]); more rows than
    tokens is padding, as real checkpoints round the vocabulary up."""
    if dtype not in _TORCH_DTYPE:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(_TORCH_DTYPE)}")
    if hidden % n_head or n_head % n_kv_head:
        raise ValueError(f"hidden={hidden}, n_head={n_head}, n_kv_head={n_kv_head}: must divide")
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    train_sentencepiece(dirpath, sp_vocab_size)
    pad_id = sp_vocab_size if add_pad else None
    vocab = vocab_size or sp_vocab_size + (1 if add_pad else 0)

    config = {
        "_name_or_path": name,
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": hidden // n_head,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": max_pos,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": n_head,
        "num_hidden_layers": n_layer,
        "num_key_value_heads": n_kv_head,
        "pretraining_tp": 1,
        "rms_norm_eps": rms_eps,
        "rope_scaling": None,
        "rope_theta": rope_theta,
        "tie_word_embeddings": tie_embeddings,
        "torch_dtype": _TORCH_DTYPE[dtype],
        "transformers_version": "4.44.2",
        "use_cache": True,
        "vocab_size": vocab,
    }
    if add_pad:
        config["pad_token_id"] = pad_id
    _dump(dirpath / "config.json", config)

    gen = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.44.2"}
    if add_pad:
        gen["pad_token_id"] = pad_id
    _dump(dirpath / "generation_config.json", gen)

    decoder = {"0": _special("<unk>"), "1": _special("<s>"), "2": _special("</s>")}
    for v in decoder.values():
        v["special"] = True
    if add_pad:
        decoder[str(pad_id)] = {**_special("[PAD]"), "special": True}
    tok_cfg: dict = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": max_pos,
        "pad_token": "[PAD]" if add_pad else None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    if chat_template is not None:
        tok_cfg["chat_template"] = chat_template
    _dump(dirpath / "tokenizer_config.json", tok_cfg)

    special_map: dict = {"bos_token": _special("<s>"), "eos_token": _special("</s>"), "unk_token": _special("<unk>")}
    if add_pad:
        special_map["pad_token"] = "[PAD]"  # Alpaca's stanford_alpaca wrote a bare string
        _dump(dirpath / "added_tokens.json", {"[PAD]": pad_id})
    _dump(dirpath / "special_tokens_map.json", special_map)

    weights = make_weights(config, seed=seed, dtype=dtype)
    stored = {n: encode_dtype(w, dtype) for n, w in weights.items()}
    files = _write_weights(dirpath, stored, dtype, shards, fmt)
    return TinyLlama(dirpath, config, weights, sp_vocab_size, pad_id, files)


def build_llama_folder(dirpath: str | Path, **kwargs) -> Path:
    """`build_llama` returning only the folder path (same keyword arguments)."""
    return build_llama(dirpath, **kwargs).path


def expected_files(*, add_pad: bool = True, shards: int = 1, fmt: str = "safetensors") -> set[str]:
    """File names a `build_llama` folder holds for these options."""
    files = {"config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
             "special_tokens_map.json"}
    if add_pad:
        files.add("added_tokens.json")
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    if shards == 1:
        files.add(f"{stem}.{ext}")
    else:
        files |= {f"{stem}-{k:05d}-of-{shards:05d}.{ext}" for k in range(1, shards + 1)}
        files.add(f"{stem}.{ext}.index.json")
    return files


def _main(argv: list[str] | None = None) -> int:
    """`python tests/tinymodels.py DIR`: the demo's source model (random weights)."""
    import argparse

    p = argparse.ArgumentParser(description="Write a LLaMA-shaped HF folder with random weights.")
    p.add_argument("dir", type=Path)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--dtype", default="F16", choices=sorted(_TORCH_DTYPE))
    args = p.parse_args(argv)
    model = build_llama(
        args.dir, hidden=args.hidden, n_layer=args.layers, n_head=args.heads, n_kv_head=args.kv_heads,
        intermediate=args.intermediate, shards=args.shards, dtype=args.dtype, name=args.dir.name,
    )
    size = sum(f.stat().st_size for f in model.weight_files)
    print(f"wrote {model.path}: {args.layers} layers, hidden {args.hidden}, {size / 1e6:.0f} MB of {args.dtype} weights")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())

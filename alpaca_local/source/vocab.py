"""Tokenizer files -> the GGUF vocabulary llama.cpp reads.

Two kinds. SentencePiece (`load_vocab`, GGUF model "llama"): In: `tokenizer.model`, plus added tokens (`added_tokens.json`, the
`added_tokens_decoder` of `tokenizer_config.json`, `tokenizer.json`) and the
special ids. Out: a `Vocab` (tokens, scores, types, specials) sized to the
model's embedding rows. Follows the reference converter's
`_create_vocab_sentencepiece` and gguf-py's `SpecialVocab`, but a conflict the
reference would only warn about (two tokens for one id, a gap, a vocabulary
larger than the embedding) is an error here: a silent mismatch makes a model
that loads and then talks nonsense.

Byte-level BPE (`load_bpe_vocab`, GGUF model "gpt2"; Llama 3, Qwen2/3, SmolLM): In:
`tokenizer.json` (vocabulary, merges, added tokens, pre-tokenizer). Out: the
same `Vocab`, with merges and the pre-tokenizer name. Follows the reference's
`_set_vocab_gpt2` / `get_vocab_base`, read straight from the JSON (no
transformers). The reference names the pre-tokenizer by hashing the
tokenizer's output on a check string, which only recognizes the exact
released vocabularies; we name it from the pre-tokenizer's own structure in
tokenizer.json (`bpe_pre`), which is what the name stands for in llama.cpp
(src/llama-vocab.cpp picks the split regexes from it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from alpaca_local.source.bpe_pre import pre_tokenizer_name
from alpaca_local.source.config import read_json
from alpaca_local.errors import InputError, UnsupportedError

T = gguf.TokenType
# Score llama.cpp's converter gives added and padding tokens.
ADDED_TOKEN_SCORE = -1000.0


@dataclass
class Vocab:
    tokens: list[str]
    scores: list[float] | None  # None for BPE: the "gpt2" model has no scores
    types: list[int]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad (BPE: also sep, cls, mask...)
    add_bos: bool | None = None
    add_eos: bool | None = None
    chat_template: str | None = None
    n_padded: int = 0  # trailing ids with no token, filled with [PAD{id}]
    model: str = "llama"  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str = "default"  # tokenizer.ggml.pre
    merges: list[str] = field(default_factory=list)
    add_space_prefix: bool | None = None  # tokenizer.ggml.add_space_prefix, when the architecture sets it
    add_other: dict[str, bool] = field(default_factory=dict)  # BPE: add_sep_token... as SpecialVocab finds them

    def add_to(self, w: gguf.GGUFWriter) -> None:
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        if self.merges:
            w.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(w, f"add_{kind}_token_id")(token_id)
        if self.add_bos is not None:
            w.add_add_bos_token(self.add_bos)
        if self.add_eos is not None:
            w.add_add_eos_token(self.add_eos)
        for kind, flag in self.add_other.items():
            getattr(w, f"add_add_{kind}_token")(flag)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def _load_sentencepiece(path: Path):
    from sentencepiece import SentencePieceProcessor

    if not path.is_file():
        raise InputError(f"{path} not found; the SentencePiece tokenizer (tokenizer.model) is required")
    sp = SentencePieceProcessor()
    try:
        ok = sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as exc:
        raise InputError(f"{path} is not a valid SentencePiece model ({exc}); re-download it") from exc
    if not ok or sp.vocab_size() == 0:
        raise InputError(f"{path} is not a valid SentencePiece model; re-download it")
    return sp


def _piece_type(sp, i: int) -> int:
    if sp.IsUnknown(i):
        return T.UNKNOWN
    if sp.IsControl(i):
        return T.CONTROL
    if sp.IsUnused(i):
        return T.UNUSED
    if sp.IsByte(i):
        return T.BYTE
    return T.NORMAL


def _looks_special(token: str) -> bool:
    # The reference converter's does_token_look_special: added tokens that some
    # models forget to mark special but that must be control tokens.
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _added_tokens(folder: Path) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) from every added-token source, refusing conflicts."""
    found: dict[int, tuple[str, bool, str]] = {}

    def add(token_id: object, content: object, special: bool, source: str) -> None:
        if type(token_id) is not int or token_id < 0 or not isinstance(content, str) or not content:
            raise InputError(f"{source}: bad added token {content!r} with id {token_id!r}")
        if token_id in found and found[token_id][0] != content:
            raise InputError(
                f"added token id {token_id} is {found[token_id][0]!r} in {found[token_id][2]} "
                f"but {content!r} in {source}; the tokenizer files disagree"
            )
        prev_special = found.get(token_id, (None, False, None))[1]
        found[token_id] = (content, special or prev_special, source)

    if (path := folder / "added_tokens.json").is_file():
        data = read_json(path, "added tokens")
        if not isinstance(data, dict):
            raise InputError(f"{path} is not a JSON object of token -> id")
        for content, token_id in data.items():
            add(token_id, content, False, path.name)
    if (path := folder / "tokenizer_config.json").is_file():
        data = read_json(path, "tokenizer config")
        decoder = data.get("added_tokens_decoder", {}) if isinstance(data, dict) else {}
        if not isinstance(decoder, dict):
            raise InputError(f"{path}: added_tokens_decoder is not an object")
        for key, info in decoder.items():
            if not isinstance(info, dict) or not str(key).isdecimal():
                raise InputError(f"{path}: bad added_tokens_decoder entry {key!r}")
            add(int(key), info.get("content"), bool(info.get("special")), path.name)
    if (path := folder / "tokenizer.json").is_file():
        data = read_json(path, "tokenizer")
        added = data.get("added_tokens", []) if isinstance(data, dict) else []
        for info in added if isinstance(added, list) else []:
            if isinstance(info, dict):
                add(info.get("id"), info.get("content"), bool(info.get("special")), path.name)
    by_content: dict[str, int] = {}
    for token_id, (content, _, source) in found.items():
        if content in by_content and by_content[content] != token_id:
            raise InputError(f"added token {content!r} has two ids ({by_content[content]} and {token_id}) in {source}")
        by_content[content] = token_id
    return {i: (c, s) for i, (c, s, _) in found.items()}


def _check_fits(named: int, n_vocab: int) -> None:
    """Every token id must have an embedding row; fewer tokens than rows is padding, more is a mismatch."""
    if named > n_vocab:
        raise InputError(
            f"the tokenizer has {named} tokens but the model's embedding has {n_vocab} rows; "
            "the tokenizer does not belong to these weights"
        )


def load_vocab(folder: Path, n_vocab: int) -> Vocab:
    """The vocabulary of `folder`, exactly `n_vocab` entries (the embedding rows)."""
    sp = _load_sentencepiece(folder / "tokenizer.model")
    n_sp = sp.vocab_size()
    added = _added_tokens(folder)
    named = max([n_sp - 1, *added]) + 1
    _check_fits(named, n_vocab)
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    for i in range(n_sp):
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(_piece_type(sp, i))
    for i in range(n_sp, named):
        if i not in added:
            raise InputError(
                f"token id {i} is missing: the SentencePiece model has {n_sp} pieces and the added tokens "
                f"jump to {max(added)}; the tokenizer files are incomplete"
            )
    for i, (content, special) in sorted(added.items()):
        control = special or _looks_special(content)
        if i < n_sp and content == tokens[i] and (control or types[i] != T.NORMAL):
            # The piece itself, marked special (or a control/byte/unknown piece):
            # keep SentencePiece's score, make a special normal piece CONTROL.
            if control and types[i] == T.NORMAL:
                types[i] = T.CONTROL
            continue
        if i < n_sp and content != tokens[i]:
            logging.getLogger(__name__).info("added token %d replaces piece %r with %r", i, tokens[i], content)
        # A non-special added token, even one naming its own piece (Gemma's "▁▁",
        # "\n\n" whitespace runs), is USER_DEFINED with "▁" written as a space, as
        # _create_vocab_sentencepiece does: llama.cpp then matches it in the raw
        # text before SentencePiece runs, which is how the HF tokenizer splits
        # runs of spaces and newlines.
        token_type = T.CONTROL if control else T.USER_DEFINED
        if token_type == T.USER_DEFINED:
            content = content.replace("\u2581", " ")  # the reference pre-normalizes user-defined spaces
        if i < n_sp:
            tokens[i], scores[i], types[i] = content, ADDED_TOKEN_SCORE, token_type
        else:
            tokens.append(content)
            scores.append(ADDED_TOKEN_SCORE)
            types.append(token_type)
    n_padded = n_vocab - len(tokens)
    for i in range(len(tokens), n_vocab):
        # Embedding rows past the tokenizer (vocab padded for speed): never produced by tokenizing.
        tokens.append(f"[PAD{i}]")
        scores.append(ADDED_TOKEN_SCORE)
        types.append(T.UNUSED)
    vocab = Vocab(tokens, scores, types, n_padded=n_padded)
    _read_specials(folder, vocab, sp)
    return vocab


def _read_specials(folder: Path, vocab: Vocab, sp) -> None:
    """bos/eos/unk/pad ids, add_bos/add_eos and the chat template, via gguf-py's SpecialVocab."""
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=len(vocab.tokens))
    ids = {k: v for k, v in special.special_token_ids.items() if k in ("bos", "eos", "unk", "pad")}
    # SentencePiece's own ids when the JSON files do not name them.
    for kind, sp_id in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id())):
        if kind not in ids and 0 <= sp_id < len(vocab.tokens):
            ids[kind] = sp_id
    for kind, token_id in ids.items():
        if not 0 <= token_id < len(vocab.tokens):
            raise InputError(f"special token {kind} has id {token_id}, outside the vocabulary of {len(vocab.tokens)}")
    vocab.special_ids = ids
    add = dict(special.add_special_token)
    vocab.add_bos = add.pop("bos", None)
    vocab.add_eos = add.pop("eos", None)
    # add_sep_token... as SpecialVocab.add_to_gguf writes them (from tokenizer.json's post-processor)
    vocab.add_other = {k: v for k, v in add.items() if hasattr(gguf.GGUFWriter, f"add_add_{k}_token")}
    template = special.chat_template
    vocab.chat_template = template if isinstance(template, str) and template else None


# --------------------------------------------------------------------------
# Byte-level BPE (tokenizer.json)
# --------------------------------------------------------------------------


def load_bpe_vocab(folder: Path, n_vocab: int) -> Vocab:
    """The byte-level BPE vocabulary of `folder`'s tokenizer.json, exactly `n_vocab` entries."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise InputError(
            f"no tokenizer in {folder}: expected tokenizer.model (SentencePiece) or tokenizer.json (BPE)"
        )
    data = read_json(path, "the tokenizer")
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        kind = model.get("type") if isinstance(model, dict) else None
        raise UnsupportedError(f"{path}: tokenizer model {kind!r} is not supported; expected a byte-level BPE")
    pre = pre_tokenizer_name(data, path)
    by_id: dict[int, str] = {}
    for token, token_id in model["vocab"].items():
        if type(token_id) is not int or token_id < 0:
            raise InputError(f"{path}: token {token!r} has id {token_id!r}, not a non-negative integer")
        if token_id in by_id:
            raise InputError(f"{path}: id {token_id} is both {by_id[token_id]!r} and {token!r}")
        by_id[token_id] = token
    added = _added_tokens(folder)
    named = max([*by_id, *added], default=-1) + 1
    _check_fits(named, n_vocab)
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        # get_vocab_base: an added token (one the tokenizer matches before
        # splitting) is CONTROL when special or special-looking, else
        # USER_DEFINED; ids no token names are padding rows.
        if i in added:
            content, special = added[i]
            if special or _looks_special(content):
                types.append(T.CONTROL)
            else:
                content = content.replace("\u2581", " ")
                types.append(T.USER_DEFINED)
            tokens.append(content)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(T.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
    # Merges, special ids, add_bos/add_eos (from tokenizer.json's post-processor
    # and tokenizer_config.json) and the chat template, as _set_vocab_gpt2 takes them.
    vocab_log = logging.getLogger("gguf.vocab")
    level = vocab_log.level
    vocab_log.setLevel(logging.ERROR)  # its guesses about TemplateProcessing<pair> are not the user's problem
    try:
        special = gguf.SpecialVocab(folder, load_merges=True)
    finally:
        vocab_log.setLevel(level)
    if not special.merges:
        raise InputError(f"{path} has no merges; a BPE tokenizer cannot work without them")
    for kind, token_id in special.special_token_ids.items():
        if not 0 <= token_id < n_vocab:
            raise InputError(f"special token {kind} has id {token_id}, outside the vocabulary of {n_vocab}")
    add = dict(special.add_special_token)
    post = data.get("post_processor")
    processors = post.get("processors", [post]) if isinstance(post, dict) else []
    if any(isinstance(p, dict) and p.get("type") == "ByteLevel" for p in processors):
        # The vendored gguf-py (vocab.py:238) reads a ByteLevel post-processor as
        # "adds neither": write the explicit false it writes.
        add.setdefault("bos", False)
        add.setdefault("eos", False)
    template = special.chat_template
    return Vocab(
        tokens, None, types,
        special_ids=dict(special.special_token_ids),
        add_bos=add.pop("bos", None),
        add_eos=add.pop("eos", None),
        add_other={k: v for k, v in add.items() if hasattr(gguf.GGUFWriter, f"add_add_{k}_token")},
        chat_template=template if isinstance(template, str) and template else None,
        n_padded=n_vocab - named,
        model="gpt2",
        pre=pre,
        merges=list(special.merges),
    )

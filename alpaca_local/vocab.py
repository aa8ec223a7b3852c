"""SentencePiece tokenizer folder -> the GGUF vocabulary llama.cpp reads.

In: `tokenizer.model`, plus added tokens (`added_tokens.json`, the
`added_tokens_decoder` of `tokenizer_config.json`, `tokenizer.json`) and the
special ids. Out: a `Vocab` (tokens, scores, types, specials) sized to the
model's embedding rows. Follows the reference converter's
`_create_vocab_sentencepiece` and gguf-py's `SpecialVocab`, but a conflict the
reference would only warn about (two tokens for one id, a gap, a vocabulary
larger than the embedding) is an error here: a silent mismatch makes a model
that loads and then talks nonsense.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from .config import read_json
from .errors import InputError

T = gguf.TokenType
# Score llama.cpp's converter gives added and padding tokens.
ADDED_TOKEN_SCORE = -1000.0


@dataclass
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool | None = None
    add_eos: bool | None = None
    chat_template: str | None = None
    n_padded: int = 0  # trailing ids with no token, filled with [PAD{id}]

    def add_to(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(self.tokens)
        w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        for kind, token_id in self.special_ids.items():
            getattr(w, f"add_{kind}_token_id")(token_id)
        if self.add_bos is not None:
            w.add_add_bos_token(self.add_bos)
        if self.add_eos is not None:
            w.add_add_eos_token(self.add_eos)
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


def load_vocab(folder: Path, n_vocab: int) -> Vocab:
    """The vocabulary of `folder`, exactly `n_vocab` entries (the embedding rows)."""
    sp = _load_sentencepiece(folder / "tokenizer.model")
    n_sp = sp.vocab_size()
    added = _added_tokens(folder)
    named = max([n_sp - 1, *added]) + 1
    if named > n_vocab:
        raise InputError(
            f"the tokenizer has {named} tokens but the model's embedding has {n_vocab} rows; "
            "the tokenizer does not belong to these weights"
        )
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
        if i < n_sp:
            if content == tokens[i]:
                if special and types[i] == T.NORMAL:
                    types[i] = T.CONTROL
                continue
            logging.getLogger(__name__).info("added token %d replaces piece %r with %r", i, tokens[i], content)
        token_type = T.CONTROL if special or _looks_special(content) else T.USER_DEFINED
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
    vocab.add_bos = special.add_special_token.get("bos")
    vocab.add_eos = special.add_special_token.get("eos")
    template = special.chat_template
    vocab.chat_template = template if isinstance(template, str) and template else None

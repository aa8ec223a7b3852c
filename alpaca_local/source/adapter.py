"""Read a PEFT LoRA adapter folder, trusting nothing in it.

In: a folder with `adapter_config.json` and `adapter_model.safetensors` (or
`adapter_model.bin`, read by the restricted unpickler of `torch_bin`, never
torch.load). Out: an `Adapter`: every adapted module as a `LoraPair` (A, B,
rank, PEFT's exact scale, the DoRA magnitude) plus the whole tensors the
adapter replaces (`modules_to_save`, embeddings saved after a vocabulary
resize), and the embedding rows that `trainable_token_indices` retrains, all
located but not loaded; `check_against_base` then checks it against the base's
tensors before anything is written.

PEFT's semantics, as `LoraModel._create_and_replace` and `LoraLayer.update_layer`
(peft/tuners/lora/model.py, layer.py) apply them:
  scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, where r and
  lora_alpha come from rank_pattern / alpha_pattern when a pattern matches the
  module name (peft.utils.other.get_pattern_key: `(.*\\.)?(KEY)$`).
  fan_in_fan_out only applies to GPT-2's Conv1D; PEFT resets it to False for
  nn.Linear (lora/layer.py `dispatch_default`), and every module of the
  architectures we convert is an nn.Linear or nn.Embedding, so it changes nothing.
  trainable_token_indices (peft/tuners/trainable_tokens/layer.py
  TrainableTokensLayer.merge) replaces rows: W[indices] = trainable_tokens_delta,
  an index_copy, not an addition.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alpaca_local.errors import InputError, UnsupportedError
from alpaca_local.source.config import read_json
from alpaca_local.source.safetensors_io import _short, read_safetensors
from alpaca_local.source.tensors import TensorRef

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the base model's own names
MAX_RANK = 1 << 16
_FINITE_CHUNK = 1 << 22  # elements per isfinite() pass: bounded memory on a big embedding

# Config keys that change what merging means and that we do not implement; each
# is refused by name when set (peft/tuners/lora/config.py LoraConfig).
_UNSUPPORTED_KEYS: dict[str, str] = {
    "lora_bias": "a trained bias on lora_B",
    "layer_replication": "layers duplicated at load time",
    "target_parameters": "LoRA on raw parameters (MoE experts)",
    "alora_invocation_tokens": "activated LoRA (aLoRA), which applies only after its invocation tokens",
    "use_qalora": "QA-LoRA",
    "megatron_config": "Megatron tensor-parallel layers",
}
# Roles of the tensors PEFT saves (peft/utils/save_and_load.py get_peft_model_state_dict).
_ROLES = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_embedding_A", "EA"),
    (".lora_embedding_B", "EB"),
    (".lora_magnitude_vector", "M"),
    # trainable_token_indices: TrainableTokensWrapper's token_adapter (peft/utils/other.py)
    (".token_adapter.trainable_tokens_delta", "T"),  # the retrained rows, in the order of the indices
    (".token_adapter.base_layer.weight", "W"),  # its frozen embedding, saved whole after a resize
    (".base_layer.weight", "W"),  # an adapted embedding saved whole (save_embedding_layers)
)
# Saved whole by save_embedding_layers even when not listed in modules_to_save
# (peft/utils/constants.py EMBEDDING_LAYER_NAMES).
_EMBEDDING_LAYERS = ("embed_tokens", "lm_head")
# The inner modules of PEFT's ModulesToSaveWrapper (peft/utils/other.py). A module in
# modules_to_save is saved as `X.weight`, the trained copy (its adapter_state_dict). When
# the vocabulary was resized, save_embedding_layers also saves every state_dict key under
# the embedding's name (save_and_load.py get_peft_model_state_dict, "DEAL WITH
# EMBEDDINGS"; PEFT 0.7 to 0.21 alike): `X.modules_to_save.weight`, the same trained
# copy again, and `X.original_module.weight`, the frozen resized base. On load PEFT
# puts `X.weight` into the trained copy (adapter_state_dict_load_map), ignores
# `X.modules_to_save.weight` and loads `X.original_module.weight` into the frozen module
# that merge_and_unload then drops: `X.weight` is what the merged model holds.
_WRAPPER_PARTS = {"modules_to_save": "trained copy", "original_module": "frozen original"}


@dataclass(frozen=True)
class LoraPair:
    """One adapted module: W += scale · B·A (embeddings: W += scale · (B·A)ᵀ)."""

    module: str  # the base model's module name, e.g. "model.layers.0.self_attn.q_proj"
    a: TensorRef  # (r, in); embedding: (r, n_vocab)
    b: TensorRef  # (out, r); embedding: (hidden, r)
    rank: int
    scale: float  # PEFT's scaling for this module, times the user's --lora-scale
    embedding: bool = False
    magnitude: TensorRef | None = None  # DoRA: (out,), the norm each merged row is rescaled to

    @property
    def target(self) -> str:
        return f"{self.module}.weight"


@dataclass(frozen=True)
class TokenRows:
    """trainable_token_indices on one embedding: W[indices[i]] = values[i] (TrainableTokensLayer.merge)."""

    module: str  # e.g. "model.embed_tokens"
    indices: tuple[int, ...]  # distinct token ids
    values: TensorRef  # (len(indices), hidden): trainable_tokens_delta, the rows themselves

    @property
    def target(self) -> str:
        return f"{self.module}.weight"


@dataclass(frozen=True)
class Adapter:
    folder: Path
    name: str  # the folder's name: what the fine-tune is called
    config: dict[str, Any]
    pairs: dict[str, LoraPair]  # base tensor name -> its LoRA
    replacements: dict[str, TensorRef]  # base tensor name -> the adapter's whole tensor
    # Replacements that are the frozen base layer of an adapted embedding
    # (".base_layer.weight", saved by save_embedding_layers), not trained copies.
    base_layer_copies: frozenset[str]
    lora_alpha: float
    rank: int
    use_rslora: bool
    use_dora: bool
    user_scale: float = 1.0
    token_rows: dict[str, TokenRows] = field(default_factory=dict)  # base tensor name -> its retrained rows

    @property
    def base_name(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        return value if isinstance(value, str) and value else None

    @property
    def base_class(self) -> str | None:
        mapping = self.config.get("auto_mapping")
        value = mapping.get("base_model_class") if isinstance(mapping, dict) else None
        return value if isinstance(value, str) else None

    @property
    def has_tokenizer(self) -> bool:
        return any((self.folder / f).is_file() for f in TOKENIZER_FILES)


def is_adapter_folder(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def peft_scale(alpha: float, rank: int, rslora: bool) -> float:
    """LoraLayer.update_layer: lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def pattern_key(patterns: dict[str, Any], module: str, where: Path) -> str | None:
    """peft.utils.other.get_pattern_key: the first pattern that matches the end of `module`."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error as exc:
            raise InputError(f"{where}: pattern {_short(key)} is not a valid regular expression ({exc})") from None
    return None


def _number(cfg: dict, key: str, where: Path, default: Any, kind: type) -> Any:
    value = cfg.get(key, default)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise InputError(f"{where}: {key} is {_short(value)}; it must be a {'number' if kind is float else 'whole number'}")
    return value


def _pattern(cfg: dict, key: str, where: Path, kind: type) -> dict[str, Any]:
    value = cfg.get(key) or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InputError(f"{where}: {key} must be an object of module name -> value")
    for k, v in value.items():
        _number({k: v}, k, where, None, kind)
    return value


def parse_adapter_config(cfg: Any, where: Path) -> dict[str, Any]:
    """Check adapter_config.json; refuse by name what PEFT would do that we do not."""
    if not isinstance(cfg, dict):
        raise InputError(f"{where} is not a JSON object; the adapter config is corrupt")
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedError(f"{where}: peft_type {_short(peft_type)} is not supported; only LoRA adapters (peft_type LORA) are")
    rank = _number(cfg, "r", where, None, int)
    if not 0 < rank <= MAX_RANK:
        raise InputError(f"{where}: r is {rank}; a LoRA rank is between 1 and {MAX_RANK}")
    _number(cfg, "lora_alpha", where, 8, float)  # PEFT's default lora_alpha is 8
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise UnsupportedError(
            f"{where}: bias={_short(bias)} (trained bias tensors) is not supported; only bias='none' adapters can be merged"
        )
    for key, what in _UNSUPPORTED_KEYS.items():
        if cfg.get(key) not in (None, False, [], {}, ""):
            raise UnsupportedError(f"{where}: {key} is set ({what}); this is not supported")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if not isinstance(cfg.get(key, False), bool):
            raise InputError(f"{where}: {key} is {_short(cfg.get(key))}; it must be true or false")
    _pattern(cfg, "rank_pattern", where, int)
    _pattern(cfg, "alpha_pattern", where, float)
    _token_spec(cfg, where)
    return cfg


def _token_spec(cfg: dict, where: Path) -> list[int] | dict[str, list[int]] | None:
    """trainable_token_indices: a list of token ids (the input embedding's) or module name -> ids."""
    spec = cfg.get("trainable_token_indices")
    if spec in (None, [], {}):
        return None
    lists = spec.values() if isinstance(spec, dict) else [spec]
    if isinstance(spec, dict) and not all(isinstance(k, str) and k for k in spec):
        raise InputError(f"{where}: trainable_token_indices must map module names to lists of token ids")
    for ids in lists:
        if not (isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
            raise InputError(f"{where}: trainable_token_indices holds {_short(ids)}; it must be a list of token ids")
        if len(set(ids)) != len(ids):
            # index_copy with a repeated index keeps an unspecified one of its rows
            raise InputError(f"{where}: trainable_token_indices repeats a token id in {_short(ids)}; PEFT's merge of it is undefined")
    return spec


def _token_rows(cfg: dict, deltas: dict[str, TensorRef], where: Path) -> dict[str, TokenRows]:
    """Each saved trainable_tokens_delta with its indices, matched as PEFT matches them
    (utils/other.py set_additional_trainable_modules, _set_trainable: a list names the
    input embedding; a dict key names every module whose name ends with it)."""
    spec = _token_spec(cfg, where)
    first = _short(_PREFIX + next(iter(deltas), "") + ".token_adapter.trainable_tokens_delta")
    if spec is None:
        if deltas:
            raise InputError(f"{where}: tensor {first} holds trainable token rows but adapter_config.json sets no "
                             "trainable_token_indices; the config and the weights disagree")
        return {}
    if isinstance(spec, list):
        if len(deltas) != 1:
            raise InputError(f"{where}: trainable_token_indices is one list of ids but the file holds {len(deltas)} "
                             "trainable_tokens_delta tensors; the config and the weights disagree")
        matched = {next(iter(deltas)): spec}
    else:
        matched = {}
        for key, ids in spec.items():
            hits = [m for m in deltas if m.endswith(key)]
            if not hits:
                raise InputError(f"{where}: trainable_token_indices names {_short(key)} but the file has no "
                                 "trainable_tokens_delta for it; the config and the weights disagree")
            for module in hits:
                if module in matched:
                    raise InputError(f"{where}: trainable_token_indices names {_short(module)} twice; the config is ambiguous")
                matched[module] = ids
        extra = sorted(set(deltas) - set(matched))
        if extra:
            raise InputError(f"{where}: the file holds trainable token rows for {_short(extra[0])}, which "
                             "trainable_token_indices does not name; the config and the weights disagree")
    out = {}
    for module, ids in matched.items():
        ref = deltas[module]
        if len(ref.shape) != 2 or ref.shape[0] != len(ids):
            raise InputError(f"{where}: the trainable token rows of {_short(module)} have shape {list(ref.shape)} "
                             f"for {len(ids)} token ids; the adapter is corrupt")
        rows = TokenRows(module, tuple(ids), ref)
        out[rows.target] = rows
    return out


def _weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise InputError(f"no adapter weights in {folder}: expected {' or '.join(WEIGHT_FILES)}")


def _read_tensors(path: Path) -> dict[str, TensorRef]:
    if path.suffix == ".bin":
        from alpaca_local.source.torch_bin import read_torch_bin  # the restricted unpickler, never torch.load

        return read_torch_bin(path)
    return read_safetensors(path)


def _split_key(key: str, where: Path) -> tuple[str, str]:
    """(module name in the base, role) of one saved tensor name."""
    if not key.startswith(_PREFIX):
        raise InputError(f"{where}: tensor {_short(key)} does not start with {_PREFIX!r}; not a PEFT adapter file")
    name = key[len(_PREFIX):]
    for suffix, role in _ROLES:
        if name.endswith(suffix):
            return name[: -len(suffix)], role
    if name.endswith(".lora_B.bias"):
        raise UnsupportedError(f"{where}: tensor {_short(key)} is a trained bias on lora_B (lora_bias), which is not supported")
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            module = name[: -len(suffix)]
            outer, _, part = module.rpartition(".")
            if outer and part in _WRAPPER_PARTS:
                return outer, part + suffix
            return module, "R" + suffix
    raise InputError(f"{where}: tensor {_short(key)} is neither a LoRA factor nor a saved module; not supported")


def check_finite(ref: TensorRef, what: str) -> None:
    """Refuse NaN or Inf anywhere in `ref`, reading it in bounded chunks."""
    rows_per = max(1, _FINITE_CHUNK // max(ref.shape[-1] if ref.shape else 1, 1))
    for start in range(0, ref.n_rows, rows_per):
        rows = ref.read_rows(start, min(ref.n_rows, start + rows_per))
        if not np.isfinite(rows).all():
            raise InputError(f"{what}: tensor {_short(ref.name)} contains NaN or Inf; the adapter is broken, retrain or re-download it")


def _listed(module: str, cfg: dict) -> bool:
    """Whether `module` is in modules_to_save (PEFT matches a name or the end of one)."""
    listed = cfg.get("modules_to_save") or []
    if not isinstance(listed, list):
        return False
    return any(isinstance(m, str) and (module == m or module.endswith("." + m)) for m in listed)


def _saved_whole(module: str, cfg: dict) -> bool:
    return module.rsplit(".", 1)[-1] in _EMBEDDING_LAYERS or _listed(module, cfg)


def _same_bytes(a: TensorRef, b: TensorRef) -> bool:
    rows_per = max(1, _FINITE_CHUNK // max(a.shape[-1] if a.shape else 1, 1))
    for start in range(0, a.n_rows, rows_per):
        stop = min(a.n_rows, start + rows_per)
        if a.read_raw_rows(start, stop).tobytes() != b.read_raw_rows(start, stop).tobytes():
            return False
    return True


def _check_wrapper_parts(parts: list[tuple[str, str, str, TensorRef]], replacements: dict[str, TensorRef],
                         cfg: dict, wfile: Path) -> None:
    """The `X.modules_to_save.*` / `X.original_module.*` tensors saved beside a resized
    embedding (see _WRAPPER_PARTS): consistent with the trained `X.*`, which alone is merged.
    Anything PEFT would not write, or could not load again, is refused."""
    for key, module, part, ref in parts:
        if not _listed(module, cfg):
            raise InputError(
                f"{wfile}: tensor {_short(key)} is a whole module that adapter_config.json does not list "
                "in modules_to_save; the config and the weights disagree"
            )
        target = module + key[key.rindex("."):]
        trained = replacements.get(target)
        if trained is None:
            raise InputError(
                f"{wfile}: tensor {_short(key)} has no {_short(_PREFIX + target)} beside it, the trained copy "
                "PEFT loads; the adapter file is incomplete"
            )
        if ref.shape != trained.shape or ref.dtype != trained.dtype:
            raise InputError(
                f"{wfile}: tensor {_short(key)} is {ref.dtype} {list(ref.shape)} but {_short(_PREFIX + target)} is "
                f"{trained.dtype} {list(trained.shape)}; the adapter is corrupt"
            )
        if part == "modules_to_save" and not _same_bytes(ref, trained):
            raise InputError(
                f"{wfile}: tensors {_short(key)} and {_short(_PREFIX + target)} are two saves of the same trained "
                "copy but hold different values; the file was altered after PEFT saved it"
            )


def _pair(module: str, parts: dict[str, TensorRef], cfg: dict, user_scale: float, where: Path) -> LoraPair:
    embedding = "EA" in parts or "EB" in parts
    a, b = (parts.get("EA"), parts.get("EB")) if embedding else (parts.get("A"), parts.get("B"))
    if a is None or b is None:
        missing = ("lora_embedding_A" if embedding else "lora_A") if a is None else ("lora_embedding_B" if embedding else "lora_B")
        raise InputError(f"{where}: module {_short(module)} has no {missing} tensor; the adapter file is incomplete")
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        raise InputError(
            f"{where}: module {_short(module)} has A {list(a.shape)} and B {list(b.shape)}, whose ranks disagree; the adapter is corrupt"
        )
    r_key = pattern_key(cfg.get("rank_pattern") or {}, module, where)
    a_key = pattern_key(cfg.get("alpha_pattern") or {}, module, where)
    rank = (cfg.get("rank_pattern") or {}).get(r_key, cfg["r"]) if r_key else cfg["r"]
    alpha = (cfg.get("alpha_pattern") or {}).get(a_key, cfg.get("lora_alpha", 8)) if a_key else cfg.get("lora_alpha", 8)
    if a.shape[0] != rank:
        raise InputError(
            f"{where}: module {_short(module)} has rank {a.shape[0]} but adapter_config.json says r={rank}; "
            "the config does not belong to these weights"
        )
    magnitude = parts.get("M")
    if magnitude is not None and not cfg.get("use_dora", False):
        raise InputError(f"{where}: module {_short(module)} has a DoRA magnitude but use_dora is false; the config is contradictory")
    if cfg.get("use_dora", False) and not embedding and magnitude is None:
        raise InputError(f"{where}: use_dora is true but module {_short(module)} has no lora_magnitude_vector")
    if embedding and magnitude is not None:
        raise UnsupportedError(f"{where}: DoRA on the embedding {_short(module)} is not supported")
    if magnitude is not None and magnitude.shape != (b.shape[0],):
        raise InputError(f"{where}: the DoRA magnitude of {_short(module)} has shape {list(magnitude.shape)}, not [{b.shape[0]}]")
    scale = peft_scale(float(alpha), int(rank), bool(cfg.get("use_rslora", False))) * user_scale
    return LoraPair(module, a, b, int(rank), scale, embedding, magnitude)


def read_adapter(folder: Path, user_scale: float = 1.0, name: str | None = None) -> Adapter:
    """The adapter in `folder`, its config and tensors checked (NaN/Inf included).

    `name`: what the fine-tune is called when the folder's own name says nothing (a Hub
    snapshot folder is named after its commit)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; give the adapter folder that holds {CONFIG_FILE}")
    if not math.isfinite(user_scale):
        raise InputError(f"--lora-scale {user_scale} is not a finite number")
    where = folder / CONFIG_FILE
    if not where.is_file():
        what = "a model folder (config.json), not" if (folder / "config.json").is_file() else "not"
        raise InputError(f"{folder} is {what} a PEFT LoRA adapter: an adapter folder holds {CONFIG_FILE} and {WEIGHT_FILES[0]}")
    cfg = parse_adapter_config(read_json(where, "the adapter's config"), where)
    wfile = _weights_file(folder)
    grouped: dict[str, dict[str, TensorRef]] = {}
    replacements: dict[str, TensorRef] = {}
    base_layers: set[str] = set()
    wrapper_parts: list[tuple[str, str, str, TensorRef]] = []
    deltas: dict[str, TensorRef] = {}
    for key, ref in _read_tensors(wfile).items():
        module, role = _split_key(key, wfile)
        if role.split(".", 1)[0] in _WRAPPER_PARTS:
            wrapper_parts.append((key, module, role.split(".", 1)[0], ref))
            continue
        if role == "T":
            deltas[module] = ref
            continue
        if role.startswith("R") or role == "W":
            if role.startswith("R") and not _saved_whole(module, cfg):
                raise InputError(
                    f"{wfile}: tensor {_short(key)} is a whole module that adapter_config.json does not list "
                    "in modules_to_save; the config and the weights disagree"
                )
            target = module + (".weight" if role == "W" else role[1:])
            if target in replacements:
                raise InputError(f"{wfile}: two tensors give the whole of {_short(target)}; the adapter file is corrupt")
            replacements[target] = ref
            if role == "W":
                base_layers.add(target)
            continue
        grouped.setdefault(module, {})[role] = ref
    pairs = {}
    for module, parts in grouped.items():
        pair = _pair(module, parts, cfg, user_scale, wfile)
        pairs[pair.target] = pair
    token_rows = _token_rows(cfg, deltas, wfile)
    for target in token_rows.keys() & pairs.keys():
        raise UnsupportedError(f"{wfile}: {_short(target)} has both a LoRA and trainable token rows; this is not supported")
    if not pairs and not replacements and not token_rows:
        raise InputError(f"{wfile} holds no LoRA tensors; the adapter is empty")
    for ref in [*replacements.values(), *(t for p in pairs.values() for t in (p.a, p.b, p.magnitude) if t is not None),
                *(t.values for t in token_rows.values())]:
        check_finite(ref, str(wfile))
    _check_wrapper_parts(wrapper_parts, replacements, cfg, wfile)
    return Adapter(
        folder, name or folder.resolve().name, cfg, pairs, replacements, frozenset(base_layers),
        lora_alpha=float(cfg.get("lora_alpha", 8)), rank=int(cfg["r"]),
        use_rslora=bool(cfg.get("use_rslora", False)), use_dora=bool(cfg.get("use_dora", False)),
        user_scale=user_scale, token_rows=token_rows,
    )


def check_against_base(adapter: Adapter, base: dict[str, TensorRef], hf_arch: str) -> None:
    """Every module the adapter touches exists in `base` with shapes that fit.

    `base` is the base's tensors after earlier adapters' replacements. Whole
    replacements may add rows to the embedding and output (a resized
    vocabulary); the pipeline checks that the rows agree across tensors.
    """
    if adapter.base_class and adapter.base_class != hf_arch:
        raise InputError(
            f"adapter {adapter.name} was trained on a {adapter.base_class} but the base is a {hf_arch}; "
            "give the base model it was trained on"
        )
    for target, ref in adapter.replacements.items():
        have = base.get(target)
        if have is None:
            raise InputError(f"adapter {adapter.name} replaces {_short(target)}, which the base model lacks; is this the right base?")
        resizable = target.rsplit(".", 2)[-2] in _EMBEDDING_LAYERS and len(ref.shape) == 2
        if ref.shape != have.shape and not (resizable and ref.shape[1:] == have.shape[1:]):
            raise InputError(
                f"adapter {adapter.name} gives {_short(target)} shape {list(ref.shape)} but the base has "
                f"{list(have.shape)}; is this the right base?"
            )
    for target, rows in adapter.token_rows.items():
        have = adapter.replacements.get(target) or base.get(target)
        if have is None or len(have.shape) != 2:
            raise InputError(
                f"adapter {adapter.name} retrains token rows of {_short(rows.module)}, which the base model "
                f"{'lacks' if have is None else 'has as no matrix'}; is this the right base?"
            )
        if rows.values.shape[1] != have.shape[1] or max(rows.indices) >= have.shape[0]:
            raise InputError(
                f"adapter {adapter.name} retrains token ids up to {max(rows.indices)} of {_short(rows.module)} in rows of "
                f"{rows.values.shape[1]}, but the base's is {list(have.shape)}; is this the right base?"
            )
    for target, pair in adapter.pairs.items():
        have = adapter.replacements.get(target) or base.get(target)
        if have is None:
            hint = " (the base ties it to embed_tokens)" if pair.module.endswith("lm_head") else ""
            raise InputError(
                f"adapter {adapter.name} adapts {_short(pair.module)}, which the base model lacks{hint}; is this the right base?"
            )
        if len(have.shape) != 2:
            raise InputError(f"adapter {adapter.name} adapts {_short(pair.module)}, which is not a matrix in the base")
        rows, cols = have.shape
        want_a, want_b = ((pair.rank, rows), (cols, pair.rank)) if pair.embedding else ((pair.rank, cols), (rows, pair.rank))
        if pair.a.shape != want_a or pair.b.shape != want_b:
            raise InputError(
                f"adapter {adapter.name}: {_short(pair.module)} has A {list(pair.a.shape)} and B {list(pair.b.shape)} "
                f"but the base weight is {list(have.shape)}; is this the right base?"
            )


def chat_template_of(folder: Path) -> str | None:
    """The chat template a tokenizer folder declares (chat_template.jinja, else tokenizer_config.json)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8") or None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read {jinja}: {exc}") from None
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None
    value = read_json(path, "the tokenizer config")
    template = value.get("chat_template") if isinstance(value, dict) else None
    return template if isinstance(template, str) and template else None

"""Read and check a Hugging Face `config.json` into one frozen `ModelConfig`.

In: a model folder. Out: the shape facts every stage needs (convert's metadata
and tensor checks, the planner's arithmetic). Every value is checked here, so
later stages can trust it; a bad value is one `InputError` naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, UnsupportedError

# Largest sizes we accept: far above any real model, small enough that the
# arithmetic built on them (planner, buffer sizes) stays sane.
MAX_DIM = 1 << 20
MAX_LAYERS = 4096
MAX_VOCAB = 1 << 22
MAX_CTX = 1 << 24


@dataclass(frozen=True)
class ModelConfig:
    hf_arch: str  # e.g. "LlamaForCausalLM"
    n_layer: int
    hidden: int
    n_head: int
    n_kv_head: int
    head_dim: int
    intermediate: int
    vocab_size: int
    n_ctx: int
    rope_theta: float
    rms_eps: float
    tie_embeddings: bool = False
    explicit_head_dim: bool = False  # config.json named head_dim itself
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_kv_head


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file, turning every failure into one clear InputError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path} not found; {what} is required") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); fix or re-download it") from exc


def _int_field(cfg: dict, path: Path, names: tuple[str, ...], lo: int, hi: int, default: int | None = None) -> int:
    for name in names:
        if name in cfg and cfg[name] is not None:
            value = cfg[name]
            if type(value) is not int or not lo <= value <= hi:
                raise InputError(f"{path}: {name} = {value!r} is not an integer between {lo} and {hi}")
            return value
    if default is not None:
        return default
    raise InputError(f"{path}: required field {names[0]!r} is missing")


def _float_field(cfg: dict, path: Path, name: str, lo: float, hi: float, default: float) -> float:
    value = cfg.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value <= hi:
        raise InputError(f"{path}: {name} = {value!r} is not a number in ({lo}, {hi}]")
    return float(value)


def parse_config(cfg: Any, path: Path, supported: dict[str, str]) -> ModelConfig:
    """Check a parsed config.json; `supported` maps HF class -> description for the error."""
    if not isinstance(cfg, dict):
        raise InputError(f"{path} is not a JSON object")
    archs = cfg.get("architectures")
    if not (isinstance(archs, list) and archs and isinstance(archs[0], str)):
        raise InputError(f"{path}: 'architectures' is missing; expected e.g. [\"LlamaForCausalLM\"]")
    hf_arch = archs[0]
    if hf_arch not in supported:
        names = ", ".join(sorted(supported))
        raise UnsupportedError(f"architecture {hf_arch} is not supported yet; supported: {names}")
    hidden = _int_field(cfg, path, ("hidden_size",), 1, MAX_DIM)
    n_head = _int_field(cfg, path, ("num_attention_heads",), 1, MAX_DIM)
    n_kv_head = _int_field(cfg, path, ("num_key_value_heads",), 1, MAX_DIM, default=n_head)
    explicit_head_dim = cfg.get("head_dim") is not None
    if not explicit_head_dim and hidden % n_head:
        raise InputError(f"{path}: hidden_size {hidden} is not divisible by num_attention_heads {n_head}")
    head_dim = _int_field(cfg, path, ("head_dim",), 1, MAX_DIM, default=hidden // n_head)
    if head_dim % 2:
        raise InputError(f"{path}: head size {head_dim} is odd; rotary embeddings need an even head size")
    if n_head % n_kv_head:
        raise InputError(f"{path}: num_attention_heads {n_head} is not divisible by num_key_value_heads {n_kv_head}")
    tie = cfg.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise InputError(f"{path}: tie_word_embeddings = {tie!r} is not true or false")
    return ModelConfig(
        hf_arch=hf_arch,
        n_layer=_int_field(cfg, path, ("num_hidden_layers",), 1, MAX_LAYERS),
        hidden=hidden,
        n_head=n_head,
        n_kv_head=n_kv_head,
        head_dim=head_dim,
        intermediate=_int_field(cfg, path, ("intermediate_size",), 1, MAX_DIM * 16),
        vocab_size=_int_field(cfg, path, ("vocab_size",), 1, MAX_VOCAB),
        n_ctx=_int_field(cfg, path, ("max_position_embeddings",), 1, MAX_CTX, default=2048),
        rope_theta=_float_field(cfg, path, "rope_theta", 0.0, 1e12, 10000.0),
        rms_eps=_float_field(cfg, path, "rms_norm_eps", 0.0, 1.0, 1e-6),
        tie_embeddings=tie,
        explicit_head_dim=explicit_head_dim,
        raw=cfg,
    )


def load_config(folder: Path, supported: dict[str, str]) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(f"no config.json in {folder}; point at a Hugging Face model folder")
    return parse_config(read_json(path, "the model's config"), path, supported)

"""Read and check a Hugging Face `config.json` into one frozen `ModelConfig`.

In: a model folder. Out: the shape facts every stage needs (convert's metadata
and tensor checks, the planner's arithmetic). Every value is checked here, so
later stages can trust it; a bad value is one `InputError` naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from alpaca_local.errors import InputError, UnsupportedError

# Largest sizes we accept: far above any real model, small enough that the
# arithmetic built on them (planner, buffer sizes) stays sane.
MAX_DIM = 1 << 20
MAX_LAYERS = 4096
MAX_VOCAB = 1 << 22
MAX_CTX = 1 << 24
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS (src/llama-hparams.h:12): llama.cpp loads no more


@dataclass(frozen=True, kw_only=True)
class ModelDims:
    """The size facts of a model, declared once: `ModelConfig` (a checked config.json)
    and the planner's `ModelShape` (from a config, a GGUF header or a catalog entry)
    both extend it, so a model's sizes have one set of names and one definition."""

    n_layer: int
    hidden: int
    n_head: int
    n_kv_head: int
    head_dim: int
    intermediate: int
    vocab_size: int
    n_ctx: int  # the training context (max_position_embeddings / {arch}.context_length)
    tie_embeddings: bool = False  # no separate output matrix: the token embedding is reused
    # Mixture of experts (llama_hparams n_expert, n_expert_used, n_ff_exp, n_ff_shexp); 0 for dense.
    n_expert: int = 0  # routed experts per layer ({arch}.expert_count)
    n_expert_used: int = 0  # experts each token goes through ({arch}.expert_used_count)
    n_ff_exp: int = 0  # one expert's FFN width; 0: the model's intermediate size (Mixtral)
    n_ff_shexp: int = 0  # the shared expert's FFN width (Qwen2-MoE); 0: none

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    @property
    def expert_ff(self) -> int:
        """The FFN width of one routed expert (llama.cpp: n_ff_exp, or n_ff where the key is absent)."""
        return self.n_ff_exp or self.intermediate

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_kv_head

    @property
    def n_kv_gqa(self) -> int:
        # hparams.n_embd_k_gqa(): n_head_kv x n_embd_head_k, and n_embd_head_k is the file's
        # attention.key_length (Gemma 2: 256 per head whatever hidden / n_head is).
        return self.n_kv_head * self.head_dim

    @property
    def n_q(self) -> int:
        return self.n_head * self.head_dim  # the width of Q and of the attention output


def dims_of(model: ModelDims) -> dict[str, Any]:
    """The ModelDims fields of `model` as keywords, to build the other role from one."""
    return {f.name: getattr(model, f.name) for f in fields(ModelDims)}


@dataclass(frozen=True, kw_only=True)
class ModelConfig(ModelDims):
    """A checked config.json: the sizes plus what convert needs to map and describe it."""

    hf_arch: str  # e.g. "LlamaForCausalLM"
    rope_theta: float
    rms_eps: float
    explicit_head_dim: bool = False  # config.json named head_dim itself
    # Rope scaling as config.json gives it ("rope_scaling", or "rope_parameters" in
    # newer transformers), with "type" copied to "rope_type"; None without scaling.
    rope_scaling: dict[str, Any] | None = field(default=None, compare=False)
    sliding_window: int | None = None  # tokens a sliding-window layer attends to
    attn_softcap: float | None = None  # Gemma 2: tanh soft-capping of attention scores
    final_softcap: float | None = None  # Gemma 2: tanh soft-capping of the logits
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


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
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge integers, deep nesting
        if isinstance(exc, json.JSONDecodeError):
            where = f"line {exc.lineno}: {exc.msg}"
        else:
            where = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:100]
        raise InputError(f"{path} is not valid JSON ({where}); fix or re-download it") from None


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


def _optional_float(cfg: dict, path: Path, name: str) -> float | None:
    if cfg.get(name) is None:
        return None
    return _float_field(cfg, path, name, 0.0, 1e12, 1.0)


def _rope_scaling(cfg: dict, path: Path) -> dict[str, Any] | None:
    # TextModel.__init__ in the reference converter: rope_parameters, else
    # rope_scaling; the old "type" key stands for "rope_type".
    scaling = cfg.get("rope_parameters", cfg.get("rope_scaling"))
    if not scaling:
        return None
    if not isinstance(scaling, dict):
        raise InputError(f"{path}: rope_scaling = {scaling!r} is not an object")
    scaling = dict(scaling)
    if "rope_type" not in scaling and "type" in scaling:
        scaling["rope_type"] = scaling["type"]
    kind = scaling.get("rope_type")
    if kind is not None and not isinstance(kind, str):
        raise InputError(f"{path}: rope_scaling.rope_type = {kind!r} is not a string")
    for key, value in scaling.items():
        if key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings") and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e12
        ):
            raise InputError(f"{path}: rope_scaling.{key} = {value!r} is not a positive number")
    return scaling


def parse_config(
    cfg: Any, path: Path, supported: dict[str, str], defaults: dict[str, dict[str, Any]] | None = None,
    refused: dict[str, str] | None = None,
) -> ModelConfig:
    """Check a parsed config.json; `supported` maps HF class -> description for the error.

    `defaults` maps HF class -> values its transformers config class assumes when
    config.json leaves them out (Gemma 2 ties its embeddings unless told otherwise;
    a Gemma 3 4B config.json names only a few sizes). `refused` maps an HF class that is
    not supported to the reason, said in its error.
    """
    if not isinstance(cfg, dict):
        raise InputError(f"{path} is not a JSON object")
    archs = cfg.get("architectures")
    if not (isinstance(archs, list) and archs and isinstance(archs[0], str)):
        raise InputError(f"{path}: 'architectures' is missing; expected e.g. [\"LlamaForCausalLM\"]")
    hf_arch = archs[0]
    if hf_arch not in supported:
        names = ", ".join(sorted(supported))
        why = f" ({(refused or {})[hf_arch]})" if hf_arch in (refused or {}) else ""
        raise UnsupportedError(f"architecture {hf_arch} is not supported yet{why}; supported: {names}")
    text = cfg.get("text_config")
    if text is not None and not isinstance(text, dict):
        raise InputError(f"{path}: text_config = {text!r} is not an object")
    # A multimodal config nests the text model's fields (TextModel.__init__ moves
    # them to the root); keys it leaves out take the config class's defaults.
    cfg = {**(defaults or {}).get(hf_arch, {}), **cfg, **(text or {})}
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
        rope_scaling=_rope_scaling(cfg, path),
        sliding_window=_int_field(cfg, path, ("sliding_window",), 1, MAX_CTX, default=0) or None,
        attn_softcap=_optional_float(cfg, path, "attn_logit_softcapping"),
        final_softcap=_optional_float(cfg, path, "final_logit_softcapping"),
        # TextModel.set_gguf_parameters reads these names, first found wins (conversion/base.py:1517-1522).
        n_expert=_int_field(cfg, path, ("num_local_experts", "num_experts", "n_routed_experts"), 0, MAX_EXPERTS,
                            default=0),
        n_expert_used=_int_field(cfg, path, ("num_experts_per_tok", "num_experts_per_token", "top_k_experts"),
                                 0, MAX_EXPERTS, default=0),
        n_ff_exp=_int_field(cfg, path, ("moe_intermediate_size",), 1, MAX_DIM * 16, default=0),
        n_ff_shexp=_int_field(cfg, path, ("shared_expert_intermediate_size",), 1, MAX_DIM * 16, default=0),
        raw=cfg,
    )


def load_config(
    folder: Path, supported: dict[str, str], defaults: dict[str, dict[str, Any]] | None = None,
    refused: dict[str, str] | None = None,
) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(f"no config.json in {folder}; point at a Hugging Face model folder")
    return parse_config(read_json(path, "the model's config"), path, supported, defaults, refused)

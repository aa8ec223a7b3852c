"""One matrix per expert in the source -> the stacked `ffn_*_exps` tensors llama.cpp reads;
and the config checks every mixture-of-experts architecture shares.

In:  a mixture-of-experts checkpoint's source tensors (transformers 4.x saves
     Mixtral and the Qwen MoE models with one matrix per expert and projection),
     the architecture's `ExpertLayout` and the expert count.
Out: the same table with each layer's per-expert matrices replaced by one
     `StackedTensor` per projection, [n_expert, rows, cols], named as the
     reference converter names its merged tensor and placed where it emits it:
     at the layer's last expert matrix in reading order, once all
     n_expert x 3 have arrived (LlamaModel.modify_tensors, conversion/llama.py:262-290;
     Qwen2MoeModel.modify_tensors, conversion/qwen.py:118-143).

Nothing is read here. A `StackedTensor` lists its parts, and the pipeline
writes each part at its own place in the stacked tensor's data: one expert's
rows are contiguous there, and ggml quantizes row by row (with an imatrix,
one slice per expert: llama-quant.cpp:779-785), so a layer's experts never
sit in memory together and the reads stay in file order (a streamed Hub file
is read once, front to back).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from alpaca_local.errors import InputError, UnsupportedError
from alpaca_local.source.config import ModelConfig
from alpaca_local.source.tensors import TensorRef


@dataclass(frozen=True)
class ExpertLayout:
    """How one architecture's checkpoint stores its experts."""

    # One expert's matrix: groups (layer, expert, projection).
    pattern: str
    # The projections in the order the reference stacks and emits them.
    projections: tuple[str, ...]
    # The merged tensor's source-side name, which gguf-py's TensorNameMap maps.
    stacked_name: str

    def match(self, name: str) -> tuple[int, int, str] | None:
        m = re.fullmatch(self.pattern, name)
        return (int(m[1]), int(m[2]), m[3]) if m else None


# Mixtral: block_sparse_moe.experts.{x}.w1/w2/w3 = gate/down/up; merged as
# "layers.{bid}.feed_forward.experts.{wid}.weight" (conversion/llama.py:275-285).
MIXTRAL_EXPERTS = ExpertLayout(
    pattern=r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight",
    projections=("w1", "w2", "w3"),
    stacked_name="layers.{bid}.feed_forward.experts.{proj}.weight",
)
# Qwen2-MoE / Qwen3-MoE: mlp.experts.{x}.{down,gate,up}_proj (conversion/qwen.py:130-141).
QWEN_MOE_EXPERTS = ExpertLayout(
    pattern=r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(down_proj|gate_proj|up_proj)\.weight",
    projections=("down_proj", "gate_proj", "up_proj"),
    stacked_name="model.layers.{bid}.mlp.experts.{proj}.weight",
)


@dataclass(frozen=True)
class StackedTensor:
    """n_expert source matrices of one shape and dtype, seen as one [n_expert, rows, cols] tensor."""

    name: str  # for messages: the parts' names with the expert index as {0..n-1}
    parts: tuple[TensorRef, ...]  # expert 0, 1, ...

    @property
    def dtype(self) -> str:
        return self.parts[0].dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts), *self.parts[0].shape)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def n_rows(self) -> int:
        return math.prod(self.shape[:-1])


Source = TensorRef | StackedTensor


def stack_experts(refs: dict[str, TensorRef], layout: ExpertLayout, n_expert: int) -> dict[str, Source]:
    """`refs` with every layer's expert matrices stacked per projection (see the module docstring).

    Errors, one line each: an expert index the config does not have, a missing
    expert matrix, experts of one projection with different shapes or dtypes.
    """
    found: dict[int, dict[tuple[int, str], TensorRef]] = {}
    last: dict[int, str] = {}  # layer -> its last expert matrix in reading order
    for name, ref in refs.items():
        hit = layout.match(name)
        if hit is None:
            continue
        layer, expert, proj = hit
        if expert >= n_expert:
            raise InputError(
                f"tensor {name!r} is for expert {expert} but config.json has {n_expert} experts "
                f"(0-{n_expert - 1}); the weights do not match the config"
            )
        found.setdefault(layer, {})[expert, proj] = ref
        last[layer] = name
    out: dict[str, Source] = {}
    for name, ref in refs.items():
        hit = layout.match(name)
        if hit is None:
            out[name] = ref
        elif name == last[hit[0]]:
            layer = hit[0]
            for proj in layout.projections:
                out[layout.stacked_name.format(bid=layer, proj=proj)] = _stack(found[layer], layer, proj, n_expert)
    return out


def _stack(experts: dict[tuple[int, str], TensorRef], layer: int, proj: str, n_expert: int) -> StackedTensor:
    parts = []
    for expert in range(n_expert):
        ref = experts.get((expert, proj))
        if ref is None:
            present = sum(1 for _, p in experts if p == proj)
            raise InputError(
                f"layer {layer} lacks expert {expert}'s {proj} (has {present} of {n_expert}); "
                "a shard is missing or the checkpoint is incomplete"
            )
        first = parts[0] if parts else ref
        if ref.shape != first.shape or ref.dtype != first.dtype:
            raise InputError(
                f"tensor {ref.name!r} is {ref.dtype} {list(ref.shape)} but expert 0's {proj} of layer {layer} is "
                f"{first.dtype} {list(first.shape)}; every expert of a layer must have the same shape and dtype"
            )
        parts.append(ref)
    shown = re.sub(r"\.experts\.0\.", f".experts.{{0..{n_expert - 1}}}.", parts[0].name, count=1)
    return StackedTensor(shown, tuple(parts))


# --------------------------------------------------------------------------
# Config checks every MoE architecture entry shares
# --------------------------------------------------------------------------


def _short(value: object) -> str:
    """A config value for a one-line message, cut short (config.json is hostile input)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _config_key(cfg: ModelConfig, names: tuple[str, ...]) -> str:
    """The first of `names` config.json has (the one parse_config read), else the first."""
    return next((n for n in names if cfg.raw.get(n) is not None), names[0])


def check_expert_counts(cfg: ModelConfig, count_keys: tuple[str, ...]) -> None:
    """llama.cpp's load asserts 0 < n_expert_used <= n_expert (src/llama-model.cpp:1361-1364) and the
    MoE graphs throw on n_expert 0 (e.g. src/models/qwen3moe.cpp:37-42): refuse those configs here."""
    key = _config_key(cfg, count_keys)
    if cfg.n_expert < 1:
        raise InputError(f"config.json: {key} = {cfg.raw.get(key)!r}; a mixture-of-experts model needs at least 1 expert")
    used = _config_key(cfg, ("num_experts_per_tok", "num_experts_per_token", "top_k_experts"))
    if not 1 <= cfg.n_expert_used <= cfg.n_expert:
        raise InputError(
            f"config.json: {used} = {cfg.raw.get(used)!r} experts per token, but there are {cfg.n_expert} "
            f"experts ({key}); give a number from 1 to {cfg.n_expert}"
        )


def check_qwen_moe(cfg: ModelConfig, norm_topk: bool, arch_name: str) -> None:
    """What llama.cpp's qwen2moe / qwen3moe graphs assume of a Qwen MoE config."""
    check_expert_counts(cfg, ("num_local_experts", "num_experts"))
    if not cfg.n_ff_exp:
        raise InputError("config.json lacks moe_intermediate_size, the experts' feed-forward width")
    # Every layer is a MoE layer in llama.cpp (load_arch_tensors creates experts for each);
    # transformers makes layer i dense when it is in mlp_only_layers or (i + 1) % decoder_sparse_step != 0.
    step = cfg.raw.get("decoder_sparse_step", 1)
    dense = cfg.raw.get("mlp_only_layers") or []
    if step != 1 or dense:
        raise UnsupportedError(
            f"config.json makes some layers dense (mlp_only_layers {_short(dense)}, decoder_sparse_step {_short(step)}); "
            f"llama.cpp's {arch_name} has experts in every layer"
        )
    # build_moe_ffn's norm_w (src/models/qwen3moe.cpp: true, src/models/qwen2moe.cpp: false) is fixed
    # per architecture; transformers renormalizes the top-k weights only with norm_topk_prob.
    if bool(cfg.raw.get("norm_topk_prob", False)) != norm_topk:
        raise UnsupportedError(
            f"config.json: norm_topk_prob = {_short(cfg.raw.get('norm_topk_prob', False))}; llama.cpp's {arch_name} "
            f"always uses {norm_topk} (it would weight the experts differently)"
        )

"""Which GGML type each tensor gets, and how many bytes it takes.

In:  the GGUF tensor names and numpy shapes of one model, a quant level name
     (`quant_levels`: "q6_k", "iq4_xs", "bf16"...) and a few model facts.
Out: one `gguf.GGMLQuantizationType` per tensor, plus byte sizes.

The reference route we must match bit for bit is two programs:

1. ``convert_hf_to_gguf.py --outtype f16`` decides F16 versus F32
   (``ModelBase.prepare_tensors`` in ``conversion/base.py``);
2. ``llama-quantize`` with default parameters re-types the F16 file
   (``llama_tensor_get_type`` and friends in ``src/llama-quant.cpp``, ported in
   `llama_quant`).

We do both in one pass, so the final type is ``step2(step1(tensor))``.  For
f16, bf16 and f32 the reference is step 1 alone (``--outtype bf16`` keeps a
bfloat16 checkpoint's bits, where llama-quantize would round them through f16).
Line numbers below refer to the llama.cpp tree vendored in llama-cpp-python 0.3.36.

Order: llama-quantize iterates ``llama_model_loader::weights_map``, a
``std::map`` ordered by ``weight_name_comparer`` (src/llama-model-loader.h:54):
by the layer number parsed with ``sscanf(name, "blk.%d.")`` (-1 when there is
none), then by name.  Its counters (``i_attention_wv``, ``i_ffn_down``...)
advance in that order, and the quantized file lists its tensors in that order.
`choose_types` therefore accepts the tensors in ANY order (e.g. the order the
f16 file has), replays them in llama.cpp's order, and returns the types in the
caller's order.  `llama_quantize_order` gives that order for the writer.
"""

from __future__ import annotations

from collections.abc import Sequence

import gguf
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from alpaca_local.convert import llama_quant
from alpaca_local.convert.llama_quant import FLOAT_TYPES, ModelFacts, QuantState, TensorSpec
from alpaca_local.convert.quant_levels import LEVELS, usable
from alpaca_local.errors import UnsupportedError

__all__ = [
    "QUANTS", "QUANT_FILE_SUFFIX", "ModelFacts", "TensorSpec", "choose_types", "convert_type", "f16_type",
    "file_type", "imatrix_required", "level_of_file_type", "llama_quantize_order", "row_nbytes", "tensor_nbytes",
]

T = GGMLQuantizationType
F = LlamaFileType

# Canonical level name -> llama_ftype written to general.file_type, for every level
# this build can write (quant_levels has the names, aliases and descriptions).
QUANTS: dict[str, int] = {name: lv.ftype for name, lv in LEVELS.items() if not lv.unavailable}

# Level name -> the tag in file names such as alpaca-7b.Q4_K_M.gguf.
QUANT_FILE_SUFFIX: dict[str, str] = {name: LEVELS[name].tag for name in QUANTS}

# Step 1: the type convert_hf_to_gguf gives a weight for each --outtype
# (conversion/base.py:1141-1150); every other level starts from the f16 file.
_OUTTYPE: dict[int, GGMLQuantizationType] = {F.MOSTLY_F16: T.F16, F.MOSTLY_BF16: T.BF16, F.ALL_F32: T.F32}

# Step 1: tensors convert_hf_to_gguf always keeps in F32 when the arch has
# them (conversion/base.py:1089-1121, matched with match_model_tensor_name).
# Names, not enums, so an older gguf package without some of them still works.
_CONVERT_F32_TENSORS = (
    "FFN_GATE_INP", "FFN_GATE_INP_SHEXP", "POS_EMBD", "TOKEN_TYPES", "SSM_CONV1D",
    "SHORTCONV_CONV", "TIME_MIX_FIRST", "TIME_MIX_W1", "TIME_MIX_W2",
    "TIME_MIX_DECAY_W1", "TIME_MIX_DECAY_W2", "TIME_MIX_LERP_FUSED", "POSNET_NORM1",
    "POSNET_NORM2", "V_ENC_EMBD_POS", "A_ENC_EMBD_POS", "ALTUP_CORRECT_COEF",
    "ALTUP_PREDICT_COEF", "SSM_CONV1D_Q", "SSM_CONV1D_K", "SSM_CONV1D_V", "INDEXER_PROJ",
)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def file_type(quant: str) -> int:
    """The llama_ftype for a level name (any case, aliases); UsageError if unknown or unavailable."""
    return usable(quant).ftype


def level_of_file_type(ftype: object) -> str | None:
    """The level a file's general.file_type names (the first in QUANTS order), or None."""
    return next((level for level, value in QUANTS.items() if ftype == int(value)), None)


def row_nbytes(ggml_type: GGMLQuantizationType, n_per_row: int) -> int:
    """Bytes of one row of `n_per_row` values, as ggml_row_size computes it.

    Raises ValueError when `n_per_row` is not a multiple of the type's block size.
    """
    ggml_type = GGMLQuantizationType(ggml_type)
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    if n_per_row % block:
        raise ValueError(f"row length {n_per_row} is not a multiple of {ggml_type.name}'s block size {block}")
    return n_per_row // block * type_size


def tensor_nbytes(shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> int:
    """Bytes of a tensor's data (no padding), as ggml_nbytes computes it.

    Raises ValueError when the row length (shape[-1]) is not a multiple of
    the type's block size.
    """
    n_rows = 1
    for dim in shape[:-1]:
        n_rows *= dim
    return n_rows * row_nbytes(ggml_type, shape[-1] if shape else 1)


def llama_quantize_order(names: Sequence[str]) -> list[int]:
    """Indices of `names` in the order llama-quantize visits and writes them.

    weight_name_comparer (src/llama-model-loader.h:54): layer from
    sscanf("blk.%d."), -1 without one, then plain byte-wise name order.
    """
    return sorted(range(len(names)), key=lambda i: (llama_quant.layer_of(names[i]), names[i].encode()))


def convert_type(spec: TensorSpec, facts: ModelFacts, outtype: GGMLQuantizationType = T.F16) -> GGMLQuantizationType:
    """Step 1: the type convert_hf_to_gguf --outtype f16 (bf16, f32) gives this tensor.

    ModelBase.prepare_tensors (conversion/base.py:1057-1166), with the base
    tensor_force_quant (base.py:746) that returns False for non-FP8 models.
    """
    name = spec.name
    n_dims = len(spec.shape)  # base.py:1080 uses the numpy rank, no squeeze
    # base.py:1084: 1-D tensors and norms are F32.
    if n_dims <= 1 or name.endswith("_norm.weight"):
        return T.F32
    # base.py:1089-1121: always-F32 tensors, and anything that is not a
    # weight (biases...).
    if name[-7:] not in (".weight", ".lora_a", ".lora_b"):
        return T.F32
    if _is_convert_f32_tensor(name, facts.arch):
        return T.F32
    # base.py:1141-1146: the outtype's type (F16/BF16 never raise QuantError).
    return outtype


def f16_type(spec: TensorSpec, facts: ModelFacts) -> GGMLQuantizationType:
    """Step 1 for --outtype f16: the file every llama-quantize level starts from."""
    return convert_type(spec, facts, T.F16)


def choose_types(
    tensors: Sequence[TensorSpec], quant: str, facts: ModelFacts, has_imatrix: bool = False
) -> list[GGMLQuantizationType]:
    """Final GGML type per tensor, in the order given.

    `tensors` must be the model's complete tensor list (the rules count
    attn_v tensors and look for output.weight); any order is accepted, see
    the module docstring. `has_imatrix`: llama-quantize was given an
    importance matrix (qs.has_imatrix), which changes a few choices.
    Raises UnsupportedError where llama-quantize gives up (a row length no
    fallback type fits, as for Q1_0 on rows that are not a multiple of 128).
    """
    ftype = file_type(quant)
    if ftype in _OUTTYPE:
        return [convert_type(t, facts, _OUTTYPE[ftype]) for t in tensors]
    step1 = [f16_type(t, facts) for t in tensors]
    state = QuantState.start([t.name for t in tensors], facts, has_imatrix)
    result = list(step1)
    try:
        for i in llama_quantize_order([t.name for t in tensors]):
            result[i] = llama_quant.tensor_type(state, tensors[i], step1[i], ftype, facts)
    except ValueError as exc:
        raise UnsupportedError(f"llama-quantize cannot make {usable(quant).name} of this model: {exc}") from None
    return result


def imatrix_required(tensors: Sequence[TensorSpec], types: Sequence[GGMLQuantizationType], quant: str) -> list[str]:
    """The tensors whose chosen type llama-quantize refuses to write without importance data
    (tensor_requires_imatrix, llama-quant.cpp:858; checked for every tensor it may quantize,
    llama-quant.cpp:1131). Empty when the level works without an imatrix on this model."""
    ftype = file_type(quant)
    return [t.name for t, ty in zip(tensors, types, strict=True)
            if ty not in FLOAT_TYPES and llama_quant.requires_imatrix(t.name, ty, ftype)]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _is_convert_f32_tensor(name: str, arch: str) -> bool:
    # match_model_tensor_name (conversion/base.py:614) for each key of the
    # always-F32 list; the key only counts when the arch declares it.
    arch_enum = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), None)
    if arch_enum is None:
        return False
    declared = gguf.MODEL_TENSORS.get(arch_enum, ())
    bid = _first_decimal_part(name)
    for key_name in _CONVERT_F32_TENSORS:
        key = getattr(gguf.MODEL_TENSOR, key_name, None)
        if key is None or key not in declared:
            continue
        template = gguf.TENSOR_NAMES[key]
        if "{bid}" in template:
            if bid is None:
                continue
            template = template.format(bid=bid)
        elif bid is not None:
            continue
        if name == template + ".weight":
            return True
    return False


def _first_decimal_part(name: str) -> int | None:
    # base.py:1069: "use the first number-like part of the tensor name as the
    # block id".  Convert reads it from the HF name; for the GGUF names we see
    # the block index lands in the same place ("blk.N.").
    for part in name.split("."):
        if part.isdecimal():
            return int(part)
    return None

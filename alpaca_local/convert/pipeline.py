"""Hugging Face folder -> one GGUF file, in one streaming pass.

Stages, each its own module: read the source (`config`, `source`, `vocab`)
→ map names (`architectures`) → choose types (`quant_rules`) → quantize
(`ggml`) → write (`atomic` + gguf-py's writer for the header).

`plan_conversion` does everything but the data: it checks the whole input and
knows every output tensor's name, type and byte size before a byte is written.
`convert` then streams tensor chunks through a small thread pool (ggml drops
the GIL) and appends them in order, so memory stays near a few chunks
whatever the model size.
"""

from __future__ import annotations

import contextlib
import os
import queue
import resource
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np

from alpaca_local.convert import quant_levels, quant_rules
from alpaca_local.convert.architectures import (
    ARCHITECTURES,
    CONFIG_DEFAULTS,
    REFUSED,
    SUPPORTED,
    Architecture,
    map_name,
)
from alpaca_local.convert.atomic import atomic_write, check_target
from alpaca_local.convert.experts import StackedTensor, stack_experts
from alpaca_local.convert.imatrix_file import check_against_model, quantize_kv, read_imatrix
from alpaca_local.convert.lora_merge import MergeOp, MergePlan, merge_rows, merged_name, one_blas_thread, plan_merge
from alpaca_local.source.adapter import Adapter
from alpaca_local.source.config import ModelConfig, load_config
from alpaca_local.errors import InputError, UnsupportedError, UsageError
from alpaca_local.convert.ggml import quantize_rows, round_to_f16
from alpaca_local.source.weights import read_weights
from alpaca_local.template import ALPACA_CHAT_TEMPLATE
from alpaca_local.source.tensors import TensorRef, widen
from alpaca_local.source.vocab import Vocab, load_bpe_vocab, load_vocab

# About 4 MB of float32 per chunk: big enough that ggml calls dominate,
# small enough that a few chunks in flight stay far below one large tensor.
CHUNK_ELEMENTS = 1024 * 1024
ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT

Progress = Callable[[str, int], None]  # (tensor name, source bytes just done)


@dataclass(frozen=True)
class GeneratedTensor:
    """A tensor computed from the config (e.g. rope_freqs), with TensorRef's reading interface."""

    name: str
    values: np.ndarray  # float32
    dtype: str = "F32"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes

    @property
    def n_elements(self) -> int:
        return int(self.values.size)

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[:-1])) if self.shape else 1

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        return self.values.reshape(self.n_rows, -1)[start:stop]


@dataclass(frozen=True)
class TensorJob:
    source: TensorRef | GeneratedTensor | StackedTensor
    name: str  # GGUF name
    kind: gguf.MODEL_TENSOR
    ggml_type: gguf.GGMLQuantizationType
    rope_head_dim: int | None  # rows are permuted in groups of this size
    # Added elementwise in the source's precision before quantizing (Gemma's
    # norm weights: 1 + w); works on any row chunk.
    offset: float = 0.0
    # Per-column importance (llama-quantize --imatrix), float32 of the row length.
    imatrix: np.ndarray | None = None
    # LoRAs merged into the source rows, in order, before anything else (lora_merge).
    lora: tuple[MergeOp, ...] = ()
    # Stacked experts: one job per expert, whose data follow one another as this
    # tensor's (each with its expert's imatrix slice and LoRAs); written part by part.
    parts: tuple[TensorJob, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def nbytes(self) -> int:
        return quant_rules.tensor_nbytes(self.shape, self.ggml_type)


@dataclass(frozen=True)
class ConversionPlan:
    source: Path
    name: str
    quant: str
    config: ModelConfig
    arch: Architecture
    vocab: Vocab
    jobs: tuple[TensorJob, ...]
    notes: tuple[str, ...] = ()  # one-line facts the user should see (a skipped vision tower)
    # quantize.imatrix.* keys llama-quantize writes when given an imatrix: (key, value).
    imatrix_kv: tuple[tuple[str, str | int], ...] = ()
    merge: MergePlan | None = None  # the adapters merged while converting
    base_name: str = ""  # the base model's name (folder or Hub repo), for the provenance keys
    # A chosen per-tensor mix (`retyped`, convert/search.py): its metadata keys (key, value), written
    # after the imatrix keys, and the tag its default file name has instead of the level's.
    recipe_kv: tuple[tuple[str, int | str | tuple[int, ...]], ...] = ()
    tag: str = ""

    @property
    def tensor_bytes(self) -> int:
        return sum(padded(j.nbytes) for j in self.jobs)

    @property
    def source_bytes(self) -> int:
        return sum(j.source.nbytes for j in self.jobs)


@dataclass(frozen=True)
class ConvertResult:
    output: Path
    quant: str
    n_tensors: int
    file_bytes: int
    seconds: float
    peak_rss_bytes: int


def padded(n: int) -> int:
    """`n` bytes as the writer lays them out: rounded up to the GGUF alignment (levels.py,
    split parts and convert/search.py count bytes with it too)."""
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def llama_cpp_order(name: str) -> tuple[int, str]:
    """llama.cpp's weight_name_comparer: layer number (-1 outside blocks), then name.

    quantize walks (and writes) tensors in this order, and its per-layer
    counters depend on it, so types are chosen in the same order.
    """
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    return layer, name


def _map_tensors(
    cfg: ModelConfig, arch: Architecture, refs: dict[str, TensorRef | StackedTensor]
) -> list[tuple[TensorRef | GeneratedTensor | StackedTensor, str, gguf.MODEL_TENSOR]]:
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, cfg.n_layer)
    expected = arch.expected_tensors(cfg)
    generated = {
        f"{gguf.TENSOR_NAMES[kind]}.weight": (kind, values) for kind, values in arch.extra_tensors(cfg).items()
    }
    mapped: dict[str, tuple[TensorRef | GeneratedTensor | StackedTensor, str, gguf.MODEL_TENSOR]] = {}
    for hf_name, ref in refs.items():
        m = map_name(arch, name_map, hf_name)
        if m is None:
            continue
        if m.layer is not None and not 0 <= m.layer < cfg.n_layer:
            raise InputError(f"tensor {ref.name!r} is for layer {m.layer} but config.json has {cfg.n_layer} layers")
        if m.gguf_name in mapped:
            raise InputError(f"tensors {mapped[m.gguf_name][0].name!r} and {hf_name!r} both map to {m.gguf_name}")
        shape = expected[m.gguf_name][1] if m.gguf_name in expected and m.gguf_name not in generated else None
        if shape is None and m.gguf_name == "output.weight":
            shape = (cfg.vocab_size, cfg.hidden)  # saved although tied: keep it, as the reference does
        if shape is None:
            raise InputError(f"tensor {hf_name!r} ({m.gguf_name}) is not used by {arch.hf_class}")
        if ref.shape != shape:
            raise InputError(
                f"tensor {ref.name!r} has shape {list(ref.shape)} but config.json implies {list(shape)}; "
                "the weights do not match the config"
            )
        mapped[m.gguf_name] = (ref, m.gguf_name, m.kind)
    missing = [name for name in expected if name not in mapped and name not in generated]
    if missing:
        raise InputError(
            f"the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[0]}; "
            "a shard is missing or the checkpoint is incomplete"
        )
    extra = [(GeneratedTensor(name, np.ascontiguousarray(values, dtype=np.float32)), name, kind)
             for name, (kind, values) in generated.items()]
    # The converter's order (an f16 file is its output): generated tensors first, then the source
    # in reading order (conversion/base.py:1057, chain(generate_extra_tensors(), get_tensors())).
    return [*extra, *mapped.values()]


def _load_vocab(source: Path, arch: Architecture, cfg: ModelConfig) -> Vocab:
    # LlamaModel.set_vocab / Qwen2Model.set_vocab: SentencePiece when there is a
    # tokenizer.model, else tokenizer.json's byte-level BPE.
    if arch.tokenizer == "bpe" or (arch.tokenizer == "sentencepiece-or-bpe" and not (source / "tokenizer.model").is_file()):
        vocab = load_bpe_vocab(source, cfg.vocab_size)
    else:
        vocab = load_vocab(source, cfg.vocab_size)
    vocab.add_space_prefix = arch.add_space_prefix(source)
    return vocab


def plan_conversion(
    source: Path, quant: str, imatrix: Path | None = None, *, adapters: Sequence[Adapter] = (),
    weights: dict[str, TensorRef] | None = None, name: str | None = None, expect_imatrix: bool = False,
) -> ConversionPlan:
    """Check the whole input and decide every output tensor, without touching the data.

    `imatrix`: an importance-matrix file (GGUF or legacy .dat), used as
    `llama-quantize --imatrix` uses it: it changes a few type choices and weights
    the quantizers' error search. `adapters` (PEFT LoRA adapters,
    `source.adapter.read_adapter`) are merged into the weights in order as they
    stream; see `lora_merge`. `weights` and `name` come from a Hub source
    (`source.hub.HubSource`): its tensors (streamed or cached) and the repository's
    name; `source` then holds the small files. `quant` is any level name (`quant_levels`,
    any case, aliases); a level llama-quantize refuses without an importance matrix is
    refused here too, before any tensor data is read, unless `expect_imatrix` (--calibrate
    computes one later: the types are then chosen as with one).
    """
    level = quant_levels.usable(quant)
    quant = level.name
    if imatrix is not None and level.converter_outtype:
        raise UsageError(f"--imatrix only applies to quantized levels, not {quant}")
    if not source.exists():
        raise InputError(f"{source} does not exist; give the path of a Hugging Face model folder")
    if not source.is_dir():
        raise InputError(f"{source} is not a folder; give the Hugging Face model folder that holds config.json")
    imat = read_imatrix(imatrix) if imatrix is not None else None
    cfg = load_config(source, SUPPORTED, CONFIG_DEFAULTS, REFUSED)
    arch = ARCHITECTURES[cfg.hf_arch]
    arch.check(cfg)
    if source_is_quantized(cfg):
        method = cfg.raw["quantization_config"].get("quant_method")
        named = method if isinstance(method, str) and method.replace("-", "_").isidentifier() and len(method) < 40 else "?"
        raise UnsupportedError(
            f"{source} holds a quantized model (quant_method {named}); give the unquantized (16-bit) base model"
        )
    refs, merge = (read_weights(source) if weights is None else weights), None
    n_other = sum(map(arch.other_part, refs))
    notes = (
        f"skipped {n_other} vision tower/projector tensors: the GGUF holds the text model only",
    ) if n_other else ()
    if adapters:
        merge = plan_merge(refs, adapters, cfg.hf_arch, cfg.vocab_size)
        refs, cfg = merge.refs, replace(cfg, vocab_size=merge.vocab_size)
    tensors = _map_tensors(cfg, arch, stack_experts(refs, arch.experts, cfg.n_expert) if arch.experts else refs)
    vocab = _load_vocab(merge.vocab_folder if merge and merge.vocab_folder else source, arch, cfg)
    if merge and merge.chat_template:
        vocab.chat_template = merge.chat_template  # the adapter's template wins over the base's
    if vocab.chat_template is None:
        vocab.chat_template = ALPACA_CHAT_TEMPLATE
    lora_of = {merge.refs[name]: pairs for name, pairs in merge.ops.items()} if merge else {}
    facts = quant_rules.ModelFacts(arch=arch.arch_name, n_layer=cfg.n_layer, n_head=cfg.n_head, n_head_kv=cfg.n_kv_head,
                                   n_expert=cfg.n_expert)
    specs = [quant_rules.TensorSpec(name=f"{name}", shape=ref.shape) for ref, name, _ in tensors]
    types, needs = _choose_types(level, specs, facts, imat is not None or expect_imatrix)
    if level.trained_for:
        notes += (f"{quant} keeps little more than the sign of each weight and a scale: it suits models trained "
                  f"{level.trained_for}; other models lose most of their quality",)
    importance: dict[str, np.ndarray] = {}
    imatrix_kv: tuple[tuple[str, str | int], ...] = ()
    if imat is not None:
        # One value per input column, and per expert for a 3-D weight (ne[0] x ne[2]: llama-quant.cpp:1281).
        check_against_model(imat, imatrix, {name: ref.shape[-1] * (ref.shape[0] if len(ref.shape) == 3 else 1)
                                            for ref, name, _ in tensors if len(ref.shape) in (2, 3)})
        importance = imat.importance()
        imatrix_kv = quantize_kv(imatrix, imat)
        missing = [name for name in needs if name not in importance]
        if missing:  # llama-quant.cpp:1393: "Missing importance matrix for tensor ... bailing out"
            raise InputError(f"{imatrix} has no importance data for {missing[0]}, which {quant} needs "
                             f"({len(missing)} such tensor(s)); compute the imatrix on this model")
    jobs = [
        TensorJob(
            ref, name, kind, ggml_type,
            rope_head_dim=cfg.head_dim if kind in arch.rope_permuted else None,
            offset=arch.norm_offset if ref.name.endswith("norm.weight") else 0.0,
            imatrix=importance.get(name) if ggml_type not in _FLOAT_TYPES else None,
            lora=lora_of.get(ref, ()) if isinstance(ref, TensorRef) else (),
        )
        for (ref, name, kind), ggml_type in zip(tensors, types)
    ]
    jobs = [_with_parts(job, lora_of) if isinstance(job.source, StackedTensor) else job for job in jobs]
    if merge:
        used = {part.source for job in jobs for part in (job.parts or (job,))}
        _check_all_used(merge, {ref for ref in used if isinstance(ref, TensorRef)}, arch)
    if not level.converter_outtype:  # the converter's own output keeps its order; quantize rewrites it in its own
        jobs.sort(key=lambda job: llama_cpp_order(job.name))
    base_name = name or source.resolve().name
    return ConversionPlan(source, merged_name(adapters) if adapters else base_name, quant, cfg, arch, vocab,
                          tuple(jobs), notes, imatrix_kv, merge, base_name)


def _with_parts(job: TensorJob, lora_of: dict[TensorRef, tuple[MergeOp, ...]]) -> TensorJob:
    """A stacked-experts job with one part per expert: expert e's rows follow expert e-1's in the
    tensor's data, with its slice of the importance matrix (llama-quantize reads n_expert x ne0
    values for a 3-D weight and gives expert e the e-th run: llama-quant.cpp:779-785)."""
    assert isinstance(job.source, StackedTensor)
    ne0 = job.shape[-1]
    parts = tuple(
        replace(job, source=ref, lora=lora_of.get(ref, ()),
                imatrix=None if job.imatrix is None else job.imatrix[e * ne0:(e + 1) * ne0])
        for e, ref in enumerate(job.source.parts)
    )
    return replace(job, parts=parts, imatrix=None)


class ImatrixRequired(UsageError):
    """The level needs an importance matrix for this model, as llama-quantize does."""


def _choose_types(
    level: quant_levels.Level, specs: list[quant_rules.TensorSpec], facts: quant_rules.ModelFacts, imatrix: bool,
) -> tuple[list[gguf.GGMLQuantizationType], list[str]]:
    """The type of each tensor at `level`, and the tensors among them that need importance
    data; without `imatrix` such a level is refused as llama-quantize refuses it
    (llama-quant.cpp:1131-1145), in one line that says what to add."""
    if level.experts_only and not facts.n_expert:
        raise UsageError(f"{level.name} only changes mixture-of-experts tensors and this model has none (the file "
                         "would be q8_0 under another name); use --quant q8_0")
    types = quant_rules.choose_types(specs, level.name, facts, has_imatrix=imatrix)
    needs = quant_rules.imatrix_required(specs, types, level.name)
    if needs and not imatrix:
        first = next(ty for spec, ty in zip(specs, types) if spec.name == needs[0])
        raise ImatrixRequired(f"{level.name} needs an importance matrix, as llama-quantize does ({needs[0]} would be "
                         f"{first.name}); add --imatrix FILE or --calibrate")
    return types, needs


def levels_needing_imatrix(plan: ConversionPlan, quants: Sequence[str]) -> set[str]:
    """Which of `quants` llama-quantize refuses without an importance matrix for `plan`'s model
    (any level's plan will do: only names and shapes count), without reading anything again."""
    facts, specs = rule_inputs(plan)
    return {q for q in quants if quant_rules.imatrix_required(specs, quant_rules.choose_types(specs, q, facts), q)}


def rule_inputs(plan: ConversionPlan) -> tuple[quant_rules.ModelFacts, list[quant_rules.TensorSpec]]:
    """What llama-quantize's rules read of `plan`'s model: its facts and every tensor's name and shape."""
    facts = quant_rules.ModelFacts(arch=plan.arch.arch_name, n_layer=plan.config.n_layer, n_head=plan.config.n_head,
                                   n_head_kv=plan.config.n_kv_head, n_expert=plan.config.n_expert)
    return facts, [quant_rules.TensorSpec(job.name, job.shape) for job in plan.jobs]


def _check_all_used(merge: MergePlan, used: set[TensorRef], arch: Architecture) -> None:
    """An adapter tensor the GGUF would not contain (e.g. Gemma 2's saved but unused lm_head)
    is refused: dropping it would silently lose part of the fine-tune."""
    for name in sorted(merge.touched):
        if merge.refs[name] not in used:
            raise InputError(
                f"the adapter changes {name!r}, which llama.cpp's {arch.arch_name} does not use "
                "(tied to the embedding or dropped by the converter); its training would be lost"
            )


def source_is_quantized(cfg: ModelConfig) -> bool:
    """config.json declares a quantization (bitsandbytes, GPTQ, AWQ...): the weights are not floats we read."""
    return isinstance(cfg.raw.get("quantization_config"), dict)


def default_output(plan: ConversionPlan, models_dir: Path) -> Path:
    """models/<name>.<QUANT>.gguf, e.g. models/alpaca-7b.Q4_K_M.gguf."""
    return models_dir / f"{plan.name}.{plan.tag or quant_rules.QUANT_FILE_SUFFIX[plan.quant]}.gguf"


def retyped(plan: ConversionPlan, types: dict[str, gguf.GGMLQuantizationType], quant: str,
            recipe_kv: tuple[tuple[str, int | str | tuple[int, ...]], ...] = (), tag: str = "") -> ConversionPlan:
    """`plan` with the named tensors' types replaced (every other tensor keeps its own), written as
    level `quant` (general.file_type, quantization version, shapes), with `recipe_kv` in its header.

    The one truth for a chosen mix: the writer, `header_nbytes` and `tensor_bytes` all read these
    jobs. Tensors keep llama-quantize's order, and their importance vectors: `plan` must be a
    quantized level's plan, so that every tensor that may be quantized has one (when there is an
    imatrix at all)."""
    if quant_levels.LEVELS[plan.quant].converter_outtype or quant_levels.LEVELS[quant].converter_outtype:
        raise ValueError("retyped works from and to quantized levels only")
    unknown = set(types) - {job.name for job in plan.jobs}
    if unknown:
        raise ValueError(f"no tensor named {sorted(unknown)[0]!r} in the plan")

    def one(job: TensorJob) -> TensorJob:
        ty = types.get(job.name, job.ggml_type)
        if ty == job.ggml_type:
            return job
        quant_rules.row_nbytes(ty, job.shape[-1])  # ValueError for a row length the type cannot hold
        return replace(job, ggml_type=ty, parts=tuple(replace(p, ggml_type=ty) for p in job.parts))

    return replace(plan, quant=quant, jobs=tuple(one(job) for job in plan.jobs), recipe_kv=recipe_kv, tag=tag)


def _header_writer(plan: ConversionPlan, path: Path) -> gguf.GGUFWriter:
    cfg = plan.config
    w = gguf.GGUFWriter(path, plan.arch.arch_name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(plan.name)
    w.add_size_label(size_label(plan.jobs))
    plan.arch.metadata(w, cfg)
    w.add_file_type(quant_rules.file_type(plan.quant))
    if not quant_levels.LEVELS[plan.quant].converter_outtype:  # see KNOWN_DIFFERENCES in test_architectures
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in plan.imatrix_kv:  # INT overrides are written as u32 (llama-quant.cpp:1039)
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, value)
    for key, value in plan.recipe_kv:
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, tuple):
            w.add_array(key, list(value))
        else:
            w.add_uint64(key, value)
    plan.vocab.add_to(w)
    if plan.merge:
        _provenance(w, plan)
    for job in plan.jobs:
        # A float dtype makes gguf-py take `shape` as the element shape (uint8 would mean bytes).
        w.add_tensor_info(job.name, _file_shape(job.shape, plan.quant), np.dtype(np.float32), job.nbytes,
                          raw_dtype=job.ggml_type)
    return w


def _file_shape(shape: tuple[int, ...], quant: str) -> tuple[int, ...]:
    """The shape as the file stores it. llama-quantize re-adds every tensor with gguf_add_tensor,
    which writes ggml_n_dims dimensions (ggml/src/gguf.cpp:1546, from llama-quant.cpp:1119), so
    trailing ggml 1s (leading numpy ones: Qwen2-MoE's [1, n_embd] shared-expert gate) are dropped;
    the converter's f16 file keeps the numpy shape."""
    if quant == "f16":
        return shape
    keep = next((i for i, n in enumerate(shape) if n != 1), len(shape) - 1)
    return shape[keep:]


def size_label(jobs: Sequence[TensorJob]) -> str:
    """The "7B" / "8x7B"-style label LM Studio and Ollama show: gguf-py's size_label over the sums of
    GGUFWriter.get_total_parameter_count (gguf_writer.py:113-160), as the reference converter
    computes it (conversion/base.py:1191-1211): experts count once per expert, times the count."""
    total = shared = expert = expert_sum = n_expert_tensors = 0
    for job in jobs:
        size = job.source.n_elements
        if "_exps." in job.name and len(job.shape) >= 3:
            count = job.shape[-2 if ".bias" in job.name else -3]
            expert, expert_sum, n_expert_tensors = expert + size // count, expert_sum + count, n_expert_tensors + 1
        else:
            shared += size
        total += size
    return gguf.size_label(total, shared, expert, expert_sum // n_expert_tensors if n_expert_tensors else 0)


def _provenance(w: gguf.GGUFWriter, plan: ConversionPlan) -> None:
    """Where a merged model came from: the base (general.base_model.*) and the adapters merged."""
    assert plan.merge is not None
    w.add_base_model_count(1)
    w.add_base_model_name(0, plan.base_name or plan.source.resolve().name)
    w.add_array("alpaca_local.lora.merged", [a.name for a in plan.merge.adapters])
    w.add_array("alpaca_local.lora.scale", [float(a.user_scale) for a in plan.merge.adapters])
    w.add_array("alpaca_local.lora.base_model_name_or_path", [a.base_name or "" for a in plan.merge.adapters])


def header_nbytes(plan: ConversionPlan) -> int:
    """Bytes before the tensor data (header, metadata, tensor table, padding) of the file
    `convert` writes for `plan`: gguf-py writes it to a scratch file, so the count is exact."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "header.gguf"
        _write_header(plan, path)
        return padded(path.stat().st_size)


def _write_header(plan: ConversionPlan, path: Path) -> None:
    """The GGUF header, metadata and tensor table of `plan`'s file, written to `path`."""
    writer = _header_writer(plan, path)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()


def rope_permute(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp interleaved rows, per head (LlamaModel.permute)."""
    n, cols = rows.shape
    return rows.reshape(n // head_dim, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(n, cols)


def _add_offset(rows: np.ndarray, offset: float, src_dtype: str) -> np.ndarray:
    """rows + offset as the reference computes it: in float16 for an F16 source
    (torch adds in the tensor's dtype), in float32 otherwise (BF16 is widened first)."""
    if src_dtype == "F16":
        return (rows.astype(np.float16) + np.float16(offset)).astype(np.float32)
    return rows + np.float32(offset)


_FLOAT_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)


def _chunks(job: TensorJob) -> Iterator[tuple[int, int]]:
    n_rows, row_len = job.source.n_rows, (job.shape[-1] if job.shape else 1)
    step = max(1, CHUNK_ELEMENTS // max(row_len, 1))
    if job.rope_head_dim:
        step = max(job.rope_head_dim, step // job.rope_head_dim * job.rope_head_dim)
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def _read(job: TensorJob, start: int, stop: int, anywhere: bool = False) -> np.ndarray:
    """Rows [start, stop) as stored; called in file order, by one thread (a streamed
    source is one forward-only HTTP stream per file), or `anywhere` (range requests of their own)."""
    src = job.source
    if isinstance(src, GeneratedTensor):
        return src.read_rows(start, stop)
    return src.read_raw_rows(start, stop, anywhere=anywhere)


def _encode(job: TensorJob, start: int, stop: int, raw: np.ndarray) -> bytes:
    src = job.source
    plain = job.rope_head_dim is None and not job.offset and not job.lora
    if plain and (src.dtype, job.ggml_type.name) in (("F16", "F16"), ("F32", "F32")):
        return raw.tobytes()  # identical bytes: copy, do not round-trip through float32
    if plain and (src.dtype, job.ggml_type.name) == ("BF16", "BF16"):
        return _quiet_bf16_nans(raw).tobytes()  # the converter's f32 round trip, minus the work
    return quantize_rows(_float_rows(job, start, stop, raw), job.ggml_type, job.imatrix).tobytes()


def quantizer_input(job: TensorJob, start: int, stop: int, permute: bool = True) -> np.ndarray:
    """Rows [start, stop) of `job` as float32, exactly as the quantizer gets them when the file
    is written (LoRAs merged, offset added, rope rows permuted); `permute=False` leaves the rope
    permutation out, which moves whole rows only (for samples of rows that are not head groups).
    Reads the source again, from any thread and in any order (a streamed source by range
    requests of its own): `convert/search.py` measures candidate types on sampled rows."""
    raw = _read(job, start, stop, anywhere=True)
    return _float_rows(job if permute else replace(job, rope_head_dim=None), start, stop, raw)


def _float_rows(job: TensorJob, start: int, stop: int, raw: np.ndarray) -> np.ndarray:
    src = job.source
    rows = widen(raw, src.dtype)
    if job.lora:
        rows = merge_rows(rows, job.lora, start, stop)
        if job.ggml_type not in _FLOAT_TYPES:
            # The quantized levels follow from the merged F16 file, as llama-quantize
            # makes them from the reference route's merged F16 GGUF.
            rows = round_to_f16(rows)
    if job.offset:
        rows = _add_offset(rows, job.offset, src.dtype)
    if job.rope_head_dim:
        rows = rope_permute(rows, job.rope_head_dim)
    return rows


def _quiet_bf16_nans(bits: np.ndarray) -> np.ndarray:
    """BF16 bits as the converter writes them back after widening to float32: a NaN gets
    its quiet bit (gguf-py's BF16.quantize_blocks, ggml_compute_fp32_to_bf16)."""
    nan = (bits & 0x7FFF) > 0x7F80
    return bits | (nan.astype(np.uint16) << 6) if nan.any() else bits


def _read_order(plan: ConversionPlan, data_start: int) -> list[tuple[TensorJob, int]]:
    """(job, where its data goes in the output), in the order the sources are read.

    The output keeps plan order (llama.cpp's); sources are read file by file, front
    to back, so a streamed file is fetched once, in order, and hashed as it comes.
    """
    placed, offset = [], data_start
    for job in plan.jobs:
        at = offset
        for part in job.parts or (job,):  # stacked experts: each expert's data after the last one's
            placed.append((part, at))
            at += part.nbytes
        offset += padded(job.nbytes)

    def key(item: tuple[TensorJob, int]) -> tuple[str, int]:
        src = item[0].source
        return ("", item[1]) if isinstance(src, GeneratedTensor) else (str(src.path), src.offset)

    return sorted(placed, key=key)


Chunk = tuple[TensorJob, int, int, int, np.ndarray]  # job, output offset, rows [start, stop), raw rows


def _read_ahead(plan: ConversionPlan, data_start: int, depth: int) -> Iterator[Chunk]:
    """Every chunk in read order, read by one thread up to `depth` chunks ahead of the caller.

    One reader keeps a streamed file's reads in order; running ahead lets the next
    reads (disk or network) overlap the wait for the quantizers.
    """
    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stopped = threading.Event()
    done = object()

    def put(item: object) -> bool:
        while not stopped.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for job, offset in _read_order(plan, data_start):
                for start, stop in _chunks(job):
                    if not put((job, offset, start, stop, _read(job, start, stop))):
                        return
            put(done)
        except BaseException as exc:  # handed to the caller, which raises it
            put(exc)

    reader = threading.Thread(target=produce, name="convert-reader", daemon=True)
    reader.start()
    try:
        while (item := ahead.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stopped.set()


def _write_tensor_data(plan: ConversionPlan, path: Path, progress: Progress | None, workers: int) -> None:
    """Write every tensor at its place in plan order, each padded to the GGUF alignment."""
    with open(path, "r+b") as f:
        data_start = padded(f.seek(0, os.SEEK_END))
        f.truncate(data_start + plan.tensor_bytes)  # padding and alignment gaps read as zeros
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: deque[tuple[TensorJob, int, int, int, Future[bytes]]] = deque()
            window = 2 * workers

            def drain_one() -> None:
                job, offset, start, stop, fut = pending.popleft()
                if start == 0:  # a tensor's chunks arrive in order, so only its first one seeks
                    f.seek(offset)
                f.write(fut.result())
                if progress:
                    per_row = job.source.nbytes // max(job.source.n_rows, 1)
                    progress(job.name, (stop - start) * per_row)

            try:
                for job, offset, start, stop, raw in _read_ahead(plan, data_start, window):
                    pending.append((job, offset, start, stop, pool.submit(_encode, job, start, stop, raw)))
                    while len(pending) >= window:
                        drain_one()
                while pending:
                    drain_one()
            finally:
                for *_, fut in pending:
                    fut.cancel()


def convert(
    source: Path,
    output: Path | None = None,
    quant: str = "q4_k_m",
    force: bool = False,
    models_dir: Path = Path("models"),
    progress: Progress | None = None,
    workers: int | None = None,
    plan: ConversionPlan | None = None,
    check_source: Callable[[], None] | None = None,
    imatrix: Path | None = None,
    adapters: Sequence[Adapter] = (),
) -> ConvertResult:
    """Convert `source` (merging `adapters`, if any) into one GGUF file; the output appears only when complete.

    `check_source` runs after the last byte is written and before the output takes
    its name (a streamed source's hash check): if it raises, nothing is left.
    """
    t0 = time.perf_counter()
    plan = plan or plan_conversion(source, quant, imatrix, adapters=adapters)
    if output is None:
        output = default_output(plan, models_dir)
        output.parent.mkdir(parents=True, exist_ok=True)
    check_target(output, force, need_bytes=plan.tensor_bytes)
    with atomic_write(output) as tmp:
        _write_header(plan, tmp)
        with one_blas_thread() if plan.merge else contextlib.nullcontext():
            _write_tensor_data(plan, tmp, progress, workers or os.cpu_count() or 1)
        if check_source:
            check_source()
        size = tmp.stat().st_size
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return ConvertResult(output, plan.quant, len(plan.jobs), size, time.perf_counter() - t0, peak)

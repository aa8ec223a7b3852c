"""Merge LoRA adapters into a base model's weights while they stream, as PEFT does.

In: the base's tensors (`TensorRef`s by Hugging Face name) and `Adapter`s in
the order given. Out: a `MergePlan` (the tensors after the adapters' whole
replacements, the LoRAs to add to each tensor in order, the vocabulary size
and tokenizer folder that win) and `merge_rows`, which applies those LoRAs to
one chunk of rows, so the pipeline never holds more than a chunk of a weight.

The arithmetic is PEFT's `merge_and_unload` (peft/tuners/lora/layer.py
Linear.get_delta_weight / Embedding.get_delta_weight, variants.py
DoraLinearVariant.merge_unsafe), in float32:
    delta = (B @ A) * scale                  (embedding: (B @ A).T * scale)
    W'    = W + delta                        (plain LoRA)
    W'    = m / ||W + delta||_row * (W + delta)   (DoRA: each output row rescaled)
    W'[indices] = trainable_tokens_delta      (trainable_token_indices: rows replaced,
                                               TrainableTokensLayer.merge's index_copy)
Each output row depends only on the same row of W, of B (linear) or of Aᵀ
(embedding), so a chunk of rows is merged from that chunk alone.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alpaca_local.errors import InputError
from alpaca_local.source.adapter import Adapter, LoraPair, TokenRows, chat_template_of, check_against_base
from alpaca_local.source.tensors import TensorRef

# Tensors whose rows are the vocabulary: a resize must change all of them alike.
_VOCAB_ROW_TENSORS = ("embed_tokens.weight", "lm_head.weight")

MergeOp = LoraPair | TokenRows  # what one adapter does to one tensor


@dataclass(frozen=True)
class MergePlan:
    refs: dict[str, TensorRef]  # the base's tensors, adapter replacements swapped in
    ops: dict[str, tuple[MergeOp, ...]]  # HF tensor name -> LoRAs to add / rows to replace, in order
    vocab_size: int  # embedding rows after the adapters (a resize changes it)
    vocab_folder: Path | None  # the last adapter folder with tokenizer files, which win over the base's
    chat_template: str | None  # the last adapter's template, if it declares one
    adapters: tuple[Adapter, ...] = field(default=())
    touched: frozenset[str] = frozenset()  # every HF tensor name an adapter replaces or adds a LoRA to


@functools.lru_cache(maxsize=64)
def _f32(ref: TensorRef) -> np.ndarray:
    """A small adapter tensor (A, an embedding's B, a magnitude) as float32, kept for the
    next chunks of the same weight; 64 of them stay well under the adapter's own size."""
    return ref.to_f32()


def plan_merge(base: dict[str, TensorRef], adapters: Sequence[Adapter], hf_arch: str, vocab_size: int) -> MergePlan:
    """Check every adapter against the base (and the adapters before it) and decide the merge."""
    _f32.cache_clear()  # files may have changed since an earlier conversion in this process
    refs = dict(base)
    ops: dict[str, list[MergeOp]] = {}
    for adapter in adapters:
        check_against_base(adapter, refs, hf_arch)
        for target, ref in adapter.replacements.items():
            refs[target] = ref
            ops[target] = []  # a saved copy of the trained module: earlier LoRAs on it are part of it
        for target, pair in adapter.pairs.items():
            ops.setdefault(target, []).append(pair)
        for target, rows in adapter.token_rows.items():  # never on a target with a LoRA (read_adapter)
            ops.setdefault(target, []).append(rows)
    rows = {name: ref.shape[0] for name, ref in refs.items() if name.endswith(_VOCAB_ROW_TENSORS)}
    if len(set(rows.values())) > 1:
        detail = ", ".join(f"{n} has {r}" for n, r in sorted(rows.items()))
        raise InputError(
            f"the adapters resize the vocabulary of only some tensors ({detail} rows); "
            "save the adapter with save_embedding_layers=True so embed_tokens and lm_head both come with it"
        )
    new_vocab = next(iter(rows.values()), vocab_size)
    vocab_folder = next((a.folder for a in reversed(adapters) if a.has_tokenizer), None)
    if new_vocab != vocab_size and vocab_folder is None:
        raise InputError(
            f"the adapter resizes the vocabulary from {vocab_size} to {new_vocab} tokens but its folder has no "
            "tokenizer files; copy the fine-tune's tokenizer (tokenizer.model or tokenizer.json) into it"
        )
    template = next((t for a in reversed(adapters) if (t := chat_template_of(a.folder))), None)
    return MergePlan(
        refs, {k: tuple(v) for k, v in ops.items() if v}, new_vocab, vocab_folder, template, tuple(adapters),
        frozenset(ops),
    )


def delta_rows(pair: LoraPair, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of scale · B·A (embedding: of scale · (B·A)ᵀ), float32."""
    scale = np.float32(pair.scale)  # torch multiplies a float32 tensor by a Python float in float32
    if pair.embedding:
        a_cols = _f32(pair.a)[:, start:stop]  # (r, n): the rows of (B·A)ᵀ are A's columns
        product = a_cols.T @ _f32(pair.b).T
    else:
        product = pair.b.read_rows(start, stop) @ _f32(pair.a)
    return np.multiply(product, scale, out=product)


def replace_token_rows(out: np.ndarray, rows: TokenRows, start: int) -> np.ndarray:
    """TrainableTokensLayer.merge on rows [start, start + len(out)): the retrained ids' rows
    become the adapter's (cast to the weight's float32, as `deltas.to(merged)`)."""
    ids = np.asarray(rows.indices, dtype=np.int64)
    hit = np.flatnonzero((ids >= start) & (ids < start + out.shape[0]))
    if hit.size:
        if not out.flags.writeable:
            out = out.copy()
        out[ids[hit] - start] = _f32(rows.values)[hit]
    return out


_NORM_LANES = 8  # ATen's Vectorized<float> accumulator lanes in its CPU norm kernel (measured: torch 2.13)


def row_norms(x: np.ndarray) -> np.ndarray:
    """torch.linalg.norm(x, dim=1) of float32 rows on the CPU, bit for bit, which DoRA's merge
    divides by (ATen ReduceOpsKernel.cpp, the p=2 last-dimension path: x*x summed into 8 lanes
    block by block, the lanes added in order, the tail one by one, then sqrt). Any other order
    (einsum, float64) is one ulp off in about a quarter of the rows, and some of those land on
    the other side of an f16 rounding. Exact for rows whose width is a multiple of 8, as every
    layer of the supported models is; elsewhere within an ulp of torch's."""
    n_rows, width = x.shape
    whole = width - width % _NORM_LANES
    squares = x * x  # rounded, then added: ATen multiplies and adds, no fused multiply-add
    lanes = np.zeros((n_rows, _NORM_LANES), np.float32)
    for col in range(0, whole, _NORM_LANES):  # a loop, so the order is ours, not numpy's pairwise sum
        lanes += squares[:, col:col + _NORM_LANES]
    total = lanes[:, 0].copy()
    for lane in range(1, _NORM_LANES):
        total += lanes[:, lane]
    for col in range(whole, width):
        total += squares[:, col]
    return np.sqrt(total)


def merge_rows(rows: np.ndarray, pairs: Sequence[MergeOp], start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a weight after every LoRA (or token-row replacement) in `pairs`, in order."""
    out = np.asarray(rows, dtype=np.float32)
    for pair in pairs:
        if isinstance(pair, TokenRows):
            out = replace_token_rows(out, pair, start)
            continue
        delta = delta_rows(pair, start, stop)
        out = np.add(out, delta, out=delta)  # the delta's buffer is ours to reuse
        if pair.magnitude is not None:
            # DoraLinearVariant.merge_unsafe: m / ||W + ΔW|| per output row, times W + ΔW.
            norm = row_norms(out)
            magnitude = _f32(pair.magnitude)[start:stop]
            out = (magnitude / norm)[:, None] * out
    return out


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the merge's small matmuls (B @ A per chunk) on the calling thread only.

    OpenBLAS starts its own thread pool for them, and its threads spin-wait between
    calls on the very cores the quantizer's worker threads need: on 2 cores that made
    a 1B `convert --lora` 2.5x slower than a plain convert (benchmarks/lora.py).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def merged_name(adapters: Sequence[Adapter]) -> str:
    """What a merged model is called: the (last) fine-tune's folder name."""
    return adapters[-1].name

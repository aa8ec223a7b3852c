"""The best mix of per-tensor types under a byte budget (`convert --target-size/--target-bpw/--fit`).

In:  a quantized level's `ConversionPlan` (the base: which tensors may be quantized, their
     importance vectors), a budget in bytes for the whole file.
Out: a `SearchResult` whose `plan` is the base plan with one standard GGML type per tensor
     (`pipeline.retyped`), the exact size of that file, and its predicted loss.

Three steps:

1. Candidates (`candidate_types`): the tensors llama-quantize never quantizes (1-D, norms,
   `llama_quant.allows_quantization`) and the ones whose rows no block fits keep the base
   plan's type; every other tensor may take each of `CANDIDATES` whose block divides its row
   length (the rule llama.cpp's tensor_type_fallback enforces, llama-quant.cpp:390).
   No candidate needs an importance matrix (llama-quant.cpp:858), so a file made without one
   is still one llama-quantize could write.
2. Measuring (`measure`): up to `SAMPLE_ROWS` rows per tensor, in SAMPLE_GROUPS runs of adjacent
   rows evenly spread (the same rows every time, from a folder or the Hub), read from the source
   again (`pipeline.quantizer_input`: LoRAs merged, offsets added, exactly what the writer
   quantizes; a streamed Hub file by one range request per run, before its stream starts,
   so the sampled bytes come over the network twice). Of each row, one run of `segment_length` columns
   (at most SEGMENT, whole blocks of every candidate), taken in turn along the row, so that the
   sample spans many rows and every column at a fraction of the cost of whole rows (`samples`);
   where the sample would take every run of each row, whole rows are measured instead. The
   pieces are quantized with ggml's quantizers, given their columns' importance weights as
   llama-quantize gives them, and dequantized with gguf-py. Every quantizer but the legacy
   Q4_0/Q4_1/Q5_0/Q5_1 quantizes each block on its own, so a piece is quantized exactly as in
   the whole row; those four weight their search by the row's mean square as well, and on
   pieces of Gemma 3 270M's rows their error moved by at most 0.3%, against the sampling's
   own few percent (tests/test_search.py checks both). The error
   is sum_rows sum_j imatrix_j (w_ij - deq_ij)^2 (plain squared error without an imatrix),
   scaled to the whole tensor. Loss of a type = error / the tensor's energy (the same sum over
   w_ij^2): a noise-to-signal ratio, so that tensors of every size and scale are comparable,
   and the embedding (which has no imatrix entry: llama.cpp reads it with get_rows) counts on
   the same footing as the matrices the imatrix weights. Every tensor counts once, a tied
   embedding twice (TIED_EMBEDDING_WEIGHT).
3. Allocation (`allocate`): minimise the sum of losses with exact bytes (each tensor padded
   as the writer pads it, the header as `pipeline.header_nbytes` writes it) within the budget:
   Lagrangian bisection over lambda (each tensor takes argmin loss + lambda * bytes, which
   lands on its convex hull), then a greedy fill of the bytes left with the upgrades that buy
   the most loss per byte.

Why no measured per-layer sensitivity (KLD probes): they need the model run on calibration
text once per probed tensor; the noise-to-signal loss is what we could check against KLD on
the real Gemma 3 270M today (benchmarks/search.py, RESULTS.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import gguf
import gguf.quants
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from alpaca_local.convert import llama_quant, quant_rules
from alpaca_local.convert.ggml import quantize_rows
from alpaca_local.convert.pipeline import (
    ConversionPlan, TensorJob, header_nbytes, padded, quantizer_input, retyped, rule_inputs,
)
from alpaca_local.errors import UsageError

T = GGMLQuantizationType

# Best first. Standard types every llama.cpp runtime loads; the K and i-quants need rows that are
# a multiple of 256, the others of 32 (F16: any).
CANDIDATES: tuple[GGMLQuantizationType, ...] = (
    T.F16, T.Q8_0, T.Q6_K, T.Q5_K, T.Q5_1, T.Q5_0, T.Q4_K, T.Q4_1, T.IQ4_XS, T.IQ4_NL, T.Q4_0, T.Q3_K,
    T.IQ3_S, T.Q2_K,
)
# The standard mixes a chosen mix may be labelled as (general.file_type): the nearest in size.
NEAREST_LEVELS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "q8_0")
BASE_LEVEL = "q8_0"  # the plan measured from: every tensor llama.cpp may quantize is quantized in it
# Per tensor: 512 rows x one run of <= 256 columns each. On Gemma 3 270M this chose mixes whose loss
# (measured on 1024 whole rows) was within 0.6% of those chosen from 256 whole rows, in 0.4x the time.
SAMPLE_ROWS = 512
SAMPLE_GROUPS = 8  # runs of adjacent rows (64 each): a streamed tensor takes 8 range requests
SEGMENT = 256
RECIPE_KEYS = ("alpaca_local.target.bytes", "alpaca_local.target.objective", "alpaca_local.target.predicted_loss",
               "alpaca_local.target.types")

# A tied embedding (no output.weight) is read twice by llama.cpp: as the input embedding (get_rows)
# and as the output projection (the last matmul), so its error counts twice.
TIED_EMBEDDING_WEIGHT = 2.0

MeasureProgress = Callable[[str, int, int], None]  # (tensor name, tensors done, tensors in all)


@dataclass(frozen=True)
class Option:
    ggml_type: GGMLQuantizationType
    nbytes: int  # padded to the alignment, as the writer lays it out
    error: float  # (imatrix-)weighted squared error over the whole tensor (sampled, scaled)


@dataclass(frozen=True)
class TensorOptions:
    name: str
    options: tuple[Option, ...]  # one per candidate type, CANDIDATES order; one only: fixed
    energy: float  # the same weighted sum over the weights themselves
    weight: float = 1.0  # how many times the tensor's error counts (ROLE_WEIGHT)

    def loss(self, k: int) -> float:
        return self.weight * self.options[k].error / self.energy if self.energy > 0 else 0.0


@dataclass(frozen=True)
class SearchResult:
    plan: ConversionPlan  # the chosen mix, ready for `pipeline.convert`
    budget: int
    file_bytes: int  # exact: header + padded tensors
    predicted_loss: float  # sum over tensors of error / energy
    level_losses: dict[str, float]  # the same prediction for the standard levels near in size
    level_bytes: dict[str, int]  # their exact tensor bytes + the header of the chosen mix
    choice: tuple[tuple[str, GGMLQuantizationType, int, float], ...]  # name, type, bytes, loss
    weighted: bool  # measured with an importance matrix


def candidate_types(job: TensorJob, arch: str) -> tuple[GGMLQuantizationType, ...]:
    """The types this tensor may take: the base plan's alone where llama.cpp keeps it fixed
    (not quantizable, or a row length only a float type fits), else every candidate whose block
    divides the row length."""
    spec = quant_rules.TensorSpec(job.name, job.shape)
    if job.ggml_type in llama_quant.FLOAT_TYPES or not llama_quant.allows_quantization(spec, arch):
        return (job.ggml_type,)
    ne0 = job.shape[-1]
    return tuple(t for t in CANDIDATES if ne0 % GGML_QUANT_SIZES[t][0] == 0)


def sample_rows(n_rows: int, k: int) -> np.ndarray:
    """Up to `k` row indices in SAMPLE_GROUPS runs of adjacent rows, the runs evenly spread over
    [0, n_rows), the first at row 0 and the last ending at the last row. Runs, not single rows:
    a streamed source reads each run with one range request."""
    if n_rows <= k:
        return np.arange(n_rows)
    groups = min(SAMPLE_GROUPS, k)
    size = k // groups
    starts = np.linspace(0, n_rows - size, groups).round().astype(np.int64)
    return np.unique((starts[:, None] + np.arange(size)[None, :]).ravel())


def runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """Sorted row indices as [start, stop) runs of adjacent rows."""
    cuts = np.flatnonzero(np.diff(idx) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(idx, cuts) if len(r)]


def weighted_error(rows: np.ndarray, ggml_type: GGMLQuantizationType, imatrix: np.ndarray | None) -> float:
    """sum_rows sum_j imatrix_j (w_ij - deq(q(w))_ij)^2, quantized with ggml (given `imatrix` as
    quant weights, as llama-quantize passes it) and dequantized with gguf-py."""
    if ggml_type == T.F16:  # ggml's F16 is numpy's round to nearest even (ggml.round_to_f16), 10x faster here
        deq = rows.astype(np.float16).astype(np.float64)
    else:
        q = quantize_rows(rows, ggml_type, imatrix)
        deq = gguf.quants.dequantize(q, ggml_type).reshape(rows.shape).astype(np.float64)
    return weighted_sum((rows.astype(np.float64) - deq) ** 2, imatrix)


def weighted_sum(squares: np.ndarray, imatrix: np.ndarray | None) -> float:
    """sum_rows sum_j imatrix_j squares_ij (every column weighted 1 without an imatrix)."""
    return float(squares.sum() if imatrix is None else (squares @ imatrix.astype(np.float64)).sum())


def segment_length(ne0: int, types: Sequence[GGMLQuantizationType]) -> int:
    """The longest run of columns, at most SEGMENT, that divides the row and holds whole blocks of
    every type in `types` (their block sizes, 1, 32 and 256, divide one another)."""
    block = max(GGML_QUANT_SIZES[t][0] for t in types)
    return max((m for m in range(block, min(SEGMENT, ne0) + 1, block) if ne0 % m == 0), default=ne0)


def samples(n_rows: int, ne0: int, types: Sequence[GGMLQuantizationType], n_sample: int) -> tuple[np.ndarray, int, np.ndarray]:
    """(rows, run length, first column of each (row, run) pair): up to `n_sample` pairs, the rows
    evenly spread, each row's runs taken in turn along the row (k-th row: runs k*m .. k*m+m-1, m
    runs per row when the rows are fewer than the pairs). Pairs as (row index into `rows`, column)."""
    rows = sample_rows(n_rows, n_sample)
    seg = segment_length(ne0, types)
    n_seg = ne0 // seg
    m = min(n_seg, -(-n_sample // len(rows)))
    if m == n_seg:  # every run of every sampled row: whole rows (exact for every quantizer)
        return rows, ne0, np.stack([np.arange(len(rows)), np.zeros(len(rows), dtype=np.int64)], axis=1)
    k = np.repeat(np.arange(len(rows)), m)
    run_no = (k * m + np.tile(np.arange(m), len(rows))) % n_seg  # which run of columns each pair takes
    return rows, seg, np.stack([k, run_no * seg], axis=1)


def _measure_one(job: TensorJob, types: tuple[GGMLQuantizationType, ...], n_sample: int) -> TensorOptions:
    if len(types) == 1:
        return TensorOptions(job.name, (Option(types[0], padded(quant_rules.tensor_nbytes(job.shape, types[0])), 0.0),), 0.0)
    units = job.parts or (job,)  # stacked experts: each expert's rows with its own imatrix slice
    errors = np.zeros(len(types))
    energy = 0.0
    for unit in units:
        n_rows, ne0 = unit.source.n_rows, unit.shape[-1]
        idx, seg, pairs = samples(n_rows, ne0, types, max(1, n_sample // len(units)))
        rows = np.concatenate([quantizer_input(unit, a, b, permute=False) for a, b in runs(idx)])
        scale = n_rows * ne0 / (len(pairs) * seg)  # elements in the tensor / elements measured
        for col in np.unique(pairs[:, 1]):  # the pieces that share their columns, with those columns' weights
            piece = np.ascontiguousarray(rows[pairs[pairs[:, 1] == col, 0], col:col + seg])
            im = None if unit.imatrix is None else np.ascontiguousarray(unit.imatrix[col:col + seg])
            energy += scale * weighted_sum(piece.astype(np.float64) ** 2, im)
            for k, ty in enumerate(types):
                errors[k] += scale * weighted_error(piece, ty, im)
    return TensorOptions(job.name, tuple(
        Option(ty, padded(quant_rules.tensor_nbytes(job.shape, ty)), float(e)) for ty, e in zip(types, errors)
    ), energy)


def measure(plan: ConversionPlan, progress: MeasureProgress | None = None, n_sample: int = SAMPLE_ROWS,
            only: str | None = None, workers: int | None = None) -> list[TensorOptions]:
    """Every tensor's options, in plan order. `only`: each tensor may take its type at that
    level and nothing else (the search turned off: `allocate` then returns the level)."""
    if only is not None:
        facts, specs = rule_inputs(plan)
        fixed = quant_rules.choose_types(specs, only, facts, has_imatrix=bool(plan.imatrix_kv))
        types = [(ty,) for ty in fixed]
    else:
        types = [candidate_types(job, plan.arch.arch_name) for job in plan.jobs]
    out: list[TensorOptions | None] = [None] * len(plan.jobs)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        futures = [pool.submit(_measure_one, job, ty, n_sample) for job, ty in zip(plan.jobs, types)]
        for i, fut in enumerate(futures):
            out[i] = fut.result()
            if progress:
                progress(plan.jobs[i].name, i + 1, len(futures))
    tied = not any(job.name == "output.weight" for job in plan.jobs)
    return [replace(o, weight=TIED_EMBEDDING_WEIGHT) if tied and o.name == "token_embd.weight" else o
            for o in out if o is not None]


def allocate(costs: Sequence[Sequence[tuple[int, float]]], budget: int) -> list[int]:
    """One option index per item: minimise the sum of losses with the sum of bytes <= `budget`.

    `costs[i]` lists item i's options as (bytes, loss). Lagrangian bisection, then greedy fill.
    ValueError when even the smallest options exceed the budget."""
    smallest = sum(min(b for b, _ in opts) for opts in costs)
    if smallest > budget:
        raise ValueError(f"the smallest mix takes {smallest} bytes, more than the budget of {budget}")
    nbytes = [np.array([b for b, _ in opts], dtype=np.float64) for opts in costs]
    loss = [np.array([c for _, c in opts], dtype=np.float64) for opts in costs]

    def pick(lam: float) -> list[int]:
        # argmin loss + lam * bytes; ties go to the smaller option (np.lexsort keys: last is primary)
        return [int(np.lexsort((b, c + lam * b))[0]) for b, c in zip(nbytes, loss)]

    def total(choice: list[int]) -> int:
        return sum(int(costs[i][k][0]) for i, k in enumerate(choice))

    choice = pick(0.0)
    if total(choice) > budget:
        hi = 1.0
        while total(pick(hi)) > budget:
            hi *= 16.0
        lo = hi / 16.0
        while lo > 1e-300 and total(pick(lo)) <= budget:
            hi, lo = lo, lo / 16.0
        for _ in range(200):
            mid = (lo * hi) ** 0.5 if lo > 0 else hi / 2
            if total(pick(mid)) <= budget:
                hi = mid
            else:
                lo = mid
            if hi - lo <= hi * 1e-12:
                break
        choice = pick(hi)
        if total(choice) > budget:  # lambda that large picks the smallest option everywhere
            choice = [int(np.argmin(b)) for b in nbytes]
    return _fill(costs, choice, budget - total(choice))


def _fill(costs: Sequence[Sequence[tuple[int, float]]], choice: list[int], left: int) -> list[int]:
    """Spend the bytes the bisection left on the upgrades with the best loss saved per byte."""
    while True:
        best, best_gain = None, 0.0
        for i, opts in enumerate(costs):
            b0, c0 = opts[choice[i]]
            for k, (b, c) in enumerate(opts):
                if c < c0 and b - b0 <= left:
                    gain = (c0 - c) / max(b - b0, 1)
                    if gain > best_gain:
                        best, best_gain = (i, k), gain
        if best is None:
            return choice
        i, k = best
        left -= costs[i][k][0] - costs[i][choice[i]][0]
        choice[i] = k


def size_range(plan: ConversionPlan) -> tuple[int, int, int]:
    """(smallest, largest, header) whole-file bytes the candidates allow, before measuring anything."""
    header = header_nbytes(_with_recipe(plan, {}, BASE_LEVEL, 0, 0.0, bool(plan.imatrix_kv)))
    sizes = [[padded(quant_rules.tensor_nbytes(job.shape, ty)) for ty in candidate_types(job, plan.arch.arch_name)]
             for job in plan.jobs]
    return header + sum(map(min, sizes)), header + sum(map(max, sizes)), header


def _with_recipe(plan: ConversionPlan, types: dict[str, GGMLQuantizationType], quant: str, budget: int,
                 loss: float, weighted: bool) -> ConversionPlan:
    """The chosen mix as a plan, with its recipe in the metadata: the budget, the objective, the
    predicted loss (fixed width) and every tensor's GGML type id in file order. Every value has
    a size that does not depend on the choice, so the header size is known before choosing."""
    objective = "imatrix-weighted squared error / energy" if weighted else "squared error / energy"
    out = retyped(plan, types, quant)
    kv = (
        (RECIPE_KEYS[0], budget),
        (RECIPE_KEYS[1], objective),
        (RECIPE_KEYS[2], f"{loss:.6e}"),
        (RECIPE_KEYS[3], tuple(int(job.ggml_type) for job in out.jobs)),
    )
    return retyped(plan, types, quant, kv, tag=f"TARGET-{short_size(budget)}")


def short_size(n: int) -> str:
    """900K, 253M, 4.2G: the budget in a file name or a row label (decimal units, rounded down)."""
    if n >= 10**9:
        return f"{n // 10**8 / 10:g}G"
    return f"{n // 10**6}M" if n >= 10**6 else f"{n // 10**3}K"


def target_label(budget: int) -> str:
    """How `plan` and `quality` name a mix made for `budget` bytes: "target 253M"."""
    return f"target {short_size(budget)}"


def recipe_budget(kv: Mapping[str, object]) -> int | None:
    """The budget a file was made for, when its metadata holds the whole recipe (RECIPE_KEYS):
    a per-tensor mix, whatever its general.file_type says; None for any other file."""
    budget = kv.get(RECIPE_KEYS[0])
    if not all(k in kv for k in RECIPE_KEYS) or isinstance(budget, bool) or not isinstance(budget, int):
        return None
    return budget if budget > 0 else None


def check_budget(budget: int, smallest: int, largest: int, how: str) -> None:
    """UsageError when no mix of this model fits `budget` (`how`: where the number came from)."""
    if budget < smallest:
        raise UsageError(f"{how} asks for {budget:,} bytes; the smallest file this model can be is {smallest:,} "
                         "bytes (every tensor at its smallest type)")
    if budget > largest:
        raise UsageError(f"{how} asks for {budget:,} bytes, more than the f16 file ({largest:,} bytes); "
                         "use --quant f16 (or bf16, f32)")


def search(plan: ConversionPlan, budget: int, options: Sequence[TensorOptions]) -> SearchResult:
    """The mix with the lowest predicted loss whose whole file fits in `budget` bytes.
    ValueError when the smallest mix does not fit."""
    weighted = bool(plan.imatrix_kv)
    header = header_nbytes(_with_recipe(plan, {}, BASE_LEVEL, budget, 0.0, weighted))
    costs = [[(o.nbytes, t.loss(k)) for k, o in enumerate(t.options)] for t in options]
    choice = allocate(costs, budget - header)
    types = {t.name: t.options[k].ggml_type for t, k in zip(options, choice)}
    loss = sum(t.loss(k) for t, k in zip(options, choice))
    tensor_bytes = sum(t.options[k].nbytes for t, k in zip(options, choice))
    level_bytes, level_losses = _levels(plan, options, header)
    quant = min(level_bytes, key=lambda q: abs(level_bytes[q] - header - tensor_bytes)) if level_bytes else BASE_LEVEL
    final = _with_recipe(plan, types, quant, budget, loss, weighted)
    size = header_nbytes(final) + final.tensor_bytes
    if size > budget:  # the header's size cannot depend on the choice (see _with_recipe)
        raise RuntimeError(f"the chosen mix takes {size} bytes, over the budget of {budget}")
    return SearchResult(final, budget, size, loss, level_losses, level_bytes, tuple(
        (t.name, t.options[k].ggml_type, t.options[k].nbytes, t.loss(k)) for t, k in zip(options, choice)), weighted)


def _levels(plan: ConversionPlan, options: Sequence[TensorOptions], header: int) -> tuple[dict[str, int], dict[str, float]]:
    """The standard levels' sizes (with this header), and their predicted loss where every one of
    their types was measured."""
    facts, specs = rule_inputs(plan)
    sizes: dict[str, int] = {}
    losses: dict[str, float] = {}
    for q in NEAREST_LEVELS:
        try:
            types = quant_rules.choose_types(specs, q, facts, has_imatrix=bool(plan.imatrix_kv))
        except Exception:  # noqa: BLE001  (a level llama-quantize cannot make of this model)
            continue
        if quant_rules.imatrix_required(specs, types, q) and not plan.imatrix_kv:
            continue
        sizes[q] = header + sum(padded(quant_rules.tensor_nbytes(s.shape, ty)) for s, ty in zip(specs, types))
        total = 0.0
        for t, ty in zip(options, types):
            k = next((k for k, o in enumerate(t.options) if o.ggml_type == ty), None)
            if k is None:
                total = float("nan")
                break
            total += t.loss(k)
        if total == total:
            losses[q] = total
    return sizes, losses


def mix_summary(result: SearchResult) -> list[tuple[str, int, int]]:
    """(type name, tensors, bytes) of the chosen mix, most bytes first."""
    agg: dict[str, list[int]] = {}
    for _, ty, nbytes, _ in result.choice:
        row = agg.setdefault(ty.name, [0, 0])
        row[0] += 1
        row[1] += nbytes
    return sorted(((k, v[0], v[1]) for k, v in agg.items()), key=lambda r: -r[2])


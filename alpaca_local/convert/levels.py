"""Several quant levels from one read of the source, each one GGUF file or a set of split parts.

In:  one `ConversionPlan` per level, made by `pipeline.plan_conversion` exactly as a
     single-level convert makes it (`plan_levels`), and where each goes: a file, or
     llama.cpp's split parts (`layout`, convert/split.py).
Out: the files (`write_levels`). Each level's file is byte-identical to what `convert`
     writes for that level alone; split parts are what `llama-gguf-split --split` makes of
     that file.

One read: the source is read once, in its file order (`pipeline._read_ahead`), and each
chunk is encoded once per distinct output type among the levels (output.weight is Q6_K in
q6_k, q5_k_m and q4_k_m alike: quantized once), then written at its place in every
level's file.

Memory: at most 2 x workers + (number of levels) encode tasks are in flight, plus the
read-ahead of as many raw chunks, each chunk at most `pipeline.CHUNK_ELEMENTS` values (4 MB
as float32, its encoded bytes at most as much): the peak grows with the number of levels by
a few chunks per level, never with the model's size.

All or nothing: every file is a temp file beside its target until every level is complete,
then all are renamed (`atomic.atomic_write_all`). All levels are written in the same pass, so
when one fails (disk full, Ctrl-C, SIGTERM, a bad streamed byte) none is finished: none is kept.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from alpaca_local.convert import quant_levels
from alpaca_local.convert.atomic import atomic_write_all, check_targets
from alpaca_local.convert.lora_merge import one_blas_thread
from alpaca_local.convert.pipeline import (
    ConversionPlan,
    ImatrixRequired,
    Progress,
    TensorJob,
    _encode,
    _header_writer,
    _read_ahead,
    _write_header,
    levels_needing_imatrix,
    padded,
    plan_conversion,
)
from alpaca_local.convert.split import KEY_COUNT, KEY_NO, KEY_TENSORS, SplitRule, part_of_each, part_paths
from alpaca_local.source.adapter import Adapter
from alpaca_local.source.tensors import TensorRef

WriteProgress = Callable[[int, int], None]  # (level index, bytes just written to that level)


def plan_levels(
    source: Path, levels: Sequence[str], imatrix: Path | None = None, *, adapters: Sequence[Adapter] = (),
    weights: dict[str, TensorRef] | None = None, name: str | None = None, expect_imatrix: bool = False,
) -> tuple[ConversionPlan, ...]:
    """One plan per level (canonical names, `quant_levels.parse_list`), each what a single-level
    convert of that level plans; the source's tensors are indexed once and shared (a streamed
    Hub source has one stream per file).

    The imatrix applies to every quantized level; a 16/32-bit level among them is written
    plain (the converter's own output types take none). Without one (and without
    `expect_imatrix`: --calibrate computes it later), the levels llama-quantize refuses
    without an importance matrix are refused together, before any tensor data is read."""
    def plan(q: str, weights: dict[str, TensorRef] | None) -> ConversionPlan:
        plain = quant_levels.LEVELS[q].converter_outtype
        return plan_conversion(source, q, None if plain else imatrix, adapters=adapters, weights=weights,
                               name=name, expect_imatrix=expect_imatrix and not plain)

    first = plan(levels[0], weights)  # every check a single-level convert makes, first
    if imatrix is None and not expect_imatrix:
        needs = [q for q in levels if q in levels_needing_imatrix(first, levels)]
        if needs:
            raise ImatrixRequired(f"{', '.join(needs)} need{'s' if len(needs) == 1 else ''} an importance matrix, "
                                  "as llama-quantize does; add --imatrix FILE or --calibrate, or leave "
                                  f"{'it' if len(needs) == 1 else 'them'} out")
    if weights is None and len(levels) > 1:
        from alpaca_local.source.weights import read_weights

        weights = read_weights(source)
    # Every level reads the same tokenizer files: keep one vocabulary (Gemma's 262k tokens) for all.
    return (first, *(replace(plan(q, weights), vocab=first.vocab) for q in levels[1:]))


@dataclass(frozen=True)
class LevelOutput:
    """Where one level goes: its plan, its file (or split parts) and the part of each job."""

    plan: ConversionPlan
    targets: tuple[Path, ...]  # one file, or parts NAME-00001-of-0000N.gguf...
    parts: tuple[int, ...]  # the part index of each of plan.jobs

    def jobs_in(self, no: int) -> list[TensorJob]:
        return [job for job, part in zip(self.plan.jobs, self.parts) if part == no]


def layout(plan: ConversionPlan, target: Path, rule: SplitRule = SplitRule()) -> LevelOutput:
    """`target` as one file, or split by `rule` into llama.cpp's parts named after it."""
    names = [job.name for job in plan.jobs]
    parts = part_of_each([padded(job.nbytes) for job in plan.jobs], names, rule) if rule else [0] * len(names)
    count = (parts[-1] + 1) if parts else 1
    return LevelOutput(plan, tuple(part_paths(target, count)), tuple(parts))


@dataclass(frozen=True)
class LevelResult:
    quant: str
    paths: tuple[Path, ...]  # the file, or its parts in order
    file_bytes: int  # all parts together
    n_tensors: int


@dataclass(frozen=True)
class LevelsResult:
    levels: tuple[LevelResult, ...]
    seconds: float
    peak_rss_bytes: int


def _write_part_header(out: LevelOutput, no: int, path: Path) -> int:
    """Part `no`'s header at the start of `path`; returns where its tensor data starts.

    A single part is the plain file (`pipeline._write_header`). Split: the first part keeps
    all the metadata and every part gets the split.* keys after it (in gguf-split's order), its own tensor table
    holding only its tensors (gguf-split.cpp:231-244; gguf-py's writer holds the key/value
    list and the tensor table as plain dicts, so they are narrowed here)."""
    count = len(out.targets)
    if count == 1:
        _write_header(out.plan, path)
    else:
        w = _header_writer(out.plan, path)
        infos = w.tensors[0]
        w.tensors = [{job.name: infos[job.name] for job in out.jobs_in(no)}]
        if no:
            w.kv_data = [{}]  # only the first part carries the metadata
        # gguf-split's order: split.count is set again once the count is known, and gguf's
        # gguf_set_val_u16 moves a key it replaces to the end (ggml/src/gguf.cpp:1270-1273).
        w.add_uint16(KEY_NO, no)
        w.add_int32(KEY_TENSORS, len(out.plan.jobs))
        w.add_uint16(KEY_COUNT, count)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
    return padded(path.stat().st_size)


Unit = tuple[str, int]  # (tensor name, expert): what one read fills; a stacked-experts tensor has one per expert


def _units(plan: ConversionPlan) -> dict[Unit, TensorJob]:
    """The jobs the source is read as: each job, or each expert of a stacked-experts job (`job.parts`)."""
    return {(job.name, e): part for job in plan.jobs for e, part in enumerate(job.parts or (job,))}


def _placements(out: LevelOutput, paths: Sequence[Path]) -> dict[Unit, tuple[int, int]]:
    """Write each part's header, size the part, and return each unit -> (part, data offset):
    expert e's rows follow expert e-1's, as `pipeline._read_order` places them."""
    placed: dict[Unit, tuple[int, int]] = {}
    for no, path in enumerate(paths):
        offset = _write_part_header(out, no, path)
        for job in out.jobs_in(no):
            at = offset
            for e, part in enumerate(job.parts or (job,)):
                placed[(job.name, e)] = (no, at)
                at += part.nbytes
            offset += padded(job.nbytes)
        os.truncate(path, offset)  # padding and alignment gaps read as zeros
    return placed


def write_levels(
    outputs: Sequence[LevelOutput],
    force: bool = False,
    workers: int | None = None,
    read_progress: Progress | None = None,
    write_progress: WriteProgress | None = None,
    check_source: Callable[[], None] | None = None,
) -> LevelsResult:
    """Write every level from one read; the outputs appear together, only when all are complete.

    `read_progress` gets (tensor name, source bytes read) as in `pipeline.convert`;
    `write_progress` (level index, bytes written). `check_source` runs after the last byte
    and before any output takes its name (a streamed source's hash check)."""
    t0 = time.perf_counter()
    targets = [t for out in outputs for t in out.targets]
    check_targets(targets, force, need_bytes=sum(out.plan.tensor_bytes for out in outputs))
    with atomic_write_all(targets) as temps, contextlib.ExitStack() as files:
        handles, placements, at = [], [], 0
        for out in outputs:
            paths = temps[at:at + len(out.targets)]
            at += len(out.targets)
            placements.append(_placements(out, paths))
            handles.append([files.enter_context(open(p, "r+b")) for p in paths])
        merging = any(out.plan.merge for out in outputs)
        with one_blas_thread() if merging else contextlib.nullcontext():
            _stream(outputs, handles, placements, workers or os.cpu_count() or 1, read_progress, write_progress)
        files.close()
        if check_source:
            check_source()
        sizes = [p.stat().st_size for p in temps]
    results, at = [], 0
    for out in outputs:
        n = len(out.targets)
        results.append(LevelResult(out.plan.quant, out.targets, sum(sizes[at:at + n]), len(out.plan.jobs)))
        at += n
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return LevelsResult(tuple(results), time.perf_counter() - t0, peak)


def _stream(outputs: Sequence[LevelOutput], handles: list[list], placements: list[dict[Unit, tuple[int, int]]],
            workers: int, read_progress: Progress | None, write_progress: WriteProgress | None) -> None:
    """Read the first level's jobs in source order; encode each chunk once per distinct type; write it everywhere."""
    by_unit = [_units(out.plan) for out in outputs]
    unit_of = {id(job): unit for unit, job in by_unit[0].items()}  # _read_ahead yields these very jobs
    # Encode tasks in flight: 2 x workers as in pipeline._write_tensor_data, plus one chunk's worth
    # (a task per level), so the workers have the next chunk's tasks while the oldest one drains.
    window = 2 * workers + len(outputs)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[tuple[TensorJob, int, int, list[TensorJob], dict[object, Future[bytes]]]] = deque()
        in_flight = 0

        def drain_one() -> int:
            lead, start, stop, jobs, encoded = pending.popleft()
            unit = unit_of[id(lead)]
            for level, job in enumerate(jobs):
                part, offset = placements[level][unit]
                f = handles[level][part]
                if start == 0:  # a tensor's chunks arrive in order, so only its first one seeks
                    f.seek(offset)
                data = encoded[job.ggml_type].result()
                f.write(data)
                if write_progress:
                    write_progress(level, len(data))
            if read_progress:
                read_progress(lead.name, (stop - start) * (lead.source.nbytes // max(lead.source.n_rows, 1)))
            return len(encoded)

        try:
            for lead, _, start, stop, raw in _read_ahead(outputs[0].plan, 0, window):
                jobs = [units[unit_of[id(lead)]] for units in by_unit]
                encoded: dict[object, Future[bytes]] = {}
                for job in jobs:
                    # The bytes depend on the rows and the type only: every level's job of a
                    # tensor has the same source, transforms, adapters and importance.
                    if job.ggml_type not in encoded:
                        encoded[job.ggml_type] = pool.submit(_encode, job, start, stop, raw)
                pending.append((lead, start, stop, jobs, encoded))
                in_flight += len(encoded)
                while in_flight >= window:
                    in_flight -= drain_one()
            while pending:
                drain_one()
        finally:
            for *_, encoded in pending:
                for fut in encoded.values():
                    fut.cancel()

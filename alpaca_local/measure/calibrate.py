"""`convert --calibrate`: the whole importance-matrix route in one call.

In:  a Hugging Face folder, a calibration text (default: the shipped one), a folder for
     temporary files (beside the final output, so it is on the disk the user chose).
Out: a context manager yielding the path of a freshly computed imatrix file, made by:
     1. a temporary f16 GGUF of the source when it fits in half the free memory,
        otherwise a q8_0 (llama-imatrix is usually run on f16; q8_0 keeps 7B runs
        possible on a 16 GB machine at a tiny cost in the statistics);
     2. the imatrix on it (measure/imatrix.py, llama-imatrix's method).
     Both temporaries are deleted when the block ends: success, error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from alpaca_local.convert.atomic import atomic_write, sigterm_as_interrupt
from alpaca_local.convert.imatrix_file import write_imatrix
from alpaca_local.convert.pipeline import Progress, convert, plan_conversion
from alpaca_local.measure.imatrix import DEFAULT_CTX, DEFAULT_DATASET, ChunkDone, ImatrixRun, default_text


@dataclass(frozen=True)
class CalibrationHooks:
    """What the caller shows: a stage line, convert's byte progress, imatrix's chunk progress."""

    stage: Callable[[str], None] = lambda line: None
    convert_progress: Callable[[int], Progress | None] = lambda total: None  # total bytes -> callback
    chunk_progress: Callable[[int], Callable[[ChunkDone], None] | None] = lambda n: None  # n chunks -> callback


def available_memory() -> int:
    """Bytes of memory free now (Linux/macOS sysconf; 0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def intermediate_quant(f16_bytes: int, free_bytes: int) -> str:
    """f16 when the f16 file takes at most half the free memory, else q8_0."""
    return "f16" if free_bytes and f16_bytes <= free_bytes // 2 else "q8_0"


@contextlib.contextmanager
def calibration(
    source: Path,
    workdir: Path,
    text: str | None = None,
    dataset: str | None = None,
    n_ctx: int = DEFAULT_CTX,
    n_chunks: int | None = None,
    threads: int | None = None,
    hooks: CalibrationHooks = CalibrationHooks(),
) -> Iterator[Path]:
    """Yield an imatrix file for `source`, computed on `text`; every temporary is removed on exit."""
    if text is None:
        text, dataset = default_text(), DEFAULT_DATASET
    tmp = Path(tempfile.mkdtemp(prefix=".alpaca-calibrate-", dir=workdir))
    # SIGTERM unwinds like Ctrl-C, so the temporaries go then too (also during the final convert).
    with sigterm_as_interrupt():
        try:
            f16_plan = plan_conversion(source, "f16")
            quant = intermediate_quant(f16_plan.tensor_bytes, available_memory())
            plan = f16_plan if quant == "f16" else plan_conversion(source, quant)
            hooks.stage(f"calibrate: temporary {quant} of {source.name}")
            model = convert(source, tmp / f"calibrate.{quant}.gguf", quant, plan=plan,
                            progress=hooks.convert_progress(plan.source_bytes), workers=threads).output
            run = ImatrixRun(model, n_ctx, threads)
            try:
                chunks = run.chunks(text, n_chunks)
                hooks.stage(f"calibrate: importance matrix over {len(chunks)} chunks of {n_ctx} tokens")
                run.run(chunks, hooks.chunk_progress(len(chunks)))
                imatrix = run.result([dataset or "calibration text"])
            finally:
                run.close()
            model.unlink()  # free the disk before the final file is written
            path = tmp / "calibrate.imatrix.gguf"
            with atomic_write(path) as partial:
                write_imatrix(imatrix, partial)
            yield path
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

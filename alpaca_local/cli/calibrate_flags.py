"""convert --calibrate: what it refuses, the calibration run with its progress, the imatrix keys.

Shared by the single-level route (`convert_cmd`) and the several-levels route
(`publish_flags`): the imatrix is computed once, on a temporary model, and removed
with it whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path


def check_calibrate(args: argparse.Namespace, levels: tuple[str, ...]) -> None:
    """What --calibrate refuses, before any work."""
    from alpaca_local.convert import quant_levels
    from alpaca_local.errors import UsageError

    if args.lora:
        raise UsageError("--calibrate with --lora is not supported yet; merge first (convert BASE --lora ADAPTER "
                         "--quant f16), then calibrate that file's folder")
    if args.imatrix is not None:
        raise UsageError("give either --imatrix FILE or --calibrate [TEXT], not both")
    if not Path(args.source).exists():
        # The calibration run needs the model on disk twice over (a temporary f16/q8_0 of it).
        raise UsageError("--calibrate needs a local model folder; fetch the Hub model first "
                         f"(alpaca-local convert {args.source} --download keeps it in the HF cache)")
    if all(quant_levels.LEVELS[q].converter_outtype for q in levels):
        raise UsageError(f"--calibrate only applies to quantized levels, not {','.join(levels)}")


def calibrated_plan(plan, args: argparse.Namespace):
    """The imatrix file is a temporary: its key names what it was computed on instead."""
    import dataclasses

    if not plan.imatrix_kv:
        return plan
    text = args.calibrate or "built-in text"
    kv = {**dict(plan.imatrix_kv), "quantize.imatrix.file": f"calibrate:{text}"}
    return dataclasses.replace(plan, imatrix_kv=tuple(kv.items()))


@contextlib.contextmanager
def calibrated_imatrix(args: argparse.Namespace, err, workdir: Path) -> Iterator[Path]:
    """Temporary f16/q8_0 -> imatrix, with progress; the temporaries go whatever happens."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from alpaca_local.cli.quality_cmd import _read_text
    from alpaca_local.measure.calibrate import CalibrationHooks, calibration

    text_path = Path(args.calibrate) if args.calibrate else None
    text = _read_text(text_path) if text_path else None
    columns = (TextColumn("[bold]{task.description:<28}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with contextlib.ExitStack() as temporaries:
        # One live display for both calibration steps; closed before the final convert's bar.
        with Progress(*columns, console=err, disable=args.json or not err.is_terminal) as bar:

            def convert_progress(total: int):
                task = bar.add_task("temporary model", total=total, info="")
                return lambda name, nbytes: bar.update(
                    task, advance=nbytes, info=f"{bar.tasks[task].completed / 1e6:,.0f}/{total / 1e6:,.0f} MB")

            def chunk_progress(n: int):
                task = bar.add_task("imatrix chunks", total=n, info="")
                return lambda done: bar.update(task, completed=done.index, info=(
                    f"{done.index}/{n} chunks, {done.tokens / max(done.seconds, 1e-9):,.0f} tok/s"))

            hooks = CalibrationHooks(stage=lambda line: None, convert_progress=convert_progress,
                                     chunk_progress=chunk_progress)
            imatrix = temporaries.enter_context(calibration(
                Path(args.source), workdir, text, str(text_path) if text_path else None,
                threads=args.threads, hooks=hooks,
            ))
        yield imatrix

"""`alpaca-local imatrix`: flags, progress (tokens/s, ETA), Ctrl-C handling around `measure.imatrix`.

JSON (`--json`), one object: output, partial, chunks, chunk_size, entries, tokens, seconds.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from alpaca_local.cli import cpu_flags
from alpaca_local.measure.imatrix import DEFAULT_CTX

DESCRIPTION = """Compute an importance matrix for a GGUF model: run it over a calibration text
with llama.cpp and record, for every weight matrix, how large the activations it
multiplies are per input column (the sum of squares, as llama-imatrix does). The
file is llama.cpp's GGUF imatrix format: `convert --imatrix` and `llama-quantize
--imatrix` both use it to spend the quantization error where it matters least.

Without --text the built-in calibration text is used (prose, code, dialogue and
Alpaca instruction/response pairs). Ctrl-C keeps the chunks finished so far in
OUT with `.partial` before the suffix, marked partial inside the file."""

EXAMPLES = """examples:
  alpaca-local imatrix models/alpaca-7b.F16.gguf                  # -> models/alpaca-7b.F16.imatrix.gguf
  alpaca-local imatrix models/alpaca-7b.Q8_0.gguf --text wiki.txt --chunks 100 -o alpaca.imatrix.gguf
  alpaca-local convert ./alpaca-7b --quant q4_k_m --imatrix alpaca.imatrix.gguf

Run it on the f16 (or q8_0) file, not on a 4-bit one: the statistics should come
from the model as close to the original as you have.
exit codes: 0 done, 1 bad input or failed run, 2 usage error, 130 interrupted (partial file saved)."""


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(
        name, help=help_text, description=DESCRIPTION, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL.gguf", type=Path, help="the model to run (f16 or q8_0 is best)")
    p.add_argument("--text", type=Path, metavar="FILE", help="calibration text, UTF-8 (default: the built-in one)")
    p.add_argument("-o", "--output", type=Path, metavar="OUT.gguf",
                   help="output file (default: MODEL with .imatrix.gguf in place of .gguf)")
    p.add_argument("--chunks", type=int, metavar="N", help="use at most N chunks of the text (default: all)")
    p.add_argument("-c", "--ctx", type=int, default=DEFAULT_CTX, metavar="N",
                   help=f"tokens per chunk (default: {DEFAULT_CTX}, as llama-imatrix)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for llama.cpp (default: its own choice)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, metavar="N", help="layers to offload to the GPU")
    p.add_argument("-f", "--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (no progress bar)")
    cpu_flags.add_no_repack(p)


def default_output(model: Path) -> Path:
    name = model.name[: -len(".gguf")] if model.name.endswith(".gguf") else model.name
    return model.with_name(f"{name}.imatrix.gguf")


def partial_path(output: Path) -> Path:
    """OUT.gguf -> OUT.partial.gguf: a partial result never takes the name of a whole one."""
    return output.with_name(f"{output.stem}.partial{output.suffix or '.gguf'}")


def run(args: argparse.Namespace) -> int:
    import time

    from rich.console import Console

    from alpaca_local.cli.quality_cmd import _read_text
    from alpaca_local.convert.atomic import atomic_write, check_target
    from alpaca_local.convert.imatrix_file import write_imatrix
    from alpaca_local.errors import UsageError
    from alpaca_local.measure.imatrix import DEFAULT_DATASET, ImatrixRun, default_text

    if args.chunks is not None and args.chunks < 1:
        raise UsageError(f"--chunks {args.chunks} must be at least 1")
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise UsageError(f"--threads {args.threads} is out of range; give 1 to 1024")
    output = args.output or default_output(args.model)
    check_target(output, args.force)
    text, dataset = (_read_text(args.text), str(args.text)) if args.text else (default_text(), DEFAULT_DATASET)
    err = Console(stderr=True)
    t0 = time.perf_counter()
    im_run = ImatrixRun(args.model, args.ctx, args.threads, args.n_gpu_layers, no_repack=args.no_repack)
    partial = False
    try:
        chunks = im_run.chunks(text, args.chunks)
        with chunk_progress(err, len(chunks), enabled=not args.json) as progress:
            try:
                im_run.run(chunks, progress)
            except KeyboardInterrupt:
                if not im_run.done:
                    raise
                partial = True
        imatrix = im_run.result([dataset], partial=partial)
    finally:
        im_run.close()
    target = partial_path(output) if partial else output
    if partial:
        check_target(target, force=True)
    with atomic_write(target) as tmp:
        write_imatrix(imatrix, tmp)
    summary = {
        "output": str(target), "partial": partial, "chunks": imatrix.chunk_count, "chunk_size": imatrix.chunk_size,
        "entries": len(imatrix.entries), "tokens": im_run.done * args.ctx, "seconds": round(time.perf_counter() - t0, 2),
    }
    if args.json:
        import json

        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary, len(chunks), Console())
    if partial:
        err.print(f"interrupted: saved a PARTIAL imatrix ({im_run.done} of {len(chunks)} chunks) to {target}")
        return 130
    return 0


@contextlib.contextmanager
def chunk_progress(console, n_chunks: int, enabled: bool = True) -> Iterator[Callable | None]:
    """A rich bar over the chunks with tokens/s and ETA; yields the callback for ImatrixRun.run."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (
        TextColumn("[bold]imatrix chunks"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not (enabled and console.is_terminal)) as bar:
        task = bar.add_task("imatrix", total=n_chunks, rate="")

        def advance(done) -> None:  # noqa: ANN001  (measure.imatrix.ChunkDone)
            rate = done.tokens / done.seconds if done.seconds > 0 else 0.0
            bar.update(task, completed=done.index, rate=f"{rate:,.0f} tok/s")

        yield advance


def _print_summary(summary: dict, n_planned: int, console) -> None:
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("output", summary["output"] + ("  (PARTIAL)" if summary["partial"] else ""))
    table.add_row("chunks", f"{summary['chunks']} of {n_planned} × {summary['chunk_size']} tokens")
    table.add_row("entries", str(summary["entries"]))
    rate = summary["tokens"] / summary["seconds"] if summary["seconds"] else 0
    table.add_row("time", f"{summary['seconds']:.1f} s ({rate:,.0f} tokens/s)")
    console.print(table)

"""`alpaca-local convert`: flags, progress bar and summary around `convert.convert`."""

from __future__ import annotations

import argparse
from pathlib import Path

from alpaca_local.cli import lora_flags
from alpaca_local.convert.quant_rules import QUANTS

DESCRIPTION = """Turn a Hugging Face model folder (config.json, safetensors or pytorch .bin
weights, SentencePiece tokenizer) into one GGUF file that llama.cpp, Ollama and
LM Studio load. Tensors are streamed one at a time, so a 7B model converts in
well under 16 GB of memory; the output appears only once it is complete."""

EXAMPLES = """examples:
  alpaca-local convert ./alpaca-7b                       # -> models/alpaca-7b.Q4_K_M.gguf
  alpaca-local convert ./alpaca-7b --quant q8_0 -o alpaca.q8.gguf
  alpaca-local convert ./alpaca-7b --quant f16 --force   # overwrite an earlier file

quant levels (quality vs size, LLaMA 7B): f16 13.5 GB, q8_0 7.2 GB,
q5_k_m 4.8 GB, q4_k_m 4.1 GB (recommended), q4_0 3.8 GB.

""" + lora_flags.HELP_EXAMPLES + """

exit codes: 0 done, 1 bad input or failed write, 2 usage error, 130 interrupted."""


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(
        name, help=help_text, description=DESCRIPTION, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SRC", type=Path, help="Hugging Face model folder, e.g. ./alpaca-7b")
    p.add_argument(
        "-o", "--output", metavar="OUT.gguf", type=Path,
        help="output file (default: models/<folder name>.<QUANT>.gguf)",
    )
    p.add_argument(
        "-q", "--quant", default="q4_k_m", type=str.lower, choices=sorted(QUANTS), metavar="QUANT",
        help=f"quant level: {', '.join(QUANTS)} (default: q4_k_m)",
    )
    p.add_argument("-f", "--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument(
        "--threads", type=int, metavar="N", default=None,
        help="quantize with N threads (default: all cores)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON (no progress bar)")
    lora_flags.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from alpaca_local.convert.pipeline import convert, plan_conversion
    from alpaca_local.errors import UsageError

    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise UsageError(f"--threads {args.threads} is out of range; give 1 to 1024")
    from alpaca_local.source.adapter import is_adapter_folder

    if is_adapter_folder(args.source):
        return lora_flags.run_adapter(args)
    err = Console(stderr=True)
    plan = plan_conversion(args.source, args.quant, lora_flags.read_adapters(args))
    if args.json:
        result = convert(args.source, args.output, args.quant, args.force, plan=plan, workers=args.threads)
    else:
        result = _convert_with_progress(plan, args, err)
    summary = {
        "output": str(result.output),
        "quant": result.quant,
        "size_bytes": result.file_bytes,
        "tensors": result.n_tensors,
        "seconds": round(result.seconds, 2),
        "peak_memory_bytes": result.peak_rss_bytes,
    }
    if plan.merge:
        summary["merged_adapters"] = [str(a.folder) for a in plan.merge.adapters]
    if args.json:
        import json

        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary, plan, Console())
    return 0


def _convert_with_progress(plan, args: argparse.Namespace, console):
    from rich.progress import (
        BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    )

    from alpaca_local.convert.pipeline import convert

    columns = (
        TextColumn("[bold]{task.description:<28}"), BarColumn(), DownloadColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        task = bar.add_task("reading", total=plan.source_bytes)

        def advance(name: str, nbytes: int) -> None:
            bar.update(task, advance=nbytes, description=name)

        result = convert(
            args.source, args.output, args.quant, args.force, plan=plan, progress=advance, workers=args.threads
        )
        bar.update(task, description="done")
    return result


def _print_summary(summary: dict, plan, console) -> None:
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("output", summary["output"])
    table.add_row("model", f"{plan.name} ({plan.arch.arch_name}, {plan.config.n_layer} layers, vocab {plan.config.vocab_size})")
    if plan.merge:
        table.add_row("merged", ", ".join(f"{a.name} (x{a.user_scale:g})" for a in plan.merge.adapters))
    table.add_row("quant", summary["quant"].upper())
    table.add_row("size", f"{summary['size_bytes'] / 1e6:,.1f} MB")
    table.add_row("tensors", str(summary["tensors"]))
    table.add_row("time", f"{summary['seconds']:.1f} s")
    table.add_row("peak memory", f"{summary['peak_memory_bytes'] / 1e6:,.0f} MB")
    console.print(table)


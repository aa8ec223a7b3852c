"""`alpaca-local convert`: flags, progress bar and summary around `convert.convert`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from alpaca_local.cli import calibrate_flags, levels, lora_flags, publish_flags, target_flags
from alpaca_local.convert import quant_levels

DESCRIPTION = """Turn a Hugging Face model folder (config.json, safetensors or pytorch .bin
weights, SentencePiece tokenizer) into one GGUF file that llama.cpp, Ollama and
LM Studio load. Tensors are streamed one at a time, so a 7B model converts in
well under 16 GB of memory; the output appears only once it is complete.

SRC may also be a Hugging Face Hub id, org/name[@revision] (a local path of
that name wins). Safetensors weights then stream from the Hub with range
requests straight into the quantizer: only the output is written to disk.
Every file is checked against the size and sha256 the Hub lists. HF_TOKEN,
HF_ENDPOINT, HF_HUB_OFFLINE and the Hugging Face cache work as usual."""

EXAMPLES = """examples:
  alpaca-local convert ./alpaca-7b                       # -> models/alpaca-7b.Q4_K_M.gguf
  alpaca-local convert ./alpaca-7b --quant q8_0 -o alpaca.q8.gguf
  alpaca-local convert ./alpaca-7b --quant f16 --force   # overwrite an earlier file
  alpaca-local convert Qwen/Qwen2.5-0.5B-Instruct        # stream from the Hub
  alpaca-local convert chavinlo/alpaca-native@main --download  # keep the weights in the HF cache
  alpaca-local convert Qwen/Qwen2.5-0.5B-Instruct --offline    # from the HF cache, no network
  alpaca-local convert ./alpaca-7b --imatrix imatrix.gguf # importance-weighted, as llama-quantize --imatrix
  alpaca-local convert ./alpaca-7b --calibrate            # compute the imatrix first (built-in text), then quantize
  alpaca-local convert ./alpaca-7b --quant Q6_K           # any llama-quantize level, any case
  alpaca-local convert ./alpaca-7b --quant iq2_m --calibrate  # the 2-bit levels need an imatrix

""" + levels.help_table() + """
`alpaca-local plan ./alpaca-7b --levels all` shows each level's exact size for your model.

""" + lora_flags.HELP_EXAMPLES + """

""" + publish_flags.HELP_EXAMPLES + """

""" + target_flags.HELP_EXAMPLES + """

exit codes: 0 done, 1 bad input or failed write, 2 usage error, 130 interrupted."""


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(
        name, help=help_text, description=DESCRIPTION, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SRC", help="Hugging Face model folder (./alpaca-7b) or Hub id (org/name[@revision])")
    p.add_argument(
        "-o", "--output", metavar="OUT.gguf", type=Path,
        help="output file (default: models/<folder or repo name>.<QUANT>.gguf)",
    )
    p.add_argument(
        "-q", "--quant", default=["q4_k_m"], type=levels.levels_arg, metavar="QUANT[,QUANT...]",
        help="quant level, any of llama-quantize's (listed below; default: q4_k_m); several separated by "
             f"commas, or the set `publish` ({','.join(quant_levels.SETS['publish'])}) or `all`: one file per "
             "level from one read of the source",
    )
    p.add_argument("-f", "--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument(
        "--threads", type=int, metavar="N", default=None,
        help="quantize with N threads (default: all cores)",
    )
    p.add_argument(
        "--imatrix", metavar="FILE", type=Path,
        help="importance matrix (GGUF or legacy .dat, from `alpaca-local imatrix` or llama-imatrix)",
    )
    p.add_argument(
        "--calibrate", metavar="TEXT", nargs="?", const="", default=None,
        help="compute an importance matrix on TEXT (default: the built-in calibration text) "
             "from a temporary f16 (q8_0 if memory is short) of SRC, then quantize with it; "
             "the temporaries are removed whatever happens",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON (no progress bar)")
    hub = p.add_mutually_exclusive_group()
    hub.add_argument("--download", action="store_true",
                     help="Hub id: download the weights into the HF cache (resumable, reused) instead of streaming")
    hub.add_argument("--offline", action="store_true", help="Hub id: use only the HF cache, no network")
    lora_flags.add_arguments(p)
    publish_flags.add_arguments(p)
    target_flags.add_arguments(p)


def open_source(arg: str, quant: str, download: bool = False, offline: bool = False, imatrix: Path | None = None,
                adapters: Sequence = ()):
    """(plan, Hub source or None) for a folder or a Hub id; the caller closes the source."""
    from alpaca_local.convert.pipeline import plan_conversion
    from alpaca_local.source.hub import resolve_source

    src = resolve_source(arg, download=download, offline=offline)
    if isinstance(src, Path):
        return plan_conversion(src, quant, imatrix, adapters=adapters), None
    try:
        return plan_conversion(src.folder, quant, imatrix, adapters=adapters, weights=src.weights(), name=src.name), src
    except BaseException:
        src.close()
        raise


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from alpaca_local.convert.pipeline import plan_conversion
    from alpaca_local.errors import UsageError

    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise UsageError(f"--threads {args.threads} is out of range; give 1 to 1024")
    err = Console(stderr=True)
    args.target = target_flags.wanted(args)
    if lora_flags.is_adapter_source(args):
        if args.target:
            raise UsageError("a size target is for models, not for an adapter GGUF")
        return lora_flags.run_adapter(args)
    quants = tuple(args.quant)
    if (args.private or args.push_revision) and args.push is None:
        raise UsageError("--private and --push-revision are for --push ORG/NAME")
    if publish_flags.wants_levels_route(args, quants):
        if args.target:
            raise UsageError("a size target makes one file; convert it, then publish that file's folder")
        return publish_flags.run_levels(args, err, quants)
    args.quant = quants[0]
    if args.calibrate is None:
        return _convert_and_report(args, err, args.imatrix)
    calibrate_flags.check_calibrate(args, quants)
    from alpaca_local.convert.atomic import check_target
    from alpaca_local.convert.pipeline import default_output

    # Everything that can be refused is refused before the (long) calibration run.
    args.source = Path(args.source)
    plain = plan_conversion(args.source, _planned_quant(args), None, expect_imatrix=True)
    if args.output is None and not args.target:  # a target's file is named after its budget, known later
        args.output = default_output(plain, Path("models"))
    workdir = args.output.parent if args.output else Path("models")
    workdir.mkdir(parents=True, exist_ok=True)
    if args.output is not None:
        check_target(args.output, args.force, need_bytes=plain.tensor_bytes)
    with calibrate_flags.calibrated_imatrix(args, err, workdir) as imatrix:
        plan = calibrate_flags.calibrated_plan(plan_conversion(args.source, _planned_quant(args), imatrix), args)
        target = None
        if args.target:
            result, target = target_flags.choose(plan, args, err)
            if result is None:
                return 0
            plan = result.plan
        return _report(plan, None, args, err, target)


def _planned_quant(args: argparse.Namespace) -> str:
    """The level planned first: the asked one, or with a size target the search's base level."""
    from alpaca_local.convert.search import BASE_LEVEL

    return BASE_LEVEL if args.target else args.quant


def _convert_and_report(args: argparse.Namespace, err, imatrix: Path | None) -> int:
    """A folder or a Hub id → plan → convert; the Hub source is closed whatever happens."""
    adapters = lora_flags.read_adapters(args)
    plan, hub = open_source(args.source, _planned_quant(args), args.download, args.offline, imatrix, adapters)
    try:
        target = None
        if args.target:
            if hub and hub.stream:  # measured first by range requests of their own, then streamed as always
                err.print("note: the size target measures sampled rows of every tensor first (a range request "
                          "for each run of rows), then streams the model", highlight=False, soft_wrap=True)
            result, target = target_flags.choose(plan, args, err)
            if result is None:
                return 0
            plan = result.plan
        return _report(plan, hub, args, err, target)
    finally:
        if hub:
            hub.close()


def _report(plan, hub, args: argparse.Namespace, err, target: dict | None = None) -> int:
    from rich.console import Console

    from alpaca_local.convert.pipeline import convert

    for note in plan.notes:
        err.print(f"note: {note}", highlight=False, soft_wrap=True)
    check = hub.verify if hub else None
    if args.json:
        result = convert(plan.source, args.output, args.quant, args.force, plan=plan, workers=args.threads,
                         check_source=check)
    else:
        result = _convert_with_progress(plan, args, err, check)
    summary = {
        "output": str(result.output),
        "quant": result.quant,
        "size_bytes": result.file_bytes,
        "tensors": result.n_tensors,
        "seconds": round(result.seconds, 2),
        "peak_memory_bytes": result.peak_rss_bytes,
        "notes": list(plan.notes),
        "imatrix": dict(plan.imatrix_kv) or None,
    }
    if hub:  # a Hub id: which commit was converted, and what came over the network for the weights
        summary["hub"] = {"repo": hub.hub_id.repo_id, "commit": hub.commit, "streamed": hub.stream,
                          "fetched_bytes": hub.bytes_fetched}
    if plan.merge:
        summary["merged_adapters"] = [str(a.folder) for a in plan.merge.adapters]
    if target:
        summary["target"] = target
    if args.json:
        import json

        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary, plan, Console())
    return 0


def _convert_with_progress(plan, args: argparse.Namespace, console, check_source=None):
    from rich.progress import (
        BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from alpaca_local.convert.pipeline import convert

    columns = (
        TextColumn("[bold]{task.description:<28}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        task = bar.add_task("reading", total=plan.source_bytes)

        def advance(name: str, nbytes: int) -> None:
            bar.update(task, advance=nbytes, description=name)

        result = convert(
            plan.source, args.output, args.quant, args.force, plan=plan, progress=advance, workers=args.threads,
            check_source=check_source,
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
    if "hub" in summary:
        hub = summary["hub"]
        how = f"streamed, {hub['fetched_bytes'] / 1e6:,.1f} MB fetched" if hub["streamed"] else "from the HF cache"
        table.add_row("source", f"{hub['repo']} @ {hub['commit'][:12]} ({how})")
    if plan.merge:
        table.add_row("merged", ", ".join(f"{a.name} (x{a.user_scale:g})" for a in plan.merge.adapters))
    if "target" in summary:
        t = summary["target"]
        table.add_row("quant", f"per-tensor mix for {t['target']}, labelled {summary['quant'].upper()}: "
                               + ", ".join(f"{m['type']} x{m['tensors']}" for m in t["mix"]))
        table.add_row("predicted loss", f"{t['predicted_loss']:.4g} ({t['objective']})")
    else:
        table.add_row("quant", summary["quant"].upper())
    if summary["imatrix"]:
        imat = summary["imatrix"]
        chunks = f", {imat['quantize.imatrix.chunks_count']} chunks" if "quantize.imatrix.chunks_count" in imat else ""
        table.add_row("imatrix", f"{imat['quantize.imatrix.file']} ({imat['quantize.imatrix.entries_count']} entries{chunks})")
    table.add_row("size", f"{summary['size_bytes'] / 1e6:,.1f} MB")
    table.add_row("tensors", str(summary["tensors"]))
    table.add_row("time", f"{summary['seconds']:.1f} s")
    table.add_row("peak memory", f"{summary['peak_memory_bytes'] / 1e6:,.0f} MB")
    console.print(table)


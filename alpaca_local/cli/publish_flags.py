"""The publishing side of `alpaca-local convert`: several levels in one read, split files.

`add_arguments` adds --split-max-size / --split-max-tensors to convert's parser;
`wants_levels_route` says when convert takes this route (several levels, a split, an
output folder); `run_levels` plans every level, writes them all from one read of the
source with a progress bar per output, and prints one summary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from alpaca_local.errors import UsageError

HELP_EXAMPLES = """publishing (several levels from one read of the source, split files):
  alpaca-local convert ./alpaca-7b --quant q8_0,q5_k_m,q4_k_m   # -> models/alpaca-7b/alpaca-7b.Q8_0.gguf ...
  alpaca-local convert ./alpaca-7b --quant publish -o out/       # the publish set, into out/
  alpaca-local convert ./llama-70b --quant q8_0 --split-max-size 45G   # NAME-00001-of-0000N.gguf parts"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    split = p.add_mutually_exclusive_group()
    split.add_argument(
        "--split-max-size", metavar="SIZE",
        help="write llama.cpp's split parts of at most SIZE of tensor data each (45G, 500M; as llama-gguf-split)",
    )
    split.add_argument("--split-max-tensors", metavar="N", type=int,
                       help="write llama.cpp's split parts of at most N tensors each")


def split_rule(args: argparse.Namespace):
    from alpaca_local.convert.split import SplitRule, parse_size

    if args.split_max_tensors is not None and args.split_max_tensors < 1:
        raise UsageError(f"--split-max-tensors {args.split_max_tensors} must be at least 1")
    size = parse_size(args.split_max_size) if args.split_max_size is not None else 0
    return SplitRule(max_bytes=size, max_tensors=args.split_max_tensors or 0)


def wants_folder(args: argparse.Namespace, levels: tuple[str, ...]) -> bool:
    """Several levels go into a folder, one file per level (one level keeps -o as its file name)."""
    return len(levels) > 1


def wants_levels_route(args: argparse.Namespace, levels: tuple[str, ...]) -> bool:
    return wants_folder(args, levels) or bool(split_rule(args))


def output_targets(args: argparse.Namespace, plans) -> tuple[Path | None, list[Path]]:
    """(the output folder or None, the file each level goes to before any split)."""
    from alpaca_local.convert.pipeline import default_output

    levels = tuple(p.quant for p in plans)
    if not wants_folder(args, levels):
        if args.output is not None:
            return None, [args.output]
        target = default_output(plans[0], Path("models"))
        target.parent.mkdir(parents=True, exist_ok=True)
        return None, [target]
    if args.output is None:
        Path("models").mkdir(exist_ok=True)
    folder = args.output if args.output is not None else Path("models") / plans[0].name
    if folder.suffix == ".gguf":
        raise UsageError(f"with several levels -o names a folder, not a file ({folder}); e.g. -o models/{plans[0].name}")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file; with several levels -o names a folder")
    if not folder.parent.is_dir():
        raise UsageError(f"the folder {folder.parent} does not exist; create it first or choose another -o")
    return folder, [default_output(plan, folder) for plan in plans]


def run_levels(args: argparse.Namespace, err, levels: tuple[str, ...]) -> int:
    """Plan every level, check every target, write them all from one read, print the summary."""
    from alpaca_local.cli import lora_flags
    from alpaca_local.cli.calibrate_flags import calibrated_imatrix, calibrated_plan, check_calibrate
    from alpaca_local.convert.atomic import check_targets
    from alpaca_local.convert.levels import layout, plan_levels
    from alpaca_local.source.hub import resolve_source

    rule = split_rule(args)
    if args.calibrate is not None:
        check_calibrate(args, levels)
    adapters = lora_flags.read_adapters(args)
    src = resolve_source(args.source, download=args.download, offline=args.offline)
    hub = None if isinstance(src, Path) else src

    def plan(imatrix: Path | None):
        if hub is None:
            return plan_levels(src, levels, imatrix, adapters=adapters)
        return plan_levels(hub.folder, levels, imatrix, adapters=adapters, weights=hub.weights(), name=hub.name)

    try:
        plans = plan(args.imatrix)
        folder, targets = output_targets(args, plans)
        outputs = [layout(p, target, rule) for p, target in zip(plans, targets)]
        created = folder is not None and not folder.exists()
        if created:
            folder.mkdir()
        try:
            # Everything that can be refused is refused before the work (and before a calibration run).
            check_targets([t for out in outputs for t in out.targets], args.force,
                          sum(out.plan.tensor_bytes for out in outputs))
            if args.calibrate is None:
                result = _write_with_progress(outputs, args, err, hub.verify if hub else None)
            else:
                with calibrated_imatrix(args, err, folder or targets[0].parent) as imatrix:
                    plans = tuple(calibrated_plan(p, args) for p in plan(imatrix))
                    outputs = [layout(p, target, rule) for p, target in zip(plans, targets)]
                    result = _write_with_progress(outputs, args, err, None)
        except BaseException:
            if created and not any(folder.iterdir()):
                folder.rmdir()  # nothing was written: leave no empty folder behind
            raise
        _report(args, plans, folder, result, hub)
    finally:
        if hub:
            hub.close()
    return 0


def _write_with_progress(outputs, args: argparse.Namespace, err, check_source):
    from rich.progress import (
        BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from alpaca_local.convert.levels import write_levels

    for note in outputs[0].plan.notes:
        err.print(f"note: {note}", highlight=False, soft_wrap=True)
    columns = (TextColumn("[bold]{task.description:<28}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, disable=args.json or not err.is_terminal) as bar:
        reading = bar.add_task("reading", total=outputs[0].plan.source_bytes)
        written = [bar.add_task(out.targets[0].name[:28], total=out.plan.tensor_bytes) for out in outputs]
        result = write_levels(
            outputs, args.force, args.threads,
            read_progress=lambda name, n: bar.update(reading, advance=n, description=name),
            write_progress=lambda level, n: bar.update(written[level], advance=n),
            check_source=check_source,
        )
        bar.update(reading, description="done")
    return result


def _report(args: argparse.Namespace, plans, folder: Path | None, result, hub) -> None:
    summary = {
        "folder": str(folder) if folder is not None else None,
        "outputs": [{"quant": lv.quant, "files": [str(p) for p in lv.paths], "size_bytes": lv.file_bytes,
                     "tensors": lv.n_tensors} for lv in result.levels],
        "seconds": round(result.seconds, 2),
        "peak_memory_bytes": result.peak_rss_bytes,
        "notes": list(plans[0].notes),
        "imatrix": dict(next((p.imatrix_kv for p in plans if p.imatrix_kv), ())) or None,
    }
    if hub:
        summary["hub"] = {"repo": hub.hub_id.repo_id, "commit": hub.commit, "streamed": hub.stream,
                          "fetched_bytes": hub.bytes_fetched}
    if plans[0].merge:
        summary["merged_adapters"] = [str(a.folder) for a in plans[0].merge.adapters]
    if args.json:
        import json

        print(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    plan = plans[0]
    facts = Table(show_header=False, box=None, pad_edge=False)
    facts.add_column(style="bold")
    facts.add_column()
    if folder is not None:
        facts.add_row("folder", str(folder))
    facts.add_row("model", f"{plan.name} ({plan.arch.arch_name}, {plan.config.n_layer} layers, vocab {plan.config.vocab_size})")
    if hub:
        h = summary["hub"]
        how = f"streamed, {h['fetched_bytes'] / 1e6:,.1f} MB fetched" if h["streamed"] else "from the HF cache"
        facts.add_row("source", f"{h['repo']} @ {h['commit'][:12]} ({how})")
    if plan.merge:
        facts.add_row("merged", ", ".join(f"{a.name} (x{a.user_scale:g})" for a in plan.merge.adapters))
    if summary["imatrix"]:
        facts.add_row("imatrix", str(summary["imatrix"].get("quantize.imatrix.file")))
    facts.add_row("time", f"{summary['seconds']:.1f} s, one read of the source")
    facts.add_row("peak memory", f"{summary['peak_memory_bytes'] / 1e6:,.0f} MB")
    console.print(facts)
    files = Table(box=None, pad_edge=False)
    for col, justify in (("level", "left"), ("size MB", "right"), ("files", "left")):
        files.add_column(col, justify=justify)
    for lv in result.levels:
        names = [p.name for p in lv.paths]
        shown = names[0] if len(names) == 1 else f"{names[0]} ... ({len(names)} parts)"
        files.add_row(lv.quant.upper(), f"{lv.file_bytes / 1e6:,.1f}", shown)
    console.print(files)

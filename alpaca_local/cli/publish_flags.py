"""The publishing side of `alpaca-local convert`: several levels in one read, split files, the card, the push.

`add_arguments` adds --split-max-size / --split-max-tensors / --card-quality / --card-text /
--adapter-gguf / --push to convert's parser; `wants_levels_route` says when convert takes
this route (several levels, a split, a measured card, an adapter GGUF, a push);
`run_levels` plans every level, writes them all from one read of the source with a
progress bar per output, measures them if asked, writes the model card (README.md) into
the output folder, pushes the folder if asked, and prints one summary.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

from alpaca_local.errors import UsageError

HELP_EXAMPLES = """publishing (several levels from one read of the source, split files, card, upload):
  alpaca-local convert ./alpaca-7b --quant q8_0,q5_k_m,q4_k_m   # -> models/alpaca-7b/ (+ README.md card)
  alpaca-local convert ./alpaca-7b --quant publish -o out/ --card-quality   # measured KLD/PPL in the card
  alpaca-local convert ./llama-70b --quant q8_0 --split-max-size 45G   # NAME-00001-of-0000N.gguf parts
  alpaca-local convert ./alpaca-7b --quant publish --push me/alpaca-7b-GGUF --private"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    split = p.add_mutually_exclusive_group()
    split.add_argument(
        "--split-max-size", metavar="SIZE",
        help="write llama.cpp's split parts of at most SIZE of tensor data each (45G, 500M; as llama-gguf-split)",
    )
    split.add_argument("--split-max-tensors", metavar="N", type=int,
                       help="write llama.cpp's split parts of at most N tensors each")
    p.add_argument("--card-quality", action="store_true",
                   help="measure every level with `quality` (KLD, PPL, top-1 against f16) for the model card; "
                        "takes a few minutes per level on a 7B")
    p.add_argument("--card-text", metavar="FILE", type=Path,
                   help="with --card-quality: measure on this UTF-8 text (default: the built-in eval.txt)")
    p.add_argument("--push", metavar="ORG/NAME",
                   help="then push the folder's new files and card to this Hub repository (as `alpaca-local upload`)")
    p.add_argument("--adapter-gguf", metavar="OUTTYPE", nargs="?", const="f16", choices=("f32", "f16", "q8_0"),
                   help="with --lora: also write each adapter as a llama.cpp LoRA GGUF (default f16) into the "
                        "folder, beside the merged levels")
    from alpaca_local.cli.upload_cmd import add_push_options

    add_push_options(p, revision_flag="--push-revision")


def split_rule(args: argparse.Namespace):
    from alpaca_local.convert.split import SplitRule, parse_size

    if args.split_max_tensors is not None and args.split_max_tensors < 1:
        raise UsageError(f"--split-max-tensors {args.split_max_tensors} must be at least 1")
    size = parse_size(args.split_max_size) if args.split_max_size is not None else 0
    return SplitRule(max_bytes=size, max_tensors=args.split_max_tensors or 0)


def wants_folder(args: argparse.Namespace, levels: tuple[str, ...]) -> bool:
    """Several levels, a measured card or a push go into a folder, one file per level, with the
    model card; one level otherwise keeps -o as its file name."""
    return len(levels) > 1 or args.card_quality or args.push is not None or args.adapter_gguf is not None


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
    if folder.exists() and folder.resolve() == plans[0].source.resolve():
        raise UsageError(f"-o {folder} is the source folder; its README.md and files are the source's: "
                         "choose another folder")
    return folder, [default_output(plan, folder) for plan in plans]


@contextlib.contextmanager
def _output_folder(folder: Path | None) -> Iterator[None]:
    """Create the output folder if needed; if the run fails and it is still empty, remove it."""
    created = folder is not None and not folder.exists()
    if created:
        folder.mkdir()
    try:
        yield
    except BaseException:
        if created and not any(folder.iterdir()):
            folder.rmdir()
        raise


def run_levels(args: argparse.Namespace, err, levels: tuple[str, ...]) -> int:
    """Plan every level, check every target, write them all from one read, then the card; print the summary."""
    from alpaca_local.cli import lora_flags
    from alpaca_local.cli.calibrate_flags import check_calibrate
    from alpaca_local.convert.atomic import sigterm_as_interrupt
    from alpaca_local.source.hub import resolve_source

    split_rule(args)
    if args.calibrate is not None:
        check_calibrate(args, levels)
    text = _card_text(args)
    if args.adapter_gguf is not None and not args.lora:
        raise UsageError("--adapter-gguf writes the --lora adapters as adapter GGUFs; give --lora ADAPTER")
    if args.push is not None:  # a bad id or token fails now, not after the conversion
        from alpaca_local.publish.upload import check_repo_id, check_token

        check_token(check_repo_id(args.push))
    adapters = lora_flags.read_adapters(args)
    src = resolve_source(args.source, download=args.download, offline=args.offline)
    hub = None if isinstance(src, Path) else src
    try:
        with sigterm_as_interrupt():  # SIGTERM unwinds like Ctrl-C: the scratch folder goes too
            _run_levels(args, err, levels, src if hub is None else hub.folder, adapters, hub, text)
    finally:
        if hub:
            hub.close()
    return 0


def _run_levels(args: argparse.Namespace, err, levels, src: Path, adapters, hub, text) -> None:
    """Levels (and adapters), the measurement, the card, the push, the summary: in that order."""
    run = _Run(args, err, levels, src, adapters, hub)
    run.plan_outputs()
    with _output_folder(run.folder), contextlib.ExitStack() as scratch:
        run.write(scratch)
        if args.card_quality:
            run.measure(text)
        if run.folder is not None:
            run.write_card()
    if args.push is not None:
        run.push()
    _report(args, run)


def _card_text(args: argparse.Namespace) -> tuple[str | None, str]:
    """(--card-text's contents or None for the built-in text, how the card names it)."""
    if args.card_text is None:
        return None, "the built-in evaluation text (alpaca_local/measure/data/eval.txt)"
    if not args.card_quality:
        raise UsageError("--card-text is the text --card-quality measures on; give --card-quality too")
    from alpaca_local.cli.quality_cmd import _read_text

    return _read_text(args.card_text), f"`{args.card_text.name}`"


class _Run:
    """One `convert --quant ...` run: plans, outputs, written levels, measured quality, card."""

    def __init__(self, args, err, levels, folder_src: Path, adapters, hub) -> None:
        self.args, self.err, self.levels, self.src, self.adapters, self.hub = args, err, levels, folder_src, adapters, hub
        self.rule = split_rule(args)
        # --card-quality measures against an f16: the f16 level, or one more output of the same read.
        self.extra_f16 = args.card_quality and "f16" not in levels
        self.quality = None
        self.card: Path | None = None
        self.pushed = None
        self.adapter_files: list = []  # convert.lora_gguf.AdapterResult of each --adapter-gguf file
        self.weights = hub.weights() if hub else None  # read once: a streamed file has one stream

    def plan(self, imatrix: Path | None):
        from alpaca_local.convert.levels import plan_levels

        levels = self.levels + (("f16",) if self.extra_f16 else ())
        expect = imatrix is None and self.args.calibrate is not None  # --calibrate: the imatrix comes later
        if self.hub is None:
            return plan_levels(self.src, levels, imatrix, adapters=self.adapters, expect_imatrix=expect)
        return plan_levels(self.src, levels, imatrix, adapters=self.adapters, weights=self.weights,
                           name=self.hub.name, expect_imatrix=expect)

    def plan_outputs(self) -> None:
        self.plans = self.plan(self.args.imatrix)
        self.folder, self.targets = output_targets(self.args, self.plans[:len(self.levels)])

    def _layouts(self, scratch_dir: Path | None):
        from alpaca_local.convert.levels import layout
        from alpaca_local.convert.pipeline import default_output

        targets = list(self.targets)
        if self.extra_f16:
            targets.append(default_output(self.plans[-1], scratch_dir))
        return [layout(p, t, self.rule) for p, t in zip(self.plans, targets)]

    def write(self, scratch: contextlib.ExitStack) -> None:
        import shutil
        import tempfile

        from alpaca_local.cli.calibrate_flags import calibrated_imatrix, calibrated_plan
        from alpaca_local.convert.atomic import check_targets

        scratch_dir = None
        if self.args.card_quality or self.args.adapter_gguf:  # the measurement's f16 and logits; the adapters
            scratch_dir = Path(tempfile.mkdtemp(prefix=".alpaca-scratch-", dir=self.folder))
            scratch.callback(shutil.rmtree, scratch_dir, ignore_errors=True)
        self.scratch_dir = scratch_dir
        outputs = self._layouts(scratch_dir)
        published = [t for out in outputs[:len(self.levels)] for t in out.targets]
        card = [self.folder / "README.md"] if self.folder is not None else []
        # Everything that can be refused is refused before the work (and before a calibration run).
        check_targets(published + card + self._adapter_targets(), self.args.force,
                      sum(out.plan.tensor_bytes for out in outputs))
        written = self._write_adapters(scratch_dir)  # small, and refused (DoRA...) before the long part
        if self.args.calibrate is None:
            self.result = _write_with_progress(outputs, self.args, self.err, self.hub.verify if self.hub else None)
        else:
            with calibrated_imatrix(self.args, self.err, self.folder or self.targets[0].parent) as imatrix:
                self.plans = tuple(calibrated_plan(p, self.args) for p in self.plan(imatrix))
                self.result = _write_with_progress(self._layouts(scratch_dir), self.args, self.err, None)
        for result, target in zip(written, self._adapter_targets()):  # beside the levels, now they are there
            os.replace(result.output, target)
            self.adapter_files.append(dataclasses.replace(result, output=target))

    def _adapter_targets(self) -> list[Path]:
        from alpaca_local.convert.lora_gguf import default_adapter_output

        if self.args.adapter_gguf is None:
            return []
        return [default_adapter_output(a, self.args.adapter_gguf, self.folder) for a in self.adapters]

    def _write_adapters(self, scratch_dir: Path | None) -> list:
        """Each --lora adapter as llama.cpp's adapter GGUF (convert ADAPTER --base BASE), in the scratch folder."""
        from alpaca_local.convert.lora_gguf import write_adapter_gguf

        return [write_adapter_gguf(a, self.src, scratch_dir / target.name, self.args.adapter_gguf, force=True,
                                   base_weights=self.weights, base_name=self.plans[0].base_name)
                for a, target in zip(self.adapters, self._adapter_targets())]

    @property
    def published(self):
        """The levels asked for (the measurement's own f16 is not one of them)."""
        return self.result.levels[:len(self.levels)]

    def measure(self, text: tuple[str | None, str]) -> None:
        from alpaca_local.measure.quality import BASELINE, measure_files

        by_quant = {lv.quant: lv.paths[0] for lv in self.result.levels}
        files = [(lv.quant, lv.paths[0]) for lv in self.published if lv.quant != BASELINE]
        with self.err.status("measuring quality", spinner="dots") as status:
            self.quality = measure_files(by_quant[BASELINE], files, text[0], work=self.scratch_dir,
                                         threads=self.args.threads, gen_tokens=0,
                                         status=lambda line: status.update(line), name=self.plans[0].name)
        self.quality_text = text[1]

    def write_card(self) -> None:
        from alpaca_local.publish.card import card_facts, render_card, write_card

        facts = card_facts(self.plans[:len(self.levels)], self.published, source=Path(self.args.source).name,
                           hub=self.hub, quality=self.quality, quality_text=getattr(self, "quality_text", ""),
                           license_folder=self.src, adapter_files=self.adapter_files)
        self.card = write_card(self.folder, render_card(facts), self.args.force)

    def push(self) -> None:
        """The files of this run and the card, in one commit; on failure they stay in the folder."""
        from alpaca_local.cli.upload_cmd import show_progress
        from alpaca_local.publish.upload import upload

        names = [p.name for lv in self.published for p in lv.paths] + [r.output.name for r in self.adapter_files]
        names.append(self.card.name)
        hint = f"the files are kept in {self.folder}: push them with `alpaca-local upload {self.folder} {self.args.push}`"
        self.pushed = upload(self.folder, self.args.push, private=self.args.private,
                             revision=self.args.push_revision, names=names, resume=hint,
                             progress=show_progress(self.args.json))


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


def _report(args: argparse.Namespace, run: _Run) -> None:
    plans, folder, result, hub = run.plans, run.folder, run.result, run.hub
    summary = {
        "folder": str(folder) if folder is not None else None,
        "outputs": [{"quant": lv.quant, "files": [str(p) for p in lv.paths], "size_bytes": lv.file_bytes,
                     "tensors": lv.n_tensors} for lv in run.published],
        "card": str(run.card) if run.card else None,
        "seconds": round(result.seconds, 2),
        "peak_memory_bytes": result.peak_rss_bytes,
        "notes": list(plans[0].notes),
        "imatrix": dict(next((p.imatrix_kv for p in plans if p.imatrix_kv), ())) or None,
    }
    if run.adapter_files:
        summary["adapter_ggufs"] = [{"file": str(r.output), "outtype": r.outtype, "size_bytes": r.file_bytes,
                                     "tensors": r.n_tensors} for r in run.adapter_files]
    if run.quality is not None:
        summary["quality"] = run.quality.as_dict()
    if run.pushed is not None:
        summary["pushed"] = {"repo": run.pushed.repo_id, "revision": run.pushed.revision,
                             "commit": run.pushed.commit, "commit_url": run.pushed.commit_url}
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
    for lv in run.published:
        names = [p.name for p in lv.paths]
        shown = names[0] if len(names) == 1 else f"{names[0]} ... ({len(names)} parts)"
        files.add_row(lv.quant.upper(), f"{lv.file_bytes / 1e6:,.1f}", shown)
    for r in run.adapter_files:
        files.add_row(f"LoRA {r.outtype.upper()}", f"{r.file_bytes / 1e6:,.1f}", r.output.name)
    console.print(files)
    if run.card:
        console.print(f"model card: {run.card}" + (" (with the measured quality)" if run.quality else ""))
    if run.pushed:
        console.print(f"pushed to {run.pushed.repo_id} ({run.pushed.revision}): {run.pushed.commit_url}")

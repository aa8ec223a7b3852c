"""`alpaca-local quality`: flags, status line, table, JSON and plot around `quality.measure_quality`.

JSON (`--json`), one object:
    model, n_ctx, text_tokens, chunks, scored_tokens,
    levels: [{quant, path, size_bytes, bits_per_weight, perplexity, perplexity_err,
              ppl_ratio, mean_kld, mean_kld_err, kld_p99, same_top, same_top_err,
              prompt_tokens_per_s, gen_tokens_per_s, kind}, ...]   (f16 first)
`same_top` is a fraction (0..1); `*_err` are the "±" llama-perplexity prints.
`kind` is "level", "target" (a --target-size mix made here) or "file" (an --also file). A per-tensor
mix (quant "target-253M") adds target_bytes (its budget) and nearest_level (its general.file_type);
a --target-size given as a level adds target_of (that level).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from alpaca_local.cli import cpu_flags
from alpaca_local.measure.quality import DEFAULT_CTX, DEFAULT_GEN_TOKENS, DEFAULT_QUANTS

if TYPE_CHECKING:
    from rich.console import Console

    from alpaca_local.measure.quality import QualityReport

DESCRIPTION = """Measure what each quant level costs and loses against f16 on a text:
file size, bits per weight, perplexity, KL divergence from f16 (mean and 99th
percentile), how often the most likely next token agrees with f16, and speed.
The method and definitions are llama.cpp's `llama-perplexity --kl-divergence`
(the second half of each --ctx chunk is scored).

From a Hugging Face folder every level is converted with our converter and kept
in --work for the next run; from an f16 GGUF each level is made with llama.cpp's
quantizer (llama_model_quantize, default parameters: what llama-quantize does)."""

EXAMPLES = """examples:
  alpaca-local quality ./alpaca-7b                          # f16 vs q4_0, q4_k_m, q5_k_m, q8_0
  alpaca-local quality models/alpaca-7b.F16.gguf --quants q4_k_m,q8_0 --text notes.txt
  alpaca-local quality ./alpaca-7b --json > quality.json
  alpaca-local quality ./alpaca-7b --plot quality.png       # needs: pip install 'alpaca-local[plot]'
  alpaca-local quality ./alpaca-7b --quants q4_k_m --imatrix alpaca.imatrix.gguf   # plain vs imatrix
  alpaca-local quality ./alpaca-7b --imatrix i.gguf --target-size q4_k_m,3.5G   # mixes beside the levels
  alpaca-local quality ./alpaca-7b --also models/alpaca-7b.TARGET-4.2G.gguf,other.Q4_K_M.gguf

The default text (alpaca_local/data/eval.txt) is short: for numbers you can compare
with published ones, give a long text such as wikitext-2's test set with --text.
exit codes: 0 done, 1 bad input or failed run, 2 usage error, 130 interrupted."""


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(
        name, help=help_text, description=DESCRIPTION, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="MODEL_DIR_OR_F16_GGUF", type=Path,
                   help="Hugging Face model folder, or an f16 .gguf file")
    p.add_argument("--quants", default=",".join(DEFAULT_QUANTS), metavar="LIST",
                   help=f"comma-separated levels to compare with f16, any of convert's (any case), or 'all' "
                        f"for the whole ladder (default: {','.join(DEFAULT_QUANTS)}); the levels that need an "
                        "importance matrix need --imatrix")
    p.add_argument("--text", type=Path, metavar="FILE", help="evaluation text, UTF-8 (default: the shipped eval.txt)")
    p.add_argument("--ctx", type=int, default=DEFAULT_CTX, metavar="N", help=f"tokens per chunk (default: {DEFAULT_CTX})")
    p.add_argument("--work", type=Path, metavar="DIR",
                   help="where converted files are kept and reused (default: models/quality/<model name>)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for llama.cpp (default: its own choice)")
    p.add_argument("--gen-tokens", type=int, default=DEFAULT_GEN_TOKENS, metavar="N",
                   help=f"tokens generated to time generation (default: {DEFAULT_GEN_TOKENS})")
    p.add_argument("--imatrix", type=Path, metavar="FILE",
                   help="also measure each level quantized with this importance matrix, side by side")
    p.add_argument("--target-size", metavar="LIST",
                   help="also make and measure the per-tensor mix `convert --target-size` writes for each size "
                        "(253M, 4.2G, as convert takes it) or level (q4_k_m: the size of its file), comma-separated; "
                        "with --imatrix, weighted by it; needs the Hugging Face folder")
    p.add_argument("--also", metavar="FILE[,FILE]",
                   help="also measure these GGUF files of the same model as they are (e.g. a convert --target-size "
                        "file, or someone else's quant)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--plot", type=Path, metavar="OUT.png", help="also draw quality against size (needs matplotlib)")
    cpu_flags.add_no_repack(p)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from alpaca_local.errors import UsageError
    from alpaca_local.measure.quality import measure_quality, parse_quants

    quants = parse_quants(args.quants)
    targets = parse_targets(args.target_size) if args.target_size is not None else []
    also = [Path(p.strip()) for p in args.also.split(",") if p.strip()] if args.also is not None else []
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise UsageError(f"--threads {args.threads} is out of range; give 1 to 1024")
    if args.gen_tokens < 0:
        raise UsageError(f"--gen-tokens {args.gen_tokens} is negative; give 0 to skip the generation timing")
    if args.plot is not None:
        _check_plot_target(args.plot)  # before the long run, not after it
    text = _read_text(args.text) if args.text is not None else None
    err = Console(stderr=True)
    with err.status("starting", spinner="dots") as status:
        report = measure_quality(
            args.source, quants, text, args.ctx, args.work, args.threads, args.gen_tokens,
            status=lambda line: status.update(line), imatrix=args.imatrix, no_repack=args.no_repack,
            targets=targets, also=also,
        )
    if args.plot is not None:
        write_plot(report, args.plot)
    if args.json:
        import json

        print(json.dumps(report.as_dict(), indent=2))
    else:
        _print_table(report, Console())
        if args.plot is not None:
            Console().print(f"plot written to {args.plot}")
    return 0


def parse_targets(spec: str) -> list:
    """"253M,q4_k_m" -> SizeTargets: a size as `convert --target-size` takes it, or a level name."""
    from alpaca_local.cli.target_flags import parse_size
    from alpaca_local.convert.quant_levels import canonical, usable
    from alpaca_local.errors import UsageError
    from alpaca_local.measure.quality import SizeTarget

    targets = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if item[0].isdigit() or item[0] in ".-":
            targets.append(SizeTarget(item, nbytes=parse_size(item)))
            continue
        try:
            canonical(item)
        except UsageError:
            raise UsageError(f"--target-size {item!r} is neither a size (bytes, or 253M, 4.2G, 512MiB) nor a quant "
                             "level (q4_k_m: the size of that level's file)") from None
        targets.append(SizeTarget(item, level=usable(item).name))
    if not targets:
        raise UsageError(f"--target-size {spec!r} names no size; e.g. --target-size 253M,q4_k_m")
    return targets


def _read_text(path: Path) -> str:
    from alpaca_local.errors import InputError

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"--text {path} does not exist; give a UTF-8 text file") from None
    except IsADirectoryError:
        raise InputError(f"--text {path} is a folder; give a UTF-8 text file") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"--text {path} is not UTF-8 text (byte {exc.start}); give a UTF-8 text file") from None
    if not text.strip():
        raise InputError(f"--text {path} is empty; give a text of a few thousand words")
    return text


def _check_plot_target(path: Path) -> None:
    from alpaca_local.errors import UsageError

    try:
        import matplotlib  # noqa: F401  (only checking it is installed)
    except ImportError:
        raise UsageError("--plot needs matplotlib; install it with: pip install 'alpaca-local[plot]'") from None
    if path.is_dir() or not path.parent.is_dir():
        raise UsageError(f"--plot {path}: give a file name in an existing folder, e.g. quality.png")


def write_plot(report: QualityReport, path: Path) -> None:
    """Two panels against file size: mean KLD (with its 99th percentile; log scale, so the
    whole ladder from q8_0 to iq1_s reads on one axis) and perplexity."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    from alpaca_local.measure.quality import BASELINE, IMATRIX_TAG

    levels = sorted(report.levels, key=lambda lv: lv.size_bytes)  # lines run left to right
    size = [lv.size_bytes / 1e6 for lv in levels]
    wide = len(levels) > 8
    fig, (ax_kld, ax_ppl) = plt.subplots(1, 2, figsize=(14, 6) if wide else (10, 4), constrained_layout=True)
    quants = [lv for lv in levels if lv.quant != BASELINE and lv.stats.mean_kld > 0]  # log axis: no zero
    standard = lambda lv: lv.kind == "level"  # noqa: E731
    for label, pick, style in (("plain", lambda lv: standard(lv) and not lv.quant.endswith(IMATRIX_TAG), "o-"),
                               ("with imatrix", lambda lv: standard(lv) and lv.quant.endswith(IMATRIX_TAG), "^-"),
                               ("size targets", lambda lv: lv.target_bytes is not None, "D--"),
                               ("other files", lambda lv: not standard(lv) and lv.target_bytes is None, "X")):
        chosen = [lv for lv in quants if pick(lv)]
        if chosen:
            ax_kld.plot([lv.size_bytes / 1e6 for lv in chosen], [lv.stats.mean_kld for lv in chosen], style,
                        label=f"mean KLD, {label}")
    ax_kld.plot([lv.size_bytes / 1e6 for lv in quants], [lv.stats.kld_p99 for lv in quants], "s", alpha=0.4,
                label="99th percentile")
    if quants:
        ax_kld.set_yscale("log")
    ax_kld.set_ylabel("KL divergence from f16 (nats)")
    ax_kld.legend()
    line = [lv for lv in levels if lv.kind == "level"]
    ax_ppl.errorbar([lv.size_bytes / 1e6 for lv in line], [lv.stats.perplexity for lv in line],
                    yerr=[lv.stats.perplexity_err for lv in line], fmt="o-", capsize=3, label="levels")
    others = [lv for lv in levels if lv.kind != "level"]
    if others:
        ax_ppl.errorbar([lv.size_bytes / 1e6 for lv in others], [lv.stats.perplexity for lv in others],
                        yerr=[lv.stats.perplexity_err for lv in others], fmt="D", capsize=3,
                        label="size targets and other files")
        ax_ppl.legend()
    ax_ppl.set_ylabel("perplexity")
    for ax, key in ((ax_kld, "mean_kld"), (ax_ppl, "perplexity")):
        ax.set_xlabel("file size (MB)")
        ax.grid(alpha=0.3)
        for lv, x in zip(levels, size):
            if ax is ax_kld and lv not in quants:
                continue
            ax.annotate(lv.label, (x, getattr(lv.stats, key)), textcoords="offset points", xytext=(4, 4),
                        fontsize=7 if wide else 10, rotation=30 if wide else 0)
    fig.suptitle(f"{report.model}: quality against size (ctx {report.n_ctx}, {report.n_scored} scored tokens)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def imatrix_comparison(report: QualityReport) -> list[str]:
    """One line per level measured with and without an imatrix: KLD and size ratios."""
    from alpaca_local.measure.quality import IMATRIX_TAG

    plain = {lv.quant: lv for lv in report.levels}
    lines = []
    for lv in report.levels:
        base = plain.get(lv.quant.removesuffix(IMATRIX_TAG)) if lv.quant.endswith(IMATRIX_TAG) else None
        if base is not None and base.stats.mean_kld > 0:
            lines.append(
                f"{lv.quant}: mean KLD {lv.stats.mean_kld / base.stats.mean_kld:.2f}x, PPL/f16 "
                f"{lv.stats.ppl_ratio:.4f} vs {base.stats.ppl_ratio:.4f}, same top {100 * lv.stats.same_top:.2f}% vs "
                f"{100 * base.stats.same_top:.2f}%, size {lv.size_bytes / base.size_bytes:.3f}x of plain {base.quant}"
            )
    return lines


def target_notes(report: QualityReport) -> list[str]:
    """One line per per-tensor mix: the budget it was made for and the level its file type names."""
    lines = []
    for lv in report.levels:
        if lv.target_bytes is not None:
            of = f", the size of the {lv.target_of} file" if lv.target_of else ""
            made = "made here" if lv.kind == "target" else lv.path.name
            lines.append(f"{lv.label}: per-tensor mix for {lv.target_bytes:,} bytes{of} (convert --target-size, "
                         f"{made}), labelled {(lv.nearest_level or '?').upper()}")
    return lines


def _table(report: QualityReport, compact: bool):
    """The table; `compact`: narrower headings, no "±" (the --json has them), for 80 columns."""
    from rich import box
    from rich.table import Table

    table = Table(title=f"{report.model}: quality against f16", box=box.SIMPLE_HEAD, show_edge=not compact,
                  padding=0 if compact else (0, 1))  # compact: the box's one space between columns
    heads = (("level", "MB", "bpw", "PPL", "/f16", "KLD", "KLD p99", "top1", "pp t/s", "tg t/s") if compact else
             ("level", "size MB", "bpw", "PPL", "PPL/f16", "mean KLD", "KLD p99", "same top", "prompt t/s", "gen t/s"))
    for col in heads:
        table.add_column(col, justify="left" if col == "level" else "right", no_wrap=True)
    pm = (lambda err: "") if compact else (lambda err: f" ± {err}")  # noqa: E731
    for lv in report.levels:
        s = lv.stats
        table.add_row(
            lv.label, f"{lv.size_bytes / 1e6:,.1f}", f"{lv.bits_per_weight:.2f}",
            f"{s.perplexity:.4g}{pm(f'{s.perplexity_err:.2g}')}", f"{s.ppl_ratio:.4f}",
            f"{s.mean_kld:.5f}{pm(f'{s.mean_kld_err:.5f}')}", f"{s.kld_p99:.5f}",
            f"{100 * s.same_top:.{1 if compact else 2}f}{pm(f'{100 * s.same_top_err:.2f}')}%",
            f"{lv.prompt_tokens_per_s:,.0f}",
            "-" if lv.gen_tokens_per_s is None else f"{lv.gen_tokens_per_s:,.{0 if compact else 1}f}",
        )
    return table


def _print_table(report: QualityReport, console: Console) -> None:
    from rich.console import Console

    from alpaca_local.measure.quality import KLD_MIN_COUNT

    table = _table(report, compact=False)
    width = console.measure(table, options=console.options.update_width(10_000)).maximum
    compact = console.is_terminal and width > console.width
    if not console.is_terminal:  # piped: the whole table, as wide as it is
        console = Console(width=max(console.width, width))
    elif compact:  # a narrow terminal (80 columns): the same rows without the ± columns
        table = _table(report, compact=True)
    console.print(table)
    if compact:
        console.print("(narrow terminal: the ± of PPL, KLD and top1 are in --json; pp/tg t/s: prompt/generation)",
                      highlight=False)
    console.print(
        f"{report.n_chunks} chunks of {report.n_ctx} tokens ({report.n_text_tokens} in the text), "
        f"{report.n_scored} scored: the second half of each chunk, as llama-perplexity --kl-divergence. "
        "KLD in nats against f16; prompt t/s from the scoring passes (logits for every position)."
    )
    for line in imatrix_comparison(report) + target_notes(report):
        console.print(line, highlight=False)
    if report.n_scored < KLD_MIN_COUNT:
        console.print(f"[yellow]only {report.n_scored} scored tokens: llama.cpp prints no statistics below "
                      f"{KLD_MIN_COUNT}; use a longer --text or a smaller --ctx")

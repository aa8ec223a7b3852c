"""`alpaca-local quality`: flags, status line, table, JSON and plot around `quality.measure_quality`.

JSON (`--json`), one object:
    model, n_ctx, text_tokens, chunks, scored_tokens,
    levels: [{quant, path, size_bytes, bits_per_weight, perplexity, perplexity_err,
              ppl_ratio, mean_kld, mean_kld_err, kld_p99, same_top, same_top_err,
              prompt_tokens_per_s, gen_tokens_per_s}, ...]   (f16 first)
`same_top` is a fraction (0..1); `*_err` are the "±" llama-perplexity prints.
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
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--plot", type=Path, metavar="OUT.png", help="also draw quality against size (needs matplotlib)")
    cpu_flags.add_no_repack(p)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from alpaca_local.errors import UsageError
    from alpaca_local.measure.quality import measure_quality, parse_quants

    quants = parse_quants(args.quants)
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
    for label, pick, style in (("plain", lambda lv: not lv.quant.endswith(IMATRIX_TAG), "o-"),
                               ("with imatrix", lambda lv: lv.quant.endswith(IMATRIX_TAG), "^-")):
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
    ax_ppl.errorbar(size, [lv.stats.perplexity for lv in levels], yerr=[lv.stats.perplexity_err for lv in levels],
                    fmt="o-", capsize=3)
    ax_ppl.set_ylabel("perplexity")
    for ax, key in ((ax_kld, "mean_kld"), (ax_ppl, "perplexity")):
        ax.set_xlabel("file size (MB)")
        ax.grid(alpha=0.3)
        for lv, x in zip(levels, size):
            if ax is ax_kld and lv not in quants:
                continue
            ax.annotate(lv.quant, (x, getattr(lv.stats, key)), textcoords="offset points", xytext=(4, 4),
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


def _print_table(report: QualityReport, console: Console) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from alpaca_local.measure.quality import KLD_MIN_COUNT

    if not console.is_terminal:  # piped: rich would squeeze the table into 80 columns
        console = Console(width=max(console.width, 120))
    table = Table(title=f"{report.model}: quality against f16", box=box.SIMPLE_HEAD)
    heads = ("level", "size MB", "bpw", "PPL", "PPL/f16", "mean KLD", "KLD p99", "same top", "prompt t/s", "gen t/s")
    for col in heads:
        table.add_column(col, justify="left" if col == "level" else "right", no_wrap=True)
    for lv in report.levels:
        s = lv.stats
        table.add_row(
            lv.quant, f"{lv.size_bytes / 1e6:,.1f}", f"{lv.bits_per_weight:.2f}",
            f"{s.perplexity:.4g} ± {s.perplexity_err:.2g}", f"{s.ppl_ratio:.4f}",
            f"{s.mean_kld:.5f} ± {s.mean_kld_err:.5f}", f"{s.kld_p99:.5f}",
            f"{100 * s.same_top:.2f} ± {100 * s.same_top_err:.2f}%",
            f"{lv.prompt_tokens_per_s:,.0f}", "-" if lv.gen_tokens_per_s is None else f"{lv.gen_tokens_per_s:,.1f}",
        )
    console.print(table)
    console.print(
        f"{report.n_chunks} chunks of {report.n_ctx} tokens ({report.n_text_tokens} in the text), "
        f"{report.n_scored} scored: the second half of each chunk, as llama-perplexity --kl-divergence. "
        "KLD in nats against f16; prompt t/s from the scoring passes (logits for every position)."
    )
    for line in imatrix_comparison(report):
        console.print(line)
    if report.n_scored < KLD_MIN_COUNT:
        console.print(f"[yellow]only {report.n_scored} scored tokens: llama.cpp prints no statistics below "
                      f"{KLD_MIN_COUNT}; use a longer --text or a smaller --ctx")

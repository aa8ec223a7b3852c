"""Time, peak memory and disk written of `convert --quant L1,...,L5` against llama.cpp's publishing route.

Builds the LLaMA-shaped f16 checkpoint of benchmarks/convert.py (1B by default), then on
the same warm page cache:
  ours:      alpaca-local convert SRC --quant L1,L2,... -o DIR   (one read, every level)
  reference: convert_hf_to_gguf.py --outtype f16, then llama_model_quantize once per level
             (default params, each a process of its own, as a publisher runs llama-quantize)
  separate:  alpaca-local convert SRC --quant Li, once per level (with --separate)
and prints wall time, peak RSS and the bytes each route writes to disk (its files: the
reference's f16 copy included), and the ratios. Targets (issue 26): ours ≤ 0.7x the
reference's time and ≤ 0.3x its disk written.

    python benchmarks/publish.py [--size 1b|7b|tiny] [--levels q8_0,q6_k,...] [--separate] [--work DIR] [--json F]

The default levels are the `publish` set as this build knows it, filled up to five with the
other quantized levels it knows (f16 is not one: publishing f16 is the reference's first step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from convert import QUANTIZE, SIZES, measure  # noqa: E402

TIME_TARGET, DISK_TARGET = 0.7, 0.3


def default_levels(n: int = 5) -> list[str]:
    from alpaca_local.convert.quant_levels import LEVELS, SETS

    levels = list(SETS["publish"])
    levels += [q for q in SETS["all"] if q not in levels and not LEVELS[q].converter_outtype
               and not LEVELS[q].imatrix and not LEVELS[q].trained_for]
    return levels[:n]


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run(size: str, levels: list[str], work_root: Path, separate: bool) -> dict:
    from reference import vendor_dir

    work = work_root / f"llama-{size}"
    work.mkdir(parents=True, exist_ok=True)
    src, py = work / "src", sys.executable
    # Built in a child: a parent's peak RSS would carry into every measured child.
    subprocess.run([py, str(HERE / "convert.py"), "--size", size, "--work", str(work_root), "--build-only"], check=True)
    for f in src.glob("*.safetensors"):  # warm the page cache for every route alike
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    result = {"size": size, "levels": levels, "source_bytes": sum(f.stat().st_size for f in src.glob("*.safetensors")),
              "load_before": _load()}

    ours_dir = work / "publish-ours"
    shutil.rmtree(ours_dir, ignore_errors=True)
    s, peak = measure([py, "-m", "alpaca_local", "convert", str(src), "--quant", ",".join(levels), "-o", str(ours_dir),
                       "--json"])
    result["ours"] = {"s": s, "peak": peak, "disk": _size(ours_dir),
                      "files": {p.name: p.stat().st_size for p in sorted(ours_dir.iterdir())}, "load_after": _load()}

    ref_dir = work / "publish-ref"
    shutil.rmtree(ref_dir, ignore_errors=True)
    ref_dir.mkdir()
    f16 = ref_dir / "ref.F16.gguf"
    steps = [("convert_hf_to_gguf f16", *measure([py, str(vendor_dir() / "convert_hf_to_gguf.py"), str(src),
                                                  "--outtype", "f16", "--outfile", str(f16)]))]
    for q in levels:
        steps.append((f"llama-quantize {q}", *measure([py, "-c", QUANTIZE, str(f16), str(ref_dir / f"ref.{q}.gguf"), q])))
    result["reference_files"] = {p.name: p.stat().st_size for p in sorted(ref_dir.iterdir())}
    result["reference"] = {"s": sum(x[1] for x in steps), "peak": max(x[2] for x in steps), "disk": _size(ref_dir),
                           "steps": [{"step": n, "s": t, "peak": p} for n, t, p in steps], "load_after": _load()}
    shutil.rmtree(ref_dir, ignore_errors=True)

    if separate:
        runs = []
        for q in levels:
            out = work / f"separate.{q}.gguf"
            t, p = measure([py, "-m", "alpaca_local", "convert", str(src), "-q", q, "-o", str(out), "--force", "--json"])
            runs.append({"level": q, "s": t, "peak": p, "disk": out.stat().st_size})
            out.unlink()
        result["separate"] = {"s": sum(r["s"] for r in runs), "peak": max(r["peak"] for r in runs),
                              "disk": sum(r["disk"] for r in runs), "runs": runs, "load_after": _load()}
    shutil.rmtree(ours_dir, ignore_errors=True)
    return result


def markdown(r: dict) -> list[str]:
    ours, ref, sep = r["ours"], r["reference"], r.get("separate")
    mb = lambda n: f"{n / 1e6:,.0f}"  # noqa: E731
    t, d = ours["s"] / ref["s"], ours["disk"] / ref["disk"]
    levels_bytes = sum(v for k, v in ours["files"].items() if k.endswith(".gguf"))
    ref_levels = sum(v for k, v in r["reference_files"].items() if k.endswith(".gguf") and ".F16." not in k)
    lines = [
        (f"{r['size']} LLaMA-shaped model ({r['source_bytes'] / 1e9:.2f} GB f16), levels {', '.join(r['levels'])}. "
         "Reference: vendored `convert_hf_to_gguf.py --outtype f16`, then `llama_model_quantize` (default "
         "parameters) once per level, each its own process; its time and disk are the sums, its peak the largest "
         f"step's. Load average (1, 5, 15 min) before: {r['load_before']}; after ours: {ours['load_after']}; "
         f"after the reference: {ref['load_after']}."),
        "",
        "| route | seconds | peak MB | disk written MB |",
        "|---|---:|---:|---:|",
        f"| ours: convert --quant {','.join(r['levels'])} (one read) | {ours['s']:.1f} | {mb(ours['peak'])} | "
        f"{mb(ours['disk'])} |",
        f"| reference: f16, then {len(r['levels'])} × llama-quantize | {ref['s']:.1f} | {mb(ref['peak'])} | "
        f"{mb(ref['disk'])} |",
    ]
    if sep:
        lines.append(f"| ours, one convert per level | {sep['s']:.1f} | {mb(sep['peak'])} | {mb(sep['disk'])} |")
    lines += [
        "",
        "| ratio | value | target |",
        "|---|---:|---|",
        f"| ours / reference time | {t:.2f}x | ≤ {TIME_TARGET}x: {'yes' if t <= TIME_TARGET else '**no**'} |",
        f"| ours / reference disk written | {d:.2f}x | ≤ {DISK_TARGET}x: {'yes' if d <= DISK_TARGET else '**no**'} |",
        f"| ours / reference peak | {ours['peak'] / ref['peak']:.2f}x | - |",
        f"| disk written besides the published levels: ours / reference | {mb(ours['disk'] - levels_bytes)} MB / "
        f"{mb(ref['disk'] - ref_levels)} MB | - |",
        f"| published levels / f16 size | {levels_bytes / r['source_bytes']:.2f}x | - |",
    ]
    if sep:
        lines += [f"| ours / one convert per level, time | {ours['s'] / sep['s']:.2f}x | - |",
                  f"| ours peak / largest single-level peak | {ours['peak'] / sep['peak']:.2f}x | - |"]
    lines += ["", "Reference steps: " + ", ".join(f"{x['step']} {x['s']:.1f} s" for x in ref["steps"]) + "."]
    if sep:
        lines.append("Single-level converts: " + ", ".join(
            f"{x['level']} {x['s']:.1f} s, peak {mb(x['peak'])} MB" for x in sep["runs"]) + ".")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--levels", help="comma-separated levels (default: the publish set, filled up to five)")
    ap.add_argument("--separate", action="store_true", help="also time one alpaca-local convert per level")
    ap.add_argument("--work", type=Path, default=HERE / "out")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    levels = args.levels.split(",") if args.levels else default_levels()
    result = run(args.size, levels, args.work, args.separate)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("\n".join(markdown(result)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

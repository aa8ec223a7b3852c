"""Time and peak memory of `alpaca-local convert` against llama.cpp's own two-step route.

Builds a LLaMA-shaped f16 checkpoint with random weights (1B by default:
TinyLlama-1.1B's shape, vocab 32001 with Alpaca's [PAD]), then for each quant
runs, in this one process tree and on the same warm page cache:
  ours:      alpaca-local convert SRC --quant Q
  reference: convert_hf_to_gguf.py --outtype f16, then llama_model_quantize (default params)
and prints wall time, peak RSS and bytes written of each, and the ratios. The reference's f16
step runs once and its time, memory and disk count towards every quant. Levels that
llama-quantize refuses without an importance matrix get the same synthetic one on both routes
(`--imatrix` / `params.imatrix`, built from the f16 file's shapes as tests/test_imatrix_convert.py
builds it). For bf16/f32 the reference is the converter alone (`--outtype bf16`).

    python benchmarks/convert.py [--size 1b|7b|tiny] [--quants q4_k_m,q8_0,q4_0] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SIZES = {
    # name: hidden, layers, heads, kv heads, intermediate, vocab
    "tiny": (512, 4, 8, 4, 1408, 32001),
    "1b": (2048, 22, 32, 4, 5632, 32001),
    "7b": (4096, 32, 32, 32, 11008, 32001),
}


def build_model(folder: Path, size: str) -> Path:
    """A sharded f16 safetensors LLaMA folder, written one shard at a time (bounded memory)."""
    from safetensors.numpy import save_file

    import tinymodels

    if (folder / "config.json").exists():
        return folder
    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    tiny = tinymodels.build_llama(folder, hidden=256, n_layer=1, n_head=4, n_kv_head=2, intermediate=256)
    for f in tiny.weight_files:
        f.unlink()
    cfg = dict(tiny.config, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab, head_dim=hidden // heads)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(0)
    hd = hidden // heads

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * (1 / np.sqrt(shape[-1]))).astype(np.float16)

    shards: list[dict[str, np.ndarray]] = [{
        "model.embed_tokens.weight": rand(vocab, hidden),
        "lm_head.weight": rand(vocab, hidden),
        "model.norm.weight": np.ones(hidden, np.float16),
    }]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append({
            p + "self_attn.q_proj.weight": rand(heads * hd, hidden),
            p + "self_attn.k_proj.weight": rand(kv * hd, hidden),
            p + "self_attn.v_proj.weight": rand(kv * hd, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * hd),
            p + "mlp.gate_proj.weight": rand(inter, hidden),
            p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
            p + "input_layernorm.weight": np.ones(hidden, np.float16),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float16),
        })
    weight_map, total = {}, 0
    for k, part in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(folder / name), metadata={"format": "pt"})
        for t, a in part.items():
            weight_map[t] = name
            total += a.nbytes
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


def measure(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{err[-2000:]}")
    return seconds, usage.ru_maxrss * 1024


QUANTIZE = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[5])
import reference
reference.reference_quantize(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]) if sys.argv[4] else None)
"""


def _needs_imatrix(quant: str, src: Path, f16: Path, out: Path) -> int:
    """Child: print yes (after writing one importance matrix for both routes, once) or no."""
    from alpaca_local.convert.pipeline import levels_needing_imatrix, plan_conversion

    if not levels_needing_imatrix(plan_conversion(src, "f16"), [quant]):
        print("no")
        return 0
    if not out.exists():  # skewed per-column weights for every block matrix
        from test_imatrix_convert import synthetic_imatrix

        from alpaca_local.convert.imatrix_file import write_imatrix

        write_imatrix(synthetic_imatrix(f16), out)
    print("yes")
    return 0


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--needs-imatrix":
        return _needs_imatrix(sys.argv[2], *map(Path, sys.argv[3:]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--quants", default="q4_k_m,q8_0,q4_0")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from reference import vendor_dir

    work = args.work / f"llama-{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    src = work / "src"
    if args.build_only:
        build_model(src, args.size)
        return 0
    # Build in a child: Linux carries a parent's peak RSS into the children it
    # forks (maxrss survives exec), which would inflate every measurement below.
    subprocess.run([sys.executable, __file__, "--size", args.size, "--work", str(args.work), "--build-only"],
                   check=True)
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    for f in src.glob("*.safetensors"):  # warm the page cache for both routes alike
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    py = sys.executable
    ref_f16 = work / "ref.F16.gguf"
    ref_f16.unlink(missing_ok=True)
    f16_s, f16_rss = measure([py, str(vendor_dir() / "convert_hf_to_gguf.py"), str(src), "--outtype", "f16",
                              "--outfile", str(ref_f16)])
    from alpaca_local.convert.quant_levels import LEVELS, parse_list

    f16_bytes = ref_f16.stat().st_size
    imatrix = work / "synthetic.imatrix.gguf"
    rows = []
    for quant in parse_list(args.quants):
        # In a child, as the model build: this process's own peak must stay small.
        need = subprocess.run([py, __file__, "--needs-imatrix", quant, str(src), str(ref_f16), str(imatrix)],
                              capture_output=True, text=True, check=True).stdout.strip()
        imat = imatrix if need == "yes" else None
        out = work / f"ours.{quant}.gguf"
        ours_s, ours_rss = measure([py, "-m", "alpaca_local", "convert", str(src), "-q", quant, "-o", str(out),
                                    "--force", "--json", *(["--imatrix", str(imat)] if imat else [])])
        ours_written = out.stat().st_size
        if quant == "f16":
            ref_s, ref_rss, ref_written = f16_s, f16_rss, f16_bytes
        elif LEVELS[quant].converter_outtype:
            ref_out = work / f"ref.{quant}.gguf"
            ref_s, ref_rss = measure([py, str(vendor_dir() / "convert_hf_to_gguf.py"), str(src), "--outtype", quant,
                                      "--outfile", str(ref_out)])
            ref_written = ref_out.stat().st_size
            ref_out.unlink()
        else:
            ref_out = work / f"ref.{quant}.gguf"
            q_s, q_rss = measure([py, "-c", QUANTIZE, str(ref_f16), str(ref_out), quant, str(imat or ""),
                                  str(ROOT / "tests")])
            ref_s, ref_rss, ref_written = f16_s + q_s, max(f16_rss, q_rss), f16_bytes + ref_out.stat().st_size
            ref_out.unlink()
        out.unlink()
        rows.append({"quant": quant + ("+imatrix" if imat else ""), "ours_s": ours_s, "ref_s": ref_s,
                     "ours_peak": ours_rss, "ref_peak": ref_rss, "ours_written": ours_written,
                     "ref_written": ref_written, "load": os.getloadavg()[0]})
        print(f"{rows[-1]['quant']}: ours {ours_s:.1f}s, reference {ref_s:.1f}s (load {rows[-1]['load']:.1f})",
              file=sys.stderr, flush=True)
    ref_f16.unlink()
    imatrix.unlink(missing_ok=True)
    print(f"\n{args.size} model, {src_bytes / 1e9:.2f} GB of f16 weights; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
    print("| quant | ours s | reference s | time ratio | ours peak MB | reference peak MB | peak ratio "
          "| ours written MB | reference written MB | load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['quant']} | {r['ours_s']:.1f} | {r['ref_s']:.1f} | {r['ours_s'] / r['ref_s']:.2f}x | "
              f"{r['ours_peak'] / 1e6:.0f} | {r['ref_peak'] / 1e6:.0f} | {r['ours_peak'] / r['ref_peak']:.2f}x | "
              f"{r['ours_written'] / 1e6:.0f} | {r['ref_written'] / 1e6:.0f} | {r['load']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "source_bytes": src_bytes, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

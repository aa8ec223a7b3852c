"""Time and peak memory of `alpaca-local convert` against llama.cpp's own two-step route.

Builds a LLaMA-shaped f16 checkpoint with random weights (1B by default:
TinyLlama-1.1B's shape, vocab 32001 with Alpaca's [PAD]), then for each quant
runs, in this one process tree and on the same warm page cache:
  ours:      alpaca-local convert SRC --quant Q
  reference: convert_hf_to_gguf.py --outtype f16, then llama_model_quantize (default params)
and prints wall time and peak RSS of each, and the ratios. The reference's f16
step runs once and its time and memory count towards every quant.

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
import sys, llama_cpp
from alpaca_local.convert.quant_rules import QUANTS
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(QUANTS[sys.argv[3]])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""


def main() -> int:
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
    rows = []
    for quant in args.quants.split(","):
        out = work / f"ours.{quant}.gguf"
        ours_s, ours_rss = measure([py, "-m", "alpaca_local", "convert", str(src), "-q", quant, "-o", str(out),
                                    "--force", "--json"])
        if quant == "f16":
            ref_s, ref_rss = f16_s, f16_rss
        else:
            ref_out = work / f"ref.{quant}.gguf"
            q_s, q_rss = measure([py, "-c", QUANTIZE, str(ref_f16), str(ref_out), quant])
            ref_s, ref_rss = f16_s + q_s, max(f16_rss, q_rss)
            ref_out.unlink()
        out.unlink()
        rows.append({"quant": quant, "ours_s": ours_s, "ref_s": ref_s, "ours_peak": ours_rss, "ref_peak": ref_rss})
    ref_f16.unlink()
    print(f"\n{args.size} model, {src_bytes / 1e9:.2f} GB of f16 weights; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
    print("| quant | ours s | reference s | time ratio | ours peak MB | reference peak MB | peak / f16 size |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['quant']} | {r['ours_s']:.1f} | {r['ref_s']:.1f} | {r['ours_s'] / r['ref_s']:.2f}x | "
              f"{r['ours_peak'] / 1e6:.0f} | {r['ref_peak'] / 1e6:.0f} | {r['ours_peak'] / src_bytes:.1%} |")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "source_bytes": src_bytes, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

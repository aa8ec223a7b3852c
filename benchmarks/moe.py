"""Time and peak memory of `alpaca-local convert` on a wide mixture-of-experts model, against
llama.cpp's own two-step route.

Builds a Qwen3-MoE checkpoint of realistic width with random f16 weights (by default
hidden 2048, 32 heads / 4 KV heads of 128, 16 experts of width 768 with 4 used, 4 layers,
vocab 32000: Qwen3-30B-A3B's layer with fewer experts), one matrix per expert as
transformers 4.x saves it (config.json from transformers' Qwen3MoeConfig), one shard per
layer. Then, on the same warm page cache, for each quant:
  ours:      alpaca-local convert SRC --quant Q
  reference: convert_hf_to_gguf.py --outtype f16, then llama_model_quantize (default params)
and prints wall time and peak RSS of each and the ratios, with `uptime`'s load before
each run (the machine may be shared). Targets (issue 25): time <= 0.9x at q4_k_m, peak
RSS <= 0.25x. With --repeats N the routes alternate N times and the medians count.

    python benchmarks/moe.py [--layers 4] [--experts 16] [--quants q4_k_m,q8_0] [--repeats 1]
                             [--work DIR] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from convert import QUANTIZE, measure  # noqa: E402
from reference import _CONVERT_WITH_PRE  # noqa: E402

TIME_TARGET, PEAK_TARGET = 0.9, 0.25


def build_model(folder: Path, layers: int, experts: int, hidden: int = 2048, moe_ff: int = 768,
                vocab: int = 32000) -> Path:
    """A Qwen3-MoE folder with random f16 weights, written one layer (one shard) at a time."""
    from safetensors.numpy import save_file
    from transformers import Qwen3MoeConfig

    import tinyarch

    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True)
    n_tok, ids = tinyarch.qwen3_tokenizer(folder)
    heads, kv, hd = 32, 4, 128
    Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=6144, moe_intermediate_size=moe_ff,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
        num_experts=experts, num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=40960,
        rope_theta=1000000.0, tie_word_embeddings=False, bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"], torch_dtype="bfloat16", architectures=["Qwen3MoeForCausalLM"],
    ).save_pretrained(folder)
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])).astype(np.float16)

    shards = [{"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
               "model.norm.weight": np.ones(hidden, np.float16)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        part = {
            p + "self_attn.q_proj.weight": rand(heads * hd, hidden), p + "self_attn.k_proj.weight": rand(kv * hd, hidden),
            p + "self_attn.v_proj.weight": rand(kv * hd, hidden), p + "self_attn.o_proj.weight": rand(hidden, heads * hd),
            p + "self_attn.q_norm.weight": np.ones(hd, np.float16), p + "self_attn.k_norm.weight": np.ones(hd, np.float16),
            p + "input_layernorm.weight": np.ones(hidden, np.float16),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float16), p + "mlp.gate.weight": rand(experts, hidden),
        }
        for e in range(experts):
            q = f"{p}mlp.experts.{e}."
            part.update({q + "gate_proj.weight": rand(moe_ff, hidden), q + "up_proj.weight": rand(moe_ff, hidden),
                         q + "down_proj.weight": rand(hidden, moe_ff)})
        shards.append(part)
    weight_map, total = {}, 0
    for k, part in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(dict(sorted(part.items())), str(folder / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in part})
        total += sum(a.nbytes for a in part.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


def load() -> str:
    """`uptime`'s load averages (1, 5, 15 minutes), as the benchmark's context."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--quants", default="q4_k_m,q8_0")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--work", type=Path, default=HERE / "out")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from reference import vendor_dir

    work = args.work / f"qwen3moe-{args.layers}x{args.experts}"
    src = work / "src"
    if args.build_only:
        build_model(src, args.layers, args.experts)
        return 0
    # Build in a child: a parent's peak RSS carries into the children it forks.
    subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--experts", str(args.experts),
                    "--work", str(args.work), "--build-only"], check=True)
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    for f in src.glob("*.safetensors"):  # warm the page cache for both routes alike
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    py, ref_f16 = sys.executable, work / "ref.F16.gguf"
    rows = []
    for quant in args.quants.split(","):
        ours, ref = [], []
        for _ in range(args.repeats):
            out, ref_out = work / f"ours.{quant}.gguf", work / f"ref.{quant}.gguf"
            ours.append((*measure([py, "-m", "alpaca_local", "convert", str(src), "-q", quant, "-o", str(out),
                                   "--force", "--json"]), load()))
            before = load()
            # The reference names a BPE pre-tokenizer by hashing released vocabularies only, so it
            # runs told the name (as tests/reference.py runs it on trained tiny vocabularies).
            f16_s, f16_rss = measure([py, "-c", _CONVERT_WITH_PRE, str(vendor_dir()), "qwen2", str(src),
                                      "--outtype", "f16", "--outfile", str(ref_f16)])
            q_s, q_rss = measure([py, "-c", QUANTIZE, str(ref_f16), str(ref_out), quant, "", str(HERE.parent / "tests")])
            ref.append((f16_s + q_s, max(f16_rss, q_rss), before))
            for f in (out, ref_out, ref_f16):
                f.unlink(missing_ok=True)
        ratios = [o[0] / r[0] for o, r in zip(ours, ref)]
        rows.append({"quant": quant, "ours_s": statistics.median(o[0] for o in ours),
                     "ref_s": statistics.median(r[0] for r in ref), "time_ratio": statistics.median(ratios),
                     "ours_peak": statistics.median(o[1] for o in ours), "ref_peak": statistics.median(r[1] for r in ref),
                     "loads": [o[2] for o in ours] + [r[2] for r in ref]})
    print(f"\nQwen3-MoE {args.layers} layers x {args.experts} experts (hidden 2048, expert width 768), "
          f"{src_bytes / 1e9:.2f} GB of f16 weights; {os.cpu_count()} cores")
    print("| quant | ours s | reference s | time ratio | ours peak MB | reference peak MB | peak ratio | load (1/5/15 min) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['quant']} | {r['ours_s']:.1f} | {r['ref_s']:.1f} | {r['time_ratio']:.2f}x | "
              f"{r['ours_peak'] / 1e6:.0f} | {r['ref_peak'] / 1e6:.0f} | {r['ours_peak'] / r['ref_peak']:.2f}x | "
              f"{r['loads'][0]} |")
    if args.json:
        args.json.write_text(json.dumps({"source_bytes": src_bytes, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

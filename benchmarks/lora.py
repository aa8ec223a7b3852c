"""Time, peak memory and disk written of `convert --lora` against a plain convert and the three-step route.

Builds the LLaMA-shaped f16 checkpoint of benchmarks/convert.py (1B by default)
and an r=16 LoRA adapter on every linear projection (q, k, v, o, gate, up,
down; random A and B, f32 as PEFT saves them), then on the same warm page cache:
  plain:      alpaca-local convert SRC -q Q
  ours:       alpaca-local convert SRC --lora ADAPTER -q Q
  three-step: PEFT merge_and_unload + save_pretrained (16-bit), then the vendored
              convert_hf_to_gguf.py --outtype f16, then llama_model_quantize
and prints wall time, peak RSS and bytes written of each, and the ratios.
Targets (issue 13): ours within 1.1x the time of plain, and a peak within plain
+ adapter size + 50 MB.

    python benchmarks/lora.py [--size 1b|7b|tiny] [--quant q4_k_m] [--rank 16] [--repeats N]
                              [--no-three-step] [--work DIR] [--json F]

With --repeats N, plain and ours run N times each, alternating (plain, ours, ours,
plain, ...) so that a load change on a shared machine hits both alike; the time
ratio is the median of the paired ratios, times and peaks the medians.
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

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from convert import QUANTIZE, SIZES, measure  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEAK_SLACK = 50 * 10**6  # the "+ 50 MB"
TIME_TARGET = 1.1

PEFT_MERGE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16, low_cpu_mem_usage=True)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
import shutil, pathlib  # the tokenizer goes with it, as a user saves it
for f in pathlib.Path(base).iterdir():
    if f.name.startswith(("tokenizer", "special_tokens", "added_tokens")):
        shutil.copy(f, out)
"""


def build_adapter(folder: Path, src: Path, rank: int) -> Path:
    """A PEFT adapter folder as save_pretrained writes it: r=`rank`, alpha 2r, on every linear."""
    from safetensors.numpy import save_file

    if (folder / "adapter_config.json").exists():
        return folder
    cfg = json.loads((src / "config.json").read_text())
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    dims = {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    rng = np.random.default_rng(1)
    tensors = {}
    for i in range(layers):
        for name, (out_f, in_f) in dims.items():
            part = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{i}.{part}.{name}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, in_f)) / np.sqrt(in_f)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((out_f, rank)) * 1e-3).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS), "bias": "none",
        "base_model_name_or_path": str(src), "task_type": "CAUSAL_LM", "lora_dropout": 0.0, "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None,
    }, indent=2))
    return folder


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _paired(plain_cmd: list[str], ours_cmd: list[str], repeats: int) -> tuple[dict, dict, list[float]]:
    plain, ours, ratios = [], [], []
    for i in range(repeats):
        order = (plain_cmd, ours_cmd) if i % 2 == 0 else (ours_cmd, plain_cmd)
        first, second = measure(order[0]), measure(order[1])
        p, o = (first, second) if i % 2 == 0 else (second, first)
        plain.append(p)
        ours.append(o)
        ratios.append(o[0] / p[0])
    med = lambda xs: float(np.median(xs))  # noqa: E731
    return ({"s": med([x[0] for x in plain]), "peak": int(med([x[1] for x in plain])), "runs": plain},
            {"s": med([x[0] for x in ours]), "peak": int(med([x[1] for x in ours])), "runs": ours}, ratios)


def run(size: str, quant: str, rank: int, work_root: Path, repeats: int = 1, three_step: bool = True) -> dict:
    from reference import vendor_dir

    work = work_root / f"llama-{size}"
    work.mkdir(parents=True, exist_ok=True)
    src, adapter = work / "src", work / f"lora-r{rank}"
    py = sys.executable
    # Built in a child: a parent's peak RSS would carry into every measured child.
    subprocess.run([py, str(HERE / "convert.py"), "--size", size, "--work", str(work_root), "--build-only"], check=True)
    subprocess.run([py, __file__, "--size", size, "--rank", str(rank), "--work", str(work_root), "--build-only"],
                   check=True)
    for f in [*src.glob("*.safetensors"), adapter / "adapter_model.safetensors"]:  # warm the page cache alike
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    cli = [py, "-m", "alpaca_local", "convert", str(src), "-q", quant, "--force", "--json"]
    plain_out, ours_out = work / f"plain.{quant}.gguf", work / f"lora.{quant}.gguf"
    plain, ours, ratios = _paired([*cli, "-o", str(plain_out)], [*cli, "-o", str(ours_out), "--lora", str(adapter)],
                                  repeats)
    ours["disk"] = _size(ours_out)
    result = {
        "size": size, "quant": quant, "rank": rank, "repeats": repeats, "time_ratios": ratios,
        "source_bytes": sum(f.stat().st_size for f in src.glob("*.safetensors")),
        "adapter_bytes": _size(adapter / "adapter_model.safetensors"),
        "plain": plain, "ours": ours, "three_step": None,
    }
    for p in (plain_out, ours_out):
        p.unlink(missing_ok=True)
    if not three_step:
        return result
    merged, f16, q_out = work / "peft-merged", work / "ref.F16.gguf", work / f"ref.{quant}.gguf"
    shutil.rmtree(merged, ignore_errors=True)
    m_s, m_rss = measure([py, "-c", PEFT_MERGE, str(src), str(adapter), str(merged)])
    c_s, c_rss = measure([py, str(vendor_dir() / "convert_hf_to_gguf.py"), str(merged), "--outtype", "f16",
                          "--outfile", str(f16)])
    q_s, q_rss = measure([py, "-c", QUANTIZE, str(f16), str(q_out), quant, "", str(HERE.parent / "tests")])
    three_disk = _size(merged) + _size(f16) + _size(q_out)
    for p in (f16, q_out):
        p.unlink(missing_ok=True)
    shutil.rmtree(merged, ignore_errors=True)
    result["three_step"] = {"s": m_s + c_s + q_s, "peak": max(m_rss, c_rss, q_rss), "disk": three_disk,
                            "steps_s": [m_s, c_s, q_s], "steps_peak": [m_rss, c_rss, q_rss]}
    return result


def markdown(r: dict) -> list[str]:
    """The result as RESULTS.md lines (also what this script prints)."""
    plain, ours, three = r["plain"], r["ours"], r.get("three_step")
    peak_budget = plain["peak"] + r["adapter_bytes"] + PEAK_SLACK
    ratios = r.get("time_ratios") or [ours["s"] / plain["s"]]
    t_ratio = float(np.median(ratios))
    mb = lambda n: f"{n / 1e6:,.0f}"  # noqa: E731
    return [
        (f"{r['size']} LLaMA-shaped model ({r['source_bytes'] / 1e9:.2f} GB f16), r={r['rank']} adapter on every linear "
         f"projection ({r['adapter_bytes'] / 1e6:.1f} MB), quant {r['quant']}. Three-step route: PEFT "
         "`merge_and_unload` + `save_pretrained` (16-bit), vendored `convert_hf_to_gguf.py --outtype f16`, "
         "`llama_model_quantize`; its peak is the largest of its steps, its time and disk the sum."),
        "",
        "| route | seconds | peak MB | disk written MB |",
        "|---|---:|---:|---:|",
        f"| plain convert (no adapter) | {plain['s']:.1f} | {mb(plain['peak'])} | - |",
        f"| ours: convert --lora | {ours['s']:.1f} | {mb(ours['peak'])} | {mb(ours['disk'])} |",
        *([f"| three-step route | {three['s']:.1f} | {mb(three['peak'])} | {mb(three['disk'])} |"] if three else []),
        "",
        "| ratio | value | target |",
        "|---|---:|---|",
        f"| ours / plain time{' (median of ' + str(len(ratios)) + ' paired runs: ' + ', '.join(f'{x:.3f}' for x in ratios) + ')' if len(ratios) > 1 else ''} "
        f"| {t_ratio:.3f}x | ≤ {TIME_TARGET}x: {'yes' if t_ratio <= TIME_TARGET else '**no**'} |",
        f"| ours peak - plain peak | {mb(ours['peak'] - plain['peak'])} MB | ≤ adapter + 50 MB "
        f"({mb(r['adapter_bytes'] + PEAK_SLACK)} MB): {'yes' if ours['peak'] <= peak_budget else '**no**'} |",
        *([f"| ours / three-step time | {ours['s'] / three['s']:.2f}x | - |",
           f"| ours / three-step peak | {ours['peak'] / three['peak']:.2f}x | - |",
           f"| ours / three-step disk written | {ours['disk'] / three['disk']:.2f}x | - |"] if three else []),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--work", type=Path, default=HERE / "out")
    ap.add_argument("--repeats", type=int, default=1, help="paired plain/ours runs (default 1)")
    ap.add_argument("--no-three-step", action="store_true", help="leave out the PEFT merge + convert + quantize route")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        work = args.work / f"llama-{args.size}"
        build_adapter(work / f"lora-r{args.rank}", work / "src", args.rank)
        return 0
    result = run(args.size, args.quant, args.rank, args.work, args.repeats, not args.no_three_step)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("\n".join(markdown(result)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

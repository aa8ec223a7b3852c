"""Issue 21: tokens/s of the guarded load against llama.cpp's own placement and against no repack.

For each level, one GGUF of the benchmark model (random weights, our converter), then, alternating
modes R times, one process per run that loads it with alpaca-local's loader and times
  prompt: one decode of P tokens (tokens/s), and
  gen:    G more tokens, one decode each (tokens/s),
under each placement (convert/cpu_repack.py CPU_BUFFER_MODES):
  auto      llama.cpp's own placement: CPU_REPACK where it applies (on an AMX build: the guard)
  explicit  the guard: extra buffer types off, CPU_REPACK handed its tensors by name
  none      use_extra_bufts = False, what --no-repack does
Targets: explicit >= none, and explicit within 5% of auto on a CPU without AMX.
The table shows the best run of each (the least disturbed by other work on the machine);
the JSON also has the medians.

    python benchmarks/cpu_buffers.py [--size 1b|tiny] [--levels q4_0,q4_k_m,q8_0] [--repeats 3] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

MODES = ("auto", "explicit", "none")

_RUN = r"""
import json, sys, time
from pathlib import Path
from alpaca_local.run.chat import load_llama
path, n_prompt, n_gen, threads = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = load_llama(path, n_prompt + n_gen + 8, n_batch=n_prompt, n_threads=threads, n_threads_batch=threads)
ids = [1] + [(i * 7919) % 500 + 10 for i in range(n_prompt - 1)]
t = time.perf_counter(); llm.eval(ids); prompt = time.perf_counter() - t
tok = ids[-1]
t = time.perf_counter()
for _ in range(n_gen):
    llm.eval([tok]); tok = (tok * 31 + 7) % 500 + 10
gen = time.perf_counter() - t
print(json.dumps({"mode": llm.placement.mode, "repacked": len(llm.placement.repack),
                  "prompt_tps": n_prompt / prompt, "gen_tps": n_gen / gen}))
"""


def one_run(path: Path, mode: str, n_prompt: int, n_gen: int, threads: int) -> dict:
    env = dict(os.environ, ALPACA_LOCAL_CPU_BUFFERS=mode, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", _RUN, str(path), str(n_prompt), str(n_gen), str(threads)],
                         capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    import convert as bench_convert  # benchmarks/convert.py: the benchmark model

    from alpaca_local.convert.cpu_repack import build_facts
    from alpaca_local.convert.pipeline import convert

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(bench_convert.SIZES), default="1b")
    ap.add_argument("--levels", default="q4_0,q4_k_m,q8_0")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--work", type=Path, default=HERE / "out")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    work = args.work / f"llama-{args.size}"
    src = work / "hf"
    if not (src / "config.json").exists():
        bench_convert.build_model(src, args.size)
    bufts, gpu, cpu = build_facts()
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for level in args.levels.split(","):
            path = convert(src, Path(tmp) / f"m.{level}.gguf", level).output
            runs = results.setdefault(level, {m: [] for m in MODES})
            for _ in range(args.repeats):  # alternating, so machine noise falls on every mode alike
                for mode in MODES:
                    runs[mode].append(one_run(path, mode, args.prompt, args.gen, args.threads))
            path.unlink()
    rows = []
    for level, runs in results.items():
        keys = ("prompt_tps", "gen_tps")
        best = {m: {k: max(r[k] for r in runs[m]) for k in keys} for m in MODES}
        med = {m: {k: statistics.median(r[k] for r in runs[m]) for k in keys} for m in MODES}
        rows.append({"level": level, "repacked_tensors": runs["explicit"][0]["repacked"],
                     "auto_mode": runs["auto"][0]["mode"], **{m: best[m] for m in MODES},
                     "median": med, "runs": runs,
                     "explicit_vs_auto": {k: best["explicit"][k] / best["auto"][k] for k in keys},
                     "explicit_vs_none": {k: best["explicit"][k] / best["none"][k] for k in keys}})
    print(f"\n{args.size} model, {args.threads} threads, best of {args.repeats} runs each; "
          f"{platform.processor() or platform.machine()}; build extra buffer types {', '.join(bufts)}, "
          f"features {', '.join(cpu.features)}; load average {os.getloadavg()[0]:.1f}")
    print("| level | repacked | auto prompt / gen t/s | explicit prompt / gen | none prompt / gen | "
          "explicit / auto | explicit / none |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cell = lambda m: f"{r[m]['prompt_tps']:.1f} / {r[m]['gen_tps']:.2f}"  # noqa: E731
        ratio = lambda k: f"{r[k]['prompt_tps']:.3f} / {r[k]['gen_tps']:.3f}"  # noqa: E731
        print(f"| {r['level']} | {r['repacked_tensors']} | {cell('auto')} | {cell('explicit')} | {cell('none')} | "
              f"{ratio('explicit_vs_auto')} | {ratio('explicit_vs_none')} |")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "threads": args.threads, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())

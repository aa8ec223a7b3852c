"""The planner against llama.cpp's CUDA backend, and chat speed on a GPU (the device check).

    python benchmarks/gpu.py --bench BUILD/bin/llama-bench [--work DIR] [--json F] [--md F]
                             [--deadline SECONDS] [--quick]

Needs one NVIDIA GPU and llama-cpp-python built with CUDA: benchmarks/gpu_device.sh builds
the pinned sdist's vendored llama.cpp so, with its llama-bench, and runs this.

Models are sparse GGUFs of catalog models (benchmarks/plan.py write_sparse_gguf: the real
tensor table, metadata and vocabulary; the data a hole of zeros). Buffer sizes depend only
on shapes and types, and so does decode speed (no kernel skips zeros); what zeros change is
the routing of a MoE model (every token ties, so the same experts run), said in the output.

1. Buffers. Each case is loaded in a subprocess the way alpaca-local loads it
   (run/cpu_buffers.load_placement: llama.cpp's placement, or the AMX workaround, and
   --n-cpu-moe's overrides), then one ubatch and one token are evaluated. Reported: the
   buffers llama.cpp logs (CUDA0, CUDA_Host, CPU_Mapped, ...) and the GPU memory the process
   took (nvidia-smi, before the import and after the token), against `plan_level` with the
   same settings (backend "cuda"). "rest" is the GPU memory beyond the logged CUDA0 buffers
   (CUDA context, cuBLAS, ggml's pools): the planner's CUDA_OVERHEAD.
2. Speed. llama-bench (pp512 and tg, flash attention off and on) against benchmarks/chat.py
   (our chat path against raw llama-cpp-python generation) on the same file and threads; for
   the MoE model at several --n-cpu-moe, against the planner's estimate (moe_fit.read_time,
   relative to all experts on the GPU).
3. Pre-flight. Chat's pre-flight child (run/cpu_buffers.py) under each placement, and
   llama-cpp-python alone at small and chat-sized contexts and batches, model closed or left
   open at exit (PREFLIGHT): the exit status and whether the decode finished first. The first
   run here saw the pre-flight die of SIGSEGV on an AMX Xeon with full offload.

    --diagnose: 3 and chat's speed alone (the buffers and llama-bench left out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from plan import MiB, parse_buffers, write_sparse_gguf  # noqa: E402

from alpaca_local.convert.gguf_read import read_gguf_header  # noqa: E402
from alpaca_local.plan import catalog, moe_fit  # noqa: E402
from alpaca_local.plan import memory as plan  # noqa: E402

# (catalog model, level, n_ctx, cache type, -ngl (None: everything), --n-cpu-moe): the 7B fully
# offloaded, at a long context and split with the CPU; a MoE model with none, half and all of its
# experts in RAM. Then the speed (SPEED), then the rest (LATER): the 7B on the CPU beside a GPU,
# with a quantized cache (flash attention), at q8_0; Mixtral with half its experts in RAM.
CASES = (
    ("alpaca-7b", "q4_k_m", 2048, "f16", None, 0),
    ("alpaca-7b", "q4_k_m", 8192, "f16", None, 0),
    ("alpaca-7b", "q4_k_m", 2048, "f16", 20, 0),
    ("qwen3-30b-a3b", "q4_k_m", 4096, "f16", None, 0),
    ("qwen3-30b-a3b", "q4_k_m", 4096, "f16", None, 24),
    ("qwen3-30b-a3b", "q4_k_m", 4096, "f16", None, 48),
)
LATER = (
    ("alpaca-7b", "q4_k_m", 2048, "f16", 0, 0),
    ("alpaca-7b", "q4_k_m", 4096, "q8_0", None, 0),
    ("alpaca-7b", "q8_0", 2048, "f16", None, 0),
    ("mixtral-8x7b", "q4_k_m", 4096, "f16", None, 16),
)
# (catalog model, level, --n-cpu-moe values, tokens generated): chat speed.
SPEED = (
    ("alpaca-7b", "q4_k_m", (0,), 128),
    ("qwen3-30b-a3b", "q4_k_m", (0, 48), 64),
)

_PROBE = r"""
import gc, json, subprocess, sys

def gpu_used():
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout
    return int(out.split()[0])

a = json.loads(sys.argv[1])
before = gpu_used()
import llama_cpp
from alpaca_local.convert.gguf_read import read_gguf_header
from alpaca_local.run.cpu_buffers import llama_defaults, load_placement
ctype = getattr(llama_cpp, "GGML_TYPE_" + a["cache"].upper())
placement = load_placement(read_gguf_header(a["path"]), False, a["ngl"], a["n_cpu_moe"])
with llama_defaults(placement):
    m = llama_cpp.Llama(a["path"], n_ctx=a["n_ctx"], n_batch=512, n_gpu_layers=a["ngl"], verbose=True,
                        type_k=ctype, type_v=ctype, flash_attn=a["cache"] != "f16")
loaded = gpu_used()
m.eval([1] + [100 + i for i in range(min(511, a["n_ctx"] - 8))])  # one whole ubatch: the prompt path
m.eval([7])  # and one decoded token
ran = gpu_used()
print(json.dumps({"model_size": llama_cpp.llama_model_size(m.model), "before": before, "loaded": loaded,
                  "ran": ran, "placement": placement.describe()}), flush=True)
del m
gc.collect()  # llama_context's destructor logs the 4-decimal compute buffer sizes
"""


def sparse_file(work: Path, model: str, level: str) -> Path:
    path = work / f"{model}.{level}.gguf"
    if not path.exists():
        shape = plan.shape_from_config(catalog.load(model), model, "catalog")
        write_sparse_gguf(path, shape, level, eos=shape.vocab_size - 1)  # chat.py must generate
    return path


def load_report(path: Path, n_ctx: int, cache: str, ngl: int, n_cpu_moe: int) -> dict:
    """Load `path` with CUDA in a subprocess (llama.cpp logs to fd 2, and may abort)."""
    args = json.dumps({"path": str(path), "n_ctx": n_ctx, "cache": cache, "ngl": ngl, "n_cpu_moe": n_cpu_moe})
    with tempfile.TemporaryFile() as err:
        proc = subprocess.run([sys.executable, "-c", _PROBE, args], stdout=subprocess.PIPE, stderr=err,
                              timeout=600, env=_child_env())
        err.seek(0)
        log = err.read().decode(errors="replace")
    lines = proc.stdout.decode().strip().splitlines()
    if not lines:
        raise RuntimeError(f"llama.cpp failed on {path} (exit {proc.returncode}): {log[-3000:]}")
    # the exit status after the report: a crash in teardown (the model freed first, then the process)
    return json.loads(lines[-1]) | parse_buffers(log) | {"splits": _graph_splits(log), "exit": proc.returncode}


def _graph_splits(log: str) -> list[str]:
    """"sched_reserve: graph: nodes = 78, splits = 1, ...": how the scheduler cut the graph."""
    return [line.split("graph:", 1)[-1].strip() for line in log.splitlines() if "graph: nodes" in line]


def _on_device(buffer: str) -> bool:
    """CUDA0, CUDA1, ...: device memory; CUDA_Host is pinned host memory, as CPU_Mapped is host."""
    return buffer.startswith("CUDA") and not buffer.startswith("CUDA_Host")


def _gpu_part(buffers: dict) -> float:
    return sum(v for k, v in buffers.items() if _on_device(k))


def _host_part(buffers: dict) -> float:
    return sum(v for k, v in buffers.items() if not _on_device(k))


def _child_env(**extra: str) -> dict[str, str]:
    """The environment of a child that imports alpaca_local and this build's llama_cpp as we do."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]), **extra)


def predict(path: Path, n_ctx: int, cache: str, ngl: int, n_cpu_moe: int) -> dict:
    """plan_level's buffers (MiB) for one case, as a CUDA plan of that file."""
    shape = plan.shape_from_gguf(read_gguf_header(path))
    s = plan.RunSettings(n_ctx=n_ctx, cache_type=cache, backend="cuda")
    p = plan.plan_level(shape, shape.file_quant, s, ngl, n_cpu_moe)
    kv_all = plan.kv_bytes(shape, n_ctx, cache, None, s.n_ubatch, s.swa_full)
    return {
        "gpu_predicted": {"model": p.weights_gpu / MiB, "kv": p.kv / MiB, "compute": p.compute / MiB,
                          "rest": p.overhead / MiB, "total": p.total_gpu / MiB},
        "host_predicted": {"model": p.weights_cpu / MiB, "kv": (kv_all - p.kv) / MiB, "output": p.output / MiB},
    }


def compare(path: Path, n_ctx: int, cache: str, ngl: int | None, n_cpu_moe: int) -> dict:
    """One case: llama.cpp's buffers and GPU memory against plan_level, MiB each."""
    if ngl is None:
        ngl = plan.shape_from_gguf(read_gguf_header(path)).n_layer + 1
    got = load_report(path, n_ctx, cache, ngl, n_cpu_moe)
    gpu = {k: _gpu_part(got[k]) for k in ("model", "kv", "compute")}
    took = got["ran"] - got["before"]
    return {
        "file": path.name, "n_ctx": n_ctx, "cache": cache, "ngl": ngl, "n_cpu_moe": n_cpu_moe,
        "placement": got["placement"], "logged": {k: got[k] for k in ("model", "kv", "compute", "compute_reserved", "output")},
        "splits": got["splits"], "model_size": got["model_size"], "exit": got["exit"],
        "gpu_measured": gpu | {"rest": took - sum(gpu.values()), "total": took, "after_load": got["loaded"] - got["before"]},
        "host_measured": {"model": _host_part(got["model"]), "kv": _host_part(got["kv"]),
                          "compute": _host_part(got["compute"]), "output": sum(got["output"].values())},
    } | predict(path, n_ctx, cache, ngl, n_cpu_moe)


def replan(result: dict, work: Path) -> dict:
    """A saved run with today's planner's predictions (the sparse files are made again here: the
    measurements stay, only the prediction is recomputed)."""
    for case in result["cases"]:
        if "error" not in case:
            model, level = case["file"].removesuffix(".gguf").split(".")
            case |= predict(sparse_file(work, model, level), case["n_ctx"], case["cache"], case["ngl"], case["n_cpu_moe"])
    for entry in result["speed"]:
        model, level = entry["file"].removesuffix(".gguf").split(".")
        moe = {r["n_cpu_moe"] for r in entry.get("llama_bench", []) if r["n_cpu_moe"]}
        entry["estimate"] = {str(n): estimated_speed(sparse_file(work, model, level), n) for n in sorted(moe)}
    return result


# --------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------


def threads() -> int:
    """llama-cpp-python's default (Llama n_threads: cpu_count // 2), given to both sides."""
    return max((os.cpu_count() or 2) // 2, 1)


def bench(binary: Path, path: Path, ncmoe: tuple[int, ...], n_gen: int, fa: str) -> list[dict]:
    cmd = [str(binary), "-m", str(path), "-ngl", "99", "-t", str(threads()), "-p", "512", "-n", str(n_gen),
           "-r", "3", "-fa", fa, "-ncmoe", ",".join(map(str, ncmoe)), "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise RuntimeError(f"llama-bench failed: {out.stderr[-2000:]}")
    return [{"n_prompt": r["n_prompt"], "n_gen": r["n_gen"], "n_cpu_moe": r.get("n_cpu_moe", 0),
             "flash_attn": r.get("flash_attn"), "tok_s": round(r["avg_ts"], 2), "stddev": round(r["stddev_ts"], 2)}
            for r in json.loads(out.stdout)]


def ours(path: Path, n_cpu_moe: int, n_gen: int, **env: str) -> dict:
    cmd = [sys.executable, str(HERE / "chat.py"), str(path), "-ngl", "99", "-n", str(n_gen), "--repeats", "3",
           "--threads", str(threads()), "--n-cpu-moe", str(n_cpu_moe), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_child_env(**env))
    if out.returncode:
        raise RuntimeError(f"benchmarks/chat.py failed: {out.stderr[-2000:]}")
    r = json.loads(out.stdout)
    return {k: r[k] for k in ("ours_tok_s", "raw_tok_s", "ratio", "all_ours", "all_raw", "tokens_per_run", "machine")}


def estimated_speed(path: Path, n_cpu_moe: int) -> float:
    """moe_fit's speed estimate at `n_cpu_moe`, relative to every expert on the GPU."""
    shape = plan.shape_from_gguf(read_gguf_header(path))
    full = shape.n_layer + 1
    t = moe_fit.read_time(shape, shape.file_quant, full, n_cpu_moe)
    return moe_fit.read_time(shape, shape.file_quant, full, 0) / t


# --------------------------------------------------------------------------
# Pre-flight on a GPU build (the first run found chat's pre-flight crashing on an AMX Xeon)
# --------------------------------------------------------------------------

_DIRECT = r"""
import faulthandler, json, sys
faulthandler.enable()
import llama_cpp
a = json.loads(sys.argv[1])
m = llama_cpp.Llama(a["path"], n_ctx=a["n_ctx"], n_batch=a["n_batch"], n_ubatch=a["n_ubatch"],
                    n_gpu_layers=a["ngl"], use_extra_bufts=a["extra"], verbose=True)
m.eval([1] + list(range(300, 300 + a["n_prompt"] - 1)))
m.eval([307])
print("decoded", flush=True)
if a["close"]:
    m.close()
    print("closed", flush=True)
"""
# (what, command kind, settings): our pre-flight child under each placement, then llama-cpp-python
# alone (no placement of ours) at the pre-flight's tiny context and batch and at chat's.
PREFLIGHT = (
    ("pre-flight child, auto", "child", {"mode": "auto"}),
    ("pre-flight child, none", "child", {"mode": "none"}),
    ("pre-flight child, explicit", "child", {"mode": "explicit"}),
    ("Llama ctx 64, batch 8, 8 tokens, left open", "direct", {"n_ctx": 64, "n_batch": 8, "close": False}),
    ("Llama ctx 64, batch 8, 8 tokens, closed", "direct", {"n_ctx": 64, "n_batch": 8, "close": True}),
    ("Llama ctx 64, batch 8, no extra bufts", "direct", {"n_ctx": 64, "n_batch": 8, "extra": False, "close": True}),
    ("Llama ctx 2048, batch 512, 8 tokens, left open", "direct", {"n_ctx": 2048, "n_batch": 512, "close": False}),
    ("Llama ctx 2048, batch 512, 64 tokens, closed", "direct", {"n_ctx": 2048, "n_batch": 512, "n_prompt": 64,
                                                               "close": True}),
)


# --diagnose: chat's speed with the extra buffer types off, and with llama.cpp's own placement and
# the pre-flight skipped (what chat does once the pre-flight is right)
DIAGNOSE_RUNS = (("/none", {"ALPACA_LOCAL_CPU_BUFFERS": "none"}),
                 ("/auto-no-preflight", {"ALPACA_LOCAL_CPU_BUFFERS": "auto", "ALPACA_LOCAL_PREFLIGHT": "0"}))


def preflight_matrix(path: Path, ngl: int = 99) -> list[dict]:
    """Each PREFLIGHT entry in a child: its exit status and the end of what it printed."""
    env = _child_env(ALPACA_LOCAL_PREFLIGHT="0")
    rows = []
    for what, kind, opts in PREFLIGHT:
        if kind == "child":
            cmd = [sys.executable, "-X", "faulthandler", "-m", "alpaca_local.run.cpu_buffers", str(path), str(ngl), "0"]
            run_env = dict(env, ALPACA_LOCAL_CPU_BUFFERS=opts["mode"])
        else:
            args = {"extra": True, "n_prompt": 8} | opts | {"path": str(path), "ngl": ngl, "n_ubatch": opts["n_batch"]}
            cmd, run_env = [sys.executable, "-c", _DIRECT, json.dumps(args)], env
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=run_env)
            rc, out, tail = proc.returncode, proc.stdout, proc.stderr[-2500:]
        except subprocess.TimeoutExpired:
            rc, out, tail = None, "", "timed out"
        rows.append({"what": what, "rc": rc, "decoded": "decoded" in out, "stdout": out[-500:], "tail": tail})
        print(json.dumps({"what": what, "rc": rc, "decoded": "decoded" in out}), flush=True)
    return rows


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in _sh(["lscpu"]).splitlines()
                if line.startswith("Model name")), platform.processor())
    import llama_cpp

    return {"gpu": _sh(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]),
            "cpu": cpu, "cores": os.cpu_count(), "threads": threads(),
            "llama_cpp": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}


def summary(result: dict) -> list[str]:
    """What the buffer cases say, in numbers: exact parts, error ranges (offloaded cases)."""
    done = [c for c in result["cases"] if "error" not in c and c["ngl"] > 0]
    if not done:
        return []

    def exact(side: str, key: str) -> int:
        return sum(abs(c[f"{side}_measured"][key] - c[f"{side}_predicted"][key]) < 0.5 for c in done)

    def span(values: list[float], fmt: str) -> str:
        return f"{fmt.format(min(values))} to {fmt.format(max(values))}"

    gpu = [(c["gpu_measured"], c["gpu_predicted"]) for c in done]
    return [
        f"- Model buffers: CUDA0 exact (to 0.5 MiB) in {exact('gpu', 'model')} of {len(done)} offloaded cases, host "
        f"(CPU_Mapped) in {exact('host', 'model')}; KV exact in {exact('gpu', 'kv')} (GPU) and {exact('host', 'kv')} (host).",
        f"- Compute buffer, plan - llama.cpp: {span([p['compute'] - g['compute'] for g, p in gpu], '{:+.1f}')} MiB.",
        f"- Beyond the logged buffers (context, pools): {span([g['rest'] for g, _ in gpu], '{:.0f}')} MiB measured, "
        f"{span([p['rest'] for _, p in gpu], '{:.0f}')} planned.",
        f"- Total GPU memory, plan against nvidia-smi: {span([(p['total'] - g['total']) / g['total'] for g, p in gpu], '{:+.1%}')}.",
    ]


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"GPU: {m['gpu']}; CPU: {m['cpu']}, {m['cores']} cores; {m['threads']} threads"
             + (f"; {result['run']}" if result.get("run") else ""), "",
             *summary(result), *(f"- {n}" for n in result.get("notes", [])), "",
             "Buffers, MiB: llama.cpp (CUDA0 model/KV/compute, GPU memory the process took) / plan",
             "", "| file | ctx | cache | ngl | cpu-moe | model | KV | compute | rest | total | err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        if "error" in c:
            lines.append(f"| {c['file']} | {c['n_ctx']} | {c['cache']} | {c['ngl']} | {c['n_cpu_moe']} | "
                         f"failed: {c['error'][:60]} |||||| ")
            continue
        g, p = c["gpu_measured"], c["gpu_predicted"]
        cells = " | ".join(f"{g[k]:.0f} / {p[k]:.0f}" for k in ("model", "kv", "compute", "rest", "total"))
        err = (p["total"] - g["total"]) / g["total"] if g["total"] else 0.0
        lines.append(f"| {c['file']} | {c['n_ctx']} | {c['cache']} | {c['ngl']} | {c['n_cpu_moe']} | {cells} | {err:+.1%} |")
    lines += ["", "Host side, MiB: llama.cpp / plan (model = CPU_Mapped and any other host model buffer)", "",
              "| file | ctx | ngl | cpu-moe | model | KV | compute (pinned) | buffers |", "|---|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        if "error" in c:
            continue
        h, p = c["host_measured"], c["host_predicted"]
        names = ", ".join(sorted({*c["logged"]["model"], *c["logged"]["compute"]}))
        lines.append(f"| {c['file']} | {c['n_ctx']} | {c['ngl']} | {c['n_cpu_moe']} | {h['model']:.0f} / {p['model']:.0f} | "
                     f"{h['kv']:.0f} / {p['kv']:.0f} | {h['compute']:.0f} / - | {names} |")
    lines += ["", "Speed, tokens/s (llama-bench: pp512, tg; ours: benchmarks/chat.py, our chat path / raw "
              "llama-cpp-python)", ""]
    for s in result["speed"]:
        lines.append(f"- {s['file']}: " + ("failed: " + s["error"].strip().splitlines()[-1][:400] if "error" in s else ""))
        tg0 = {r["flash_attn"]: r["tok_s"] for r in s.get("llama_bench", []) if r["n_gen"] and not r["n_cpu_moe"]}
        for r in s.get("llama_bench", []):
            what = "pp" if r["n_prompt"] else "tg"
            est = s.get("estimate", {}).get(str(r["n_cpu_moe"]))
            rel = (f" = {r['tok_s'] / tg0[r['flash_attn']]:.3f}x of n_cpu_moe=0"
                   + (f", planner's estimate {est:.3f}x" if est is not None else "")
                   if r["n_gen"] and r["n_cpu_moe"] and tg0.get(r["flash_attn"]) else "")
            lines.append(f"  - llama-bench {what}{r['n_prompt'] or r['n_gen']} fa={r['flash_attn']} "
                         f"n_cpu_moe={r['n_cpu_moe']}: {r['tok_s']} ± {r['stddev']}{rel}")
        base = s.get("ours", {}).get("0", {}).get("ours_tok_s")
        for n, o in s.get("ours", {}).items():
            if "error" in o:
                lines.append(f"  - chat n_cpu_moe={n}: failed: {o['error'].strip().splitlines()[-1][:400]}")
                continue
            est = s.get("estimate", {}).get(n)
            lines.append(f"  - chat n_cpu_moe={n}: ours {o['ours_tok_s']}, raw {o['raw_tok_s']} (ratio {o['ratio']})"
                         + (f"; {o['ours_tok_s'] / base:.2f}x of n_cpu_moe=0, planner's estimate {est:.2f}x"
                            if est is not None and base else ""))
    for row in result.get("preflight", []):
        lines.append(f"- {row['what']}: exit {row['rc']}" + (", after the decode" if row["decoded"] else ""))
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", type=Path, help="llama-bench of the same build (speed skipped without)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "alpaca-gpu")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds; later cases are skipped")
    ap.add_argument("--quick", action="store_true", help="the first two cases and the 7B speed only")
    ap.add_argument("--diagnose", action="store_true",
                    help="the pre-flight matrix (PREFLIGHT) and the chat speeds only, with $ALPACA_LOCAL_CPU_BUFFERS")
    ap.add_argument("--replan", type=Path, metavar="JSON",
                    help="no GPU needed: print a saved run's tables with this planner's predictions")
    args = ap.parse_args()
    start = time.monotonic()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.replan:
        print(markdown(replan(json.loads(args.replan.read_text()), args.work)), end="")
        return 0
    result = {"machine": machine(), "cases": [], "speed": []}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
        if args.md:
            args.md.write_text(markdown(result))

    def late() -> bool:
        return time.monotonic() - start > args.deadline

    def buffers(cases) -> None:
        for model, level, n_ctx, cache, ngl, n_cpu_moe in cases:
            if late():
                print(f"skipped {model} {level} ctx {n_ctx} ngl {ngl} (deadline)", flush=True)
                continue
            path = sparse_file(args.work, model, level)
            t0 = time.monotonic()
            try:
                case = compare(path, n_ctx, cache, ngl, n_cpu_moe)
            except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                case = {"file": path.name, "n_ctx": n_ctx, "cache": cache, "ngl": ngl, "n_cpu_moe": n_cpu_moe,
                        "error": str(exc)}
            case["seconds"] = round(time.monotonic() - t0, 1)
            result["cases"].append(case)
            print(json.dumps(case), flush=True)
            save()

    if not args.diagnose:
        buffers(CASES[:2] if args.quick else CASES)
    if not args.quick and not late():
        result["preflight"] = preflight_matrix(sparse_file(args.work, "alpaca-7b", "q4_k_m"))
        save()
    for model, level, ncmoe, n_gen in SPEED[:1] if args.quick else SPEED:
        if late():
            print(f"skipped speed of {model} (deadline)", flush=True)
            continue
        path = sparse_file(args.work, model, level)
        entry: dict = {"file": path.name}
        result["speed"].append(entry)
        try:
            if args.bench and not args.diagnose:
                entry["llama_bench"] = bench(args.bench, path, ncmoe, n_gen, "0,1" if ncmoe == (0,) else "0")
                save()
            entry["ours"] = {}
            entry["estimate"] = {str(n): estimated_speed(path, n) for n in ncmoe if n}
            for n in ncmoe[-1:] if args.diagnose else ncmoe:
                # chat as it is; where that fails, with the extra buffer types off and with the
                # pre-flight skipped (--diagnose: those two alone)
                for label, env in DIAGNOSE_RUNS if args.diagnose else (("", {}), *DIAGNOSE_RUNS):
                    if late() or (label and not args.diagnose and "error" not in entry["ours"].get(str(n), {})):
                        break
                    try:
                        entry["ours"][f"{n}{label}"] = ours(path, n, min(n_gen, 64 if n == 0 else 32) if args.diagnose
                                                            else n_gen, **env)
                    except RuntimeError as exc:
                        entry["ours"][f"{n}{label}"] = {"error": str(exc)[-1500:]}
                save()
        except (RuntimeError, subprocess.SubprocessError, OSError, ValueError) as exc:
            entry["error"] = str(exc)
        print(json.dumps(entry), flush=True)
        save()
    if not (args.quick or args.diagnose):
        buffers(LATER)
    save()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

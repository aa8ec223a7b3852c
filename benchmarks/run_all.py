"""Run every benchmark and write benchmarks/RESULTS.md (what `make bench` does).

    python benchmarks/run_all.py [--size 1b|7b|tiny] [--quants q4_k_m,q8_0,q4_0]
                                 [--chat-model M.gguf] [--chat-n 256] [--chat-repeats 10]
                                 [--load-clients 8] [--lora-repeats 3]
                                 [--skip convert,chat,plan,hub,imatrix,load,lora,cpu_buffers,publish,search,ladder,moe]
                                 [--out benchmarks/RESULTS.md]

Each benchmark runs as its own process (so peak-memory numbers are its own):
  convert.py --size S --quants Q --json F   ours vs vendored convert_hf_to_gguf.py + quantize
  chat.py [MODEL] -n N --repeats R --json   chat -p tokens/s vs raw llama-cpp-python
  plan.py                                   planner latency and prediction error (its text, verbatim)
  hub.py --size S --quants Q1               convert org/name: streaming vs download-then-convert (first quant)
  imatrix.py                                KLD with/without our imatrix on Gemma 3 270M, --calibrate time (verbatim)
  load.py [MODEL] --clients C --json        serve under load vs llama-cpp-python's server (its table, verbatim)
  lora.py --size S --repeats R --json F     convert --lora vs plain convert vs PEFT merge + convert + quantize
  cpu_buffers.py --size S --repeats R       tokens/s: AMX-safe load vs llama.cpp's placement vs --no-repack
  publish.py --size S --separate --json F   convert --quant L1,...,L5 vs f16 + llama-quantize per level
  search.py                                 convert --target-size vs llama.cpp's mixes at their size (KLD)
  ladder.py                                 KLD from f16 against size, every quant level, real Gemma 3 270M
  moe.py                                    convert time / peak RSS on a wide Qwen3-MoE vs the two-step route
The defaults are the issue's sizes (1B model, 256 tokens, 10 repeats); `--size tiny
--chat-n 16 --chat-repeats 2 --skip plan,imatrix` checks the plumbing in well under a minute.
A benchmark that fails or is missing is reported in RESULTS.md and the exit code is 1.
convert.py needs LLAMA_CPP_VENDOR (the Makefile sets it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Targets from issue 7.
CONVERT_TIME_TARGET = {"q4_k_m": 0.9, "q8_0": 0.7, "q4_0": 0.7}
CONVERT_PEAK_TARGET = 0.15  # of the f16 model size
CHAT_RATIO_TARGET = 0.97


class Failed(Exception):
    """A benchmark did not produce results; the message goes into RESULTS.md."""


# --------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, check=False)
        if out.returncode == 0:
            return out.stdout.strip()
    return platform.processor() or platform.machine()


def ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=False)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True,
                           check=False)
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def machine() -> dict[str, str]:
    ram = ram_bytes()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "CPU": cpu_model(),
        "cores": f"{os.cpu_count()} logical ({usable} usable by this process)",
        "RAM": f"{ram / 2**30:.1f} GiB" if ram else "unknown",
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "llama-cpp-python": _version("llama-cpp-python"),
        "numpy": _version("numpy"),
        "gguf": _version("gguf"),
        "alpaca-local": f"{_version('alpaca-local')}, commit {_git_commit()}",
    }


# --------------------------------------------------------------------------
# Running the benchmarks
# --------------------------------------------------------------------------


def _run(argv: list[str]) -> str:
    """Run one benchmark script; its stderr streams through (progress), its stdout is returned."""
    print(f"$ {' '.join(argv)}", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise Failed(f"`{' '.join(argv)}` exited with code {proc.returncode}; its output:\n{proc.stdout[-2000:]}")
    return proc.stdout


def run_convert(args: argparse.Namespace) -> dict:
    if not os.environ.get("LLAMA_CPP_VENDOR") and not (ROOT / ".cache").is_dir():
        raise Failed("LLAMA_CPP_VENDOR is not set and .cache/ has no vendored llama.cpp; run it through `make bench`")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "convert.json"
        argv = [str(HERE / "convert.py"), "--size", args.size, "--quants", args.quants, "--json", str(out)]
        if args.work:
            argv += ["--work", str(args.work)]
        _run(argv)
        return json.loads(out.read_text())


def run_chat(args: argparse.Namespace) -> dict:
    script = HERE / "chat.py"
    if not script.is_file():
        raise Failed("benchmarks/chat.py is not in this checkout yet; skipped")
    argv = [str(script), *([str(args.chat_model)] if args.chat_model else []),
            "-n", str(args.chat_n), "--repeats", str(args.chat_repeats), "--json"]
    return json.loads(_run(argv))


def run_plan(args: argparse.Namespace) -> str:
    return _run([str(HERE / "plan.py")])


def run_hub(args: argparse.Namespace) -> str:
    argv = [str(HERE / "hub.py"), "--size", args.size, "--quants", args.quants.split(",")[0]]
    return _run(argv + (["--work", str(args.work)] if args.work else []))


def run_imatrix(args: argparse.Namespace) -> str:
    return _run([str(HERE / "imatrix.py")])


def run_load(args: argparse.Namespace) -> str:
    return _run([str(HERE / "load.py"), *([str(args.chat_model)] if args.chat_model else []),
                 "--clients", str(args.load_clients)])


def run_cpu_buffers(args: argparse.Namespace) -> str:
    argv = [str(HERE / "cpu_buffers.py"), "--size", args.size, "--repeats", str(args.cpu_repeats)]
    if args.work:
        argv += ["--work", str(args.work)]
    return _run(argv)


def run_ladder(args: argparse.Namespace) -> str:
    return _run([str(HERE / "ladder.py")])


def run_search(args: argparse.Namespace) -> str:
    return _run([str(HERE / "search.py")])


def run_moe(args: argparse.Namespace) -> str:
    return _run([str(HERE / "moe.py"), *(["--work", str(args.work)] if args.work else [])])


GPU_RUN = HERE / "gpu-h200.json"  # the last device run of benchmarks/gpu_device.sh (a GPU machine)


def run_gpu(args: argparse.Namespace) -> list[str]:
    """The saved device run, its predictions recomputed by this planner (no GPU needed here)."""
    if not GPU_RUN.exists():
        raise Failed(f"{GPU_RUN.name} is missing: run benchmarks/gpu_device.sh on a machine with an NVIDIA GPU")
    work = ["--work", str(args.work / "gpu")] if args.work else []
    text = _run([str(HERE / "gpu.py"), "--replan", str(GPU_RUN), *work])
    return [f"Measured on a device machine (`bash benchmarks/gpu_device.sh`, saved in `benchmarks/{GPU_RUN.name}`); "
            "the plan's side is this planner's, recomputed by `gpu.py --replan` on sparse copies of the same files.",
            "", *text.rstrip().splitlines()]


def run_lora(args: argparse.Namespace) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "lora.json"
        argv = [str(HERE / "lora.py"), "--size", args.size, "--repeats", str(args.lora_repeats), "--json", str(out)]
        if args.work:
            argv += ["--work", str(args.work)]
        _run(argv)
        sys.path.insert(0, str(HERE))
        from lora import markdown

        return markdown(json.loads(out.read_text()))


def run_publish(args: argparse.Namespace) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "publish.json"
        argv = [str(HERE / "publish.py"), "--size", args.size, "--separate", "--json", str(out)]
        if args.work:
            argv += ["--work", str(args.work)]
        _run(argv)
        sys.path.insert(0, str(HERE))
        from publish import markdown

        return markdown(json.loads(out.read_text()))


# --------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def convert_section(r: dict) -> list[str]:
    src = r["source_bytes"]
    lines = [
        (f"{r['size']} LLaMA-shaped model with random weights, {src / 1e9:.2f} GB of f16 safetensors. "
         "Reference: vendored `convert_hf_to_gguf.py --outtype f16`, then `llama_model_quantize` "
         "(default parameters); its f16 step counts towards every quant. Same run, same warm page cache. "
         "Peak memory is the whole process: for ours, about 50 MB of it is the Python interpreter and libraries."),
        "",
        "| quant | ours s | reference s | time ratio | target | ours peak MB | reference peak MB | peak / f16 size | peak target met |",
        "|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for row in r["rows"]:
        ratio, peak = row["ours_s"] / row["ref_s"], row["ours_peak"] / src
        target = CONVERT_TIME_TARGET.get(row["quant"])
        goal = f"≤ {target}x: {_verdict(ratio <= target)}" if target else "-"
        lines.append(
            f"| {row['quant']} | {row['ours_s']:.1f} | {row['ref_s']:.1f} | {ratio:.2f}x | {goal} | "
            f"{row['ours_peak'] / 1e6:,.0f} | {row['ref_peak'] / 1e6:,.0f} | {peak:.1%} | "
            f"{_verdict(peak <= CONVERT_PEAK_TARGET)} |"
        )
    return lines


def _cell(value: object) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def chat_section(r: dict) -> list[str]:
    lines = []
    ratio = r.get("ratio")
    if isinstance(ratio, (int, float)):
        lines += [f"ours / raw (median of paired runs) = **{ratio:.3f}x** (target ≥ {CHAT_RATIO_TARGET}x: {_verdict(ratio >= CHAT_RATIO_TARGET)})", ""]
    lines += ["| measure | value |", "|---|---|"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in r.items()]
    return lines


def render(results: dict[str, object], args: argparse.Namespace) -> str:
    now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        "# Benchmark results",
        "",
        (f"Written by `make bench` (`benchmarks/run_all.py`) on {now}. Numbers are from this one machine; "
         "rerun `make bench` to measure yours."),
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in machine().items()),
    ]
    titles = {
        "convert": "Convert: `alpaca-local convert` against llama.cpp's two-step route",
        "chat": "Chat: `alpaca-local chat -p` tokens/s against raw llama-cpp-python",
        "plan": "Plan: latency and prediction error against llama.cpp's buffers",
        "hub": "Hub: `convert org/name` streaming against download-then-convert",
        "imatrix": "Imatrix: KLD with and without our importance matrix on real weights; --calibrate time",
        "load": "Load: `alpaca-local serve` with many clients against llama-cpp-python's server",
        "lora": "LoRA: `convert --lora` against a plain convert and PEFT merge + convert + quantize",
        "cpu_buffers": "CPU buffers: the AMX-safe load against llama.cpp's placement and --no-repack",
        "publish": "Publish: `convert --quant L1,...,L5` (one read) against f16 + one llama-quantize per level",
        "search": "Search: `convert --target-size` against llama.cpp's fixed mixes at their size (real weights)",
        "ladder": "Ladder: KL divergence from f16 against file size for every quant level (real weights)",
        "moe": "MoE: `convert` of a wide mixture-of-experts model against the two-step route",
        "gpu": "GPU: the planner against llama.cpp's CUDA buffers, and speed on an NVIDIA H200",
    }
    for name, title in titles.items():
        lines += ["", f"## {title}", ""]
        result = results.get(name)
        if result is None:
            lines.append("skipped (`--skip`).")
        elif isinstance(result, Failed):
            lines += ["not measured:", "", "```text", str(result), "```"]
        elif name == "convert":
            lines += convert_section(result)
        elif name == "chat":
            lines += chat_section(result)
        elif name in ("hub", "cpu_buffers", "ladder", "moe", "search"):
            lines += str(result).rstrip().splitlines()
        elif name in ("lora", "publish", "gpu"):
            lines += list(result)
        else:
            lines += ["```text", str(result).rstrip(), "```"]
    lines += ["", f"Command: `python benchmarks/run_all.py {' '.join(args.argv)}`", ""]
    return "\n".join(lines)


# Every benchmark, in the order RESULTS.md shows them; --skip takes these names.
BENCHMARKS = {"convert": run_convert, "chat": run_chat, "plan": run_plan, "hub": run_hub,
              "imatrix": run_imatrix, "load": run_load, "lora": run_lora, "cpu_buffers": run_cpu_buffers,
              "publish": run_publish, "search": run_search, "ladder": run_ladder, "moe": run_moe,
              "gpu": run_gpu}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1b", help="convert.py model size: 1b (default), 7b or tiny")
    ap.add_argument("--quants", default="q4_k_m,q8_0,q4_0", help="convert.py quant levels")
    ap.add_argument("--work", type=Path, help="convert.py scratch folder (default: benchmarks/out)")
    ap.add_argument("--chat-model", type=Path, help="chat.py model (default: its own, Gemma 3 270M)")
    ap.add_argument("--chat-n", type=int, default=256, help="chat.py tokens per run (default 256)")
    ap.add_argument("--chat-repeats", type=int, default=10, help="chat.py runs per path (default 10)")
    ap.add_argument("--load-clients", type=int, default=8, help="load.py concurrent clients (default 8)")
    ap.add_argument("--lora-repeats", type=int, default=3, help="lora.py paired plain/--lora runs (default 3)")
    ap.add_argument("--cpu-repeats", type=int, default=5, help="cpu_buffers.py runs per placement (default 5)")
    ap.add_argument("--skip", default="", help="comma-separated benchmarks to leave out: " + ", ".join(BENCHMARKS))
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md", help="markdown file to write")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - set(BENCHMARKS)
    if unknown:
        ap.error(f"--skip {min(unknown)!r}: choose from {', '.join(BENCHMARKS)}")
    results: dict[str, object] = {}
    for name, fn in BENCHMARKS.items():
        if name in skip:
            continue
        try:
            results[name] = fn(args)
        except Failed as exc:
            print(f"{name} benchmark: {exc}", file=sys.stderr)
            results[name] = exc
    args.out.write_text(render(results, args))
    print(f"wrote {args.out}", file=sys.stderr)
    return 1 if any(isinstance(r, Failed) for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())

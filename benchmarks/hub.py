"""`convert org/name`: streaming from the Hub against download-then-convert.

Builds the LLaMA-shaped f16 checkpoint of benchmarks/convert.py, serves it from
the fake Hub of tests/fake_hub.py on 127.0.0.1 and 127.0.0.2 (API server plus a separate file
host, as huggingface.co does), then for each quant runs, each in a fresh
process with an empty Hugging Face cache:
  stream:   alpaca-local convert bench/model --quant Q          (range requests into the quantizer)
  download: alpaca-local convert bench/model --quant Q --download  (hf_hub_download into the cache, then convert)
and prints wall time, peak memory (the converter's VmHWM, polled: its ru_maxrss
would include this process, which holds the served model, since Linux keeps the
maximum across fork and exec), bytes written to disk (output plus cache) and
bytes sent by the file host, with the ratios.
The local server is no network: wall-time ratios here show the cost of the two
routes' disk traffic and checks, not of a real link (where both are bound by it).

    python benchmarks/hub.py [--size tiny|1b|7b] [--quants q4_k_m,q8_0] [--work DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

REPO = "bench/model"


def _disk_bytes(folder: Path) -> int:
    """Bytes of the regular files under `folder` (the cache's blobs; symlinks not counted)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def run_mode(endpoint: str, quant: str, download: bool, work: Path, served) -> dict:
    home = Path(tempfile.mkdtemp(prefix="hf-home-", dir=work))
    out = home / f"out.{quant}.gguf"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home / "hf"), NO_PROXY="127.0.0.1,127.0.0.2", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "alpaca_local", "convert", REPO, "-q", quant, "-o", str(out), "--json"]
    before = served()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv + (["--download"] if download else []), env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = _watch_peak(proc)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {stderr.strip()[-2000:]}")
    json.loads(stdout)  # the summary: the run finished normally
    row = {
        "mode": "download" if download else "stream", "quant": quant, "seconds": wall,
        "peak_bytes": peak, "output_bytes": out.stat().st_size,
        "disk_bytes": out.stat().st_size + _disk_bytes(home / "hf"), "served_bytes": served() - before,
        "output_sha": _sha(out),
    }
    subprocess.run(["rm", "-rf", str(home)], check=True)
    return row


def _watch_peak(proc: subprocess.Popen) -> int:
    """The child's VmHWM (peak resident bytes, monotonic), read every 50 ms until it exits:
    the last reading is within 50 ms of the end, after all the conversion work."""
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.05)
    return peak


def _sha(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 24):
            h.update(piece)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", help="model size as in convert.py: tiny (default), 1b, 7b")
    ap.add_argument("--quants", default="q4_k_m,q8_0")
    ap.add_argument("--work", type=Path, default=HERE / "out", help="scratch folder (default: benchmarks/out)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)

    import convert as convert_bench  # benchmarks/convert.py: the same checkpoint builder

    from fake_hub import FakeHub

    args.work.mkdir(parents=True, exist_ok=True)
    model = convert_bench.build_model(args.work / f"hf-{args.size}", args.size)
    hub = FakeHub()
    try:
        hub.add_repo(REPO, model)
        source = hub.lfs_bytes(REPO)
        rows = []
        for quant in args.quants.split(","):
            for download in (False, True):
                rows.append(run_mode(hub.endpoint, quant, download, args.work, lambda: hub.bytes_served))
                print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        hub.close()
    result = {"size": args.size, "source_bytes": source, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(render(result))
    return 0


def render(r: dict) -> str:
    """The markdown table RESULTS.md shows (one row per quant: stream / download ratios)."""
    mb = lambda n: f"{n / 1e6:,.0f}"  # noqa: E731
    lines = [
        (f"{r['size']} LLaMA-shaped model, {r['source_bytes'] / 1e9:.2f} GB of f16 safetensors served by "
         "tests/fake_hub.py on 127.0.0.1; each run a fresh process and an empty Hugging Face cache. "
         "disk = output + cache; served = bytes the file host sent. Same output bytes in both routes: "
         + ("yes." if all(a["output_sha"] == b["output_sha"] for a, b in zip(r["rows"][::2], r["rows"][1::2]))
            else "**no**.")),
        "",
        "| quant | route | wall s | peak MB | disk MB | served MB | time ratio | peak ratio | disk ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for stream, down in zip(r["rows"][::2], r["rows"][1::2]):
        for row in (stream, down):
            ratios = ("", "", "") if row is down else (
                f"{stream['seconds'] / down['seconds']:.2f}x", f"{stream['peak_bytes'] / down['peak_bytes']:.2f}x",
                f"{stream['disk_bytes'] / down['disk_bytes']:.2f}x")
            lines.append(f"| {row['quant']} | {row['mode']} | {row['seconds']:.1f} | {mb(row['peak_bytes'])} | "
                         f"{mb(row['disk_bytes'])} | {mb(row['served_bytes'])} | " + " | ".join(ratios) + " |")
    lines.append("")
    lines.append("Ratios are stream / download (below 1: streaming takes less).")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

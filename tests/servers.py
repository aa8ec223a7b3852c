"""A server under test in a subprocess (loopback only), its output lines collected by threads.

Used by tests/test_serve.py (`alpaca-local serve`), tests/test_load.py and tests/test_web.py
(also `tests/scripted_server.py`). The port is read from the banner the server prints,
so every server listens on a free port picked by the OS (`--port 0`).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

TIMEOUT = 60.0  # every wait below is bounded by this
SCRIPTED = Path(__file__).with_name("scripted_server.py")


class Server:
    """A server subprocess; `port` and `base` from its `on http://127.0.0.1:PORT/v1` banner."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, k=sink: k.extend(iter(s.readline, "")), daemon=True).start()
        banner = self.wait_for(self.out, r"on http://127\.0\.0\.1:(\d+)/v1")
        self.port = int(re.search(r":(\d+)/v1", banner).group(1))
        self.base = f"http://127.0.0.1:{self.port}"

    @classmethod
    def serve(cls, model: Path, n_ctx: int, *flags: str) -> "Server":
        """`alpaca-local serve MODEL` on a free port."""
        return cls([sys.executable, "-m", "alpaca_local", "serve", str(model), "--port", "0", "-c", str(n_ctx), *flags])

    @classmethod
    def scripted(cls, model: Path, *flags: str) -> "Server":
        """The real app with a scripted model (tests/scripted_server.py)."""
        return cls([sys.executable, str(SCRIPTED), str(model), *flags])

    def wait_for(self, lines: list[str], pattern: str, start: int = 0) -> str:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            for line in lines[start:]:
                if re.search(pattern, line):
                    return line
            if self.proc.poll() is not None and not any(re.search(pattern, x) for x in lines[start:]):
                raise AssertionError(f"server exited {self.proc.returncode}: {''.join(self.err)}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {TIMEOUT}s; stderr: {''.join(self.err)[-2000:]}")

    def prompts(self) -> list[tuple[str, list[int]]]:
        """Every (prompt, ids) block `--show-prompt` printed so far."""
        text = "".join(self.err)
        blocks = re.findall(r"----- prompt \(\d+ tokens\) -----\n(.*?)\n----- token ids -----\n(\[.*?\])\n-----\n",
                            text, re.S)
        return [(prompt, json.loads(ids)) for prompt, ids in blocks]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)
            raise

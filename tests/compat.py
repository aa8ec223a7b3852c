"""`make compat` (issue 22): alpaca-local installed into a user's Hugging Face environment.

In: the repo root (cwd), PyPI as pip is configured, llama-cpp-python's wheel as built by
`make install` (pip's wheel cache). Out: exit 0, or 1 naming what broke; each step's time.

Two fresh venvs, built side by side (the time is mostly pip and the fake Hub waiting):
- `.cache/venv-compat-new`: torch (the CPU wheel the test extra pins), then the newest
  transformers, peft and huggingface_hub that resolve together, as a fine-tuning user has them.
- `.cache/venv-compat-old`: huggingface_hub==0.34.0, the oldest release we support.
In each: `pip freeze`, then `pip install -e .` (`.[serve]` in the new one, as the issue
did), then `pip freeze` again; a package that installing ours downgraded or removed is a
failure (an upgrade is reported), and so is a `pip check` complaint. In the new
one `import transformers, peft` must still work. Then tests/test_hub.py (downloads) and
tests/test_upload.py (HfApi's upload, issue 26) against the fake Hubs with that client (the
reference test is left out: it drives PEFT and llama.cpp's
converter, whose pins live in the test extra, not here).

llama-cpp-python is compiled from its sdist once (`make install`); its wheel is kept in
~/.cache/alpaca-local/wheels and installed from there, so no venv compiles it again.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP = "llama-cpp-python==0.3.36"  # pyproject.toml's pin
WHEELS = Path.home() / ".cache" / "alpaca-local" / "wheels"
# name -> (venv, what the user's environment has, what of ours gets installed into it)
ENVS = {
    "new": (".cache/venv-compat-new", ["torch==2.13.0", "transformers", "peft", "huggingface_hub", "pytest"], ".[serve]"),
    "old": (".cache/venv-compat-old", ["huggingface_hub==0.34.0", "pytest"], "."),
}
# What must still import after ours is installed, per environment.
IMPORTS = {"new": "import transformers, peft; print('transformers', transformers.__version__, 'peft', peft.__version__)"}


class Failed(Exception):
    pass


class Log:
    """One environment's lines, printed together when it is done (the two run at once)."""

    def __init__(self, name: str) -> None:
        self.name, self.lines, self.start = name, [], time.monotonic()

    def say(self, text: str) -> None:
        self.lines.append(f"[{self.name} {time.monotonic() - self.start:5.0f} s] {text}")

    def run(self, *argv: str | Path, env: dict[str, str] | None = None) -> str:
        t0 = time.monotonic()
        proc = subprocess.run([str(a) for a in argv], cwd=ROOT, env=env, capture_output=True, text=True)
        shown = " ".join(str(a) for a in argv[:6]) + (" ..." if len(argv) > 6 else "")
        self.say(f"{shown}: {time.monotonic() - t0:.0f} s")
        if proc.returncode != 0:
            self.lines.append(proc.stdout[-6000:] + proc.stderr[-6000:])
            raise Failed(f"{shown} exited {proc.returncode}")
        return proc.stdout


def llama_cpp_wheel() -> Path:
    """The cached llama-cpp-python wheel, made from pip's wheel cache the first time."""
    name = LLAMA_CPP.replace("-", "_").replace("==", "-")
    found = sorted(WHEELS.glob(f"{name}-*.whl"))
    if not found:
        WHEELS.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", LLAMA_CPP, "-w", str(WHEELS)],
                       check=True)
        found = sorted(WHEELS.glob(f"{name}-*.whl"))
    return found[-1]


def freeze(log: Log, py: Path) -> dict[str, str]:
    out = log.run(py, "-m", "pip", "freeze", "--all", "--exclude-editable")
    pairs = (line.split("==", 1) for line in out.splitlines() if "==" in line)
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pairs}


def changes(before: dict[str, str], after: dict[str, str]) -> tuple[list[str], list[str]]:
    """(downgraded or removed, upgraded), as 'name old -> new' lines."""
    bad, up = [], []
    for name, old in sorted(before.items()):
        new = after.get(name)
        if new is None:
            bad.append(f"{name} {old} -> removed")
        elif Version(new) < Version(old):
            bad.append(f"{name} {old} -> {new}")
        elif new != old:
            up.append(f"{name} {old} -> {new}")
    return bad, up


def check(name: str, wheel: Path) -> Log:
    folder, packages, ours = ENVS[name]
    log = Log(name)
    venv = ROOT / folder
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        shutil.rmtree(venv, ignore_errors=True)
        log.run(sys.executable, "-m", "venv", venv)
        # --no-compile: byte-compiling all of torch at install is a minute of the budget; imports
        # compile what they use
        log.run(py, "-m", "pip", "install", "--quiet", "--progress-bar", "off", "--no-compile", *packages, env=env)
        before = freeze(log, py)
        log.run(py, "-m", "pip", "install", "--quiet", "--progress-bar", "off", "--no-compile", "-e", ours, wheel, env=env)
        bad, up = changes(before, freeze(log, py))
        for line in up:
            log.say(f"upgraded by ours: {line}")
        if bad:
            raise Failed("installing alpaca-local downgraded or removed: " + "; ".join(bad))
        log.say(f"installing alpaca-local ({ours}) downgraded nothing ({len(before)} packages before)")
        log.run(py, "-m", "pip", "check")  # and left no requirement unmet
        log.say(log.run(py, "-c", "import huggingface_hub as h; print('huggingface_hub', h.__version__)").strip())
        if name in IMPORTS:
            log.say(log.run(py, "-c", IMPORTS[name]).strip())
        out = log.run(py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={venv}/pytest-tmp",
                      "tests/test_hub.py", "tests/test_upload.py", "-m", "not reference", env=env)
        log.say(out.strip().splitlines()[-1])
        log.ok = True
    except Failed as exc:
        log.say(f"FAILED: {exc}")
        log.ok = False
    return log


def main() -> int:
    start = time.monotonic()
    wheel = llama_cpp_wheel()
    print(f"llama-cpp-python from {wheel} ({time.monotonic() - start:.0f} s)", flush=True)
    with ThreadPoolExecutor(len(ENVS)) as pool:
        logs = list(pool.map(lambda n: check(n, wheel), ENVS))
    for log in logs:
        print("\n".join(log.lines), flush=True)
    failed = [log.name for log in logs if not log.ok]
    print(f"compat: {'FAILED ' + ', '.join(failed) if failed else 'ok'} in {time.monotonic() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

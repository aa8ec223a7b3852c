"""What several test files check the same way: the CLI's error contract and the Stanford text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ci_skips import in_ci

from alpaca_local.cli.main import main

# Written out literally from Stanford Alpaca's train.py (PROMPT_DICT), not built from our constants.
STANFORD_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
STANFORD_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Run `alpaca-local ARGV` in-process: (exit code, stderr)."""
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def one_line(rc: int, err: str, code: int, *needles: str) -> str:
    """Assert the error contract (exit `code`, one line, no traceback, naming `needles`); return the line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == code, f"exit {rc}, wanted {code}: {err}"
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Outputs and temp files in `folder`: a failed run must leave none."""
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name or p.name.endswith(".gguf"))


def write_config(model: Path, **changes) -> None:
    """Change keys of a model folder's config.json; None removes the key."""
    cfg = json.loads((model / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (model / "config.json").write_text(json.dumps(cfg))


def skip_or_fail(reason: str) -> None:
    """Skip locally; in CI (root, every tool installed) a test that cannot run is a failure."""
    if in_ci():
        pytest.fail(f"{reason}; CI must run this test (it runs as root)", pytrace=False)
    pytest.skip(reason)

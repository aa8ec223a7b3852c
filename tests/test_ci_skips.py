"""tests/ci_skips.py: with CI=true a skip not on the commented allow-list fails the session.

Inner pytest sessions run in a subprocess on a scratch test file with one test passing, one
skipping, one expected failure (xfail: not a skip) and a module skipped at import.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ci_skips import disallowed_skips, parse_allow_list

SCRATCH = '''
import pytest

def test_passes():
    pass

def test_skips():
    pytest.skip("no frobnicator here")

@pytest.mark.xfail(reason="known bug", strict=True)
def test_expected_failure():
    assert False
'''
SKIPPED_MODULE = 'import pytest\npytest.importorskip("no_such_module_anywhere")\n'


def _session(tmp_path: Path, allow: str | None, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_scratch.py").write_text(SCRATCH)
    (tmp_path / "test_missing_dep.py").write_text(SKIPPED_MODULE)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "ALPACA_CI_ALLOWED_SKIPS")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    if ci is not None:
        env["CI"] = ci
    if allow is not None:
        (tmp_path / "allow.txt").write_text(allow)
        env["ALPACA_CI_ALLOWED_SKIPS"] = str(tmp_path / "allow.txt")
    else:
        env["ALPACA_CI_ALLOWED_SKIPS"] = str(tmp_path / "no-allow-list.txt")
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "ci_skips", "-p", "no:cacheprovider", "-q",
                           "-c", str(tmp_path / "pytest.ini"), str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_a_skip_in_ci_fails_the_session_and_is_listed(tmp_path: Path) -> None:
    proc = _session(tmp_path, allow=None, ci="true")
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, proc.stdout
    assert "2 skip(s) not on the allow-list" in proc.stdout
    assert "test_scratch.py::test_skips: no frobnicator here" in proc.stdout
    assert "test_missing_dep.py: could not import 'no_such_module_anywhere'" in proc.stdout
    assert "test_expected_failure" not in proc.stdout.split("skips are failures in CI")[1]


def test_allowed_skips_pass_in_ci(tmp_path: Path) -> None:
    allow = ("# scratch\n"
             "test_scratch.py::test_skips  # the frobnicator is optional\n"
             "test_missing_dep.py  # an extra CI does not install\n")
    proc = _session(tmp_path, allow=allow, ci="true")
    assert proc.returncode == 0, proc.stdout
    assert "skips are failures in CI" not in proc.stdout


def test_an_allowed_skip_needs_a_reason(tmp_path: Path) -> None:
    proc = _session(tmp_path, allow="test_scratch.py::test_skips\ntest_missing_dep.py  # extra\n", ci="true")
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED
    assert "allow.txt:1: 'test_scratch.py::test_skips' has no '# reason'" in proc.stdout


@pytest.mark.parametrize("ci", [None, "false", ""])
def test_outside_ci_a_skip_is_a_skip(tmp_path: Path, ci: str | None) -> None:
    proc = _session(tmp_path, allow=None, ci=ci)
    assert proc.returncode == 0, proc.stdout
    assert "2 skipped" in proc.stdout and "1 xfailed" in proc.stdout


def test_allow_list_parts() -> None:
    assert parse_allow_list("# only comments\n\n") == {}
    assert disallowed_skips({"a::b": "why"}, {"a::b": "allowed"}) == []
    assert disallowed_skips({"a::b": "why", "c": "gone"}, {"a::b": "allowed"}) == ["c: gone"]


def test_the_repository_allow_list_parses() -> None:
    """Every entry of tests/ci_allowed_skips.txt has its reason."""
    path = Path(__file__).with_name("ci_allowed_skips.txt")
    for nodeid, reason in parse_allow_list(path.read_text(encoding="utf-8"), str(path)).items():
        assert nodeid.startswith("tests/") and reason

"""In CI a skipped test is a failure, unless it is on the commented allow-list.

In: the outcome of every test (and of every collected module) in a pytest session, the
environment variable CI, and `tests/ci_allowed_skips.txt` (or the file that
`$ALPACA_CI_ALLOWED_SKIPS` names): one node id per line, each with a `# reason`.
Out: when CI is set (`CI=true`, as `make ci`, GitHub Actions and GitLab set it), the session
fails if any test or module was skipped without an allow-list entry, and the report lists
them. Locally nothing changes: a skip stays a skip.

Why: a skip hides a test that never ran. CI has every tool (root, `unshare`, `chattr`,
the real models, llama.cpp's tools), so there a test that cannot run is a broken
machine or a broken test, not a reason to pass.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ALLOW_LIST = Path(__file__).with_name("ci_allowed_skips.txt")


def in_ci() -> bool:
    """CI=true (or 1/yes): skips are failures there."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def allow_list_path() -> Path:
    return Path(os.environ.get("ALPACA_CI_ALLOWED_SKIPS", ALLOW_LIST))


def parse_allow_list(text: str, source: str = "ci_allowed_skips.txt") -> dict[str, str]:
    """node id -> reason. Blank lines and full-line comments are ignored; an entry without a
    `# reason` is an error, so every allowed skip says why."""
    allowed: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        nodeid, _, reason = line.partition("#")
        if not reason.strip():
            raise ValueError(f"{source}:{number}: {nodeid.strip()!r} has no '# reason'; say why it may skip in CI")
        allowed[nodeid.strip()] = reason.strip()
    return allowed


def disallowed_skips(skipped: dict[str, str], allowed: dict[str, str]) -> list[str]:
    """The skipped node ids (with their skip reasons) that the allow-list does not name."""
    return [f"{nodeid}: {reason}" for nodeid, reason in skipped.items() if nodeid not in allowed]


class CISkips:
    """The pytest plugin: records skips, fails the session in CI for those not allowed."""

    def __init__(self) -> None:
        self.skipped: dict[str, str] = {}
        self.problems: list[str] = []
        self.path = allow_list_path()

    def _record(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):  # an xfail is expected to fail, not a skip
            longrepr = report.longrepr
            reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
            self.skipped[report.nodeid] = reason.removeprefix("Skipped: ")

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._record(report)  # a module skipped at import (pytest.importorskip)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._record(report)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not in_ci():
            return
        try:
            text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
            self.problems = disallowed_skips(self.skipped, parse_allow_list(text, str(self.path)))
        except ValueError as exc:
            self.problems = [str(exc)]
        if self.problems and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.problems:
            return
        terminalreporter.write_sep("=", "skips are failures in CI", red=True, bold=True)
        terminalreporter.write_line(f"CI=true: {len(self.problems)} skip(s) not on the allow-list {self.path}; "
                                    "make the test run, or add its node id with a '# reason':")
        for problem in self.problems:
            terminalreporter.write_line(f"  {problem}")


def register(config: pytest.Config) -> None:
    """Install the plugin once (tests/conftest.py calls this; `-p ci_skips` works too)."""
    if not config.pluginmanager.has_plugin("ci-skips"):
        config.pluginmanager.register(CISkips(), "ci-skips")


def pytest_configure(config: pytest.Config) -> None:
    register(config)

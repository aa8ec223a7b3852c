"""User-facing errors: one base class, subclasses by kind.

The CLI catches `AlpacaError`, prints its message as one line on stderr and
exits with `exit_code`; anything else is a bug and keeps its traceback.
Exit codes: 2 for usage mistakes (bad flags, output exists), 1 for bad input
files or a failed run.
"""

from __future__ import annotations


class AlpacaError(Exception):
    """An error the user can fix; the message names the problem and the fix."""

    exit_code = 1


class UsageError(AlpacaError):
    """Bad command-line use: unknown choice, absurd value, output already exists."""

    exit_code = 2


class InputError(AlpacaError):
    """A model file or folder that is missing, malformed or unsupported."""

    exit_code = 1


class UnsupportedError(InputError):
    """Well-formed input that this tool does not handle (architecture, dtype...)."""


class RuntimeFailure(AlpacaError):
    """The work itself failed (disk full, interrupted); nothing was left behind."""

    exit_code = 1

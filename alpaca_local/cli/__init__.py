"""The `alpaca-local` command: parse flags, call the library, print.

Holds: `main` (the dispatcher; each command's module is imported only when it
runs, so `--help` is instant) and one thin `*_cmd` module per command.

May import everything below it; nothing below imports from here.
"""

from alpaca_local.cli.main import main

__all__ = ["main"]

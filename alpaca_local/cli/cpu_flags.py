"""`--no-repack`, shared by every command that loads a model in llama.cpp (and by plan).

The placement itself is `convert.cpu_repack` / `run.cpu_buffers`' (issue 21): by default
llama.cpp's own, or on a build with AMX the CPU_REPACK tensors named one by one.
"""

from __future__ import annotations

import argparse

NO_REPACK_HELP = ("no extra CPU buffer types, as llama.cpp's --no-repack: weights are used from the mapped "
                  "file, without CPU_REPACK's faster copies (also: ALPACA_LOCAL_CPU_BUFFERS=none)")


def add_no_repack(p: argparse.ArgumentParser, help_text: str = NO_REPACK_HELP) -> None:
    p.add_argument("--no-repack", action="store_true", help=help_text)

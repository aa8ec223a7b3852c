"""The quant level flags shared by convert, plan and quality: parsing and the help listing."""

from __future__ import annotations

import argparse
import re

from alpaca_local.convert import quant_levels
from alpaca_local.errors import UsageError


def level_arg(text: str) -> str:
    """argparse type for one level: canonical name (any case, aliases), or a one-line usage error."""
    try:
        return quant_levels.usable(text).name
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def levels_arg(text: str) -> list[str]:
    """argparse type for a comma-separated list of levels, or "all"."""
    try:
        return quant_levels.parse_list(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _group(name: str) -> str:
    if name in ("f32", "bf16", "f16"):
        return "float"
    digit = re.search(r"\d", name)  # the bits are the digit in the name: q4_k_m, iq3_xs...
    return f"{digit.group() if digit else '?'}-bit"


def help_table() -> str:
    """The levels by nominal bits, best first within a group (the ladder's order), for --help
    (fits 80 columns)."""
    special = {n for n, lv in quant_levels.LEVELS.items() if lv.trained_for or lv.experts_only or lv.unavailable}
    groups: dict[str, list[str]] = {}
    for name in quant_levels.LADDER:
        lv = quant_levels.LEVELS[name]
        if name not in special:
            groups.setdefault(_group(name), []).append(name + ("*" if lv.imatrix else ""))
    lines = ["quant levels (any case; q3_k, q4_k and q5_k mean the _m mixes):"]
    lines += [f"  {group:<7} {' '.join(names)}" for group, names in groups.items()]
    lines.append("  * needs an importance matrix (--imatrix FILE or --calibrate), as in llama-quantize")
    trained = [f"{n} ({lv.trained_for.split(' (')[0]})" for n, lv in quant_levels.LEVELS.items()
               if lv.trained_for and not lv.unavailable]
    lines.append(f"  only for models trained that way: {', '.join(trained)}")
    lines.append("  only for mixture-of-experts models: " + " ".join(
        n for n, lv in quant_levels.LEVELS.items() if lv.experts_only))
    lines += [f"  not in this build: {n} ({lv.unavailable.split(' (')[0]})"
              for n, lv in quant_levels.LEVELS.items() if lv.unavailable]
    return "\n".join(lines)

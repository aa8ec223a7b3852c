"""`convert --target-size / --target-bpw / --fit [--ctx] / --dry-run`: flags, budget, search, summary.

In:  the parsed convert flags and the base plan (`convert.search.BASE_LEVEL`, with the imatrix).
Out: the plan of the chosen mix for `pipeline.convert` (or None after a --dry-run), and the
     lines/JSON that say what was chosen.
"""

from __future__ import annotations

import argparse
import re

from alpaca_local.errors import UsageError

HELP_EXAMPLES = """size targets (types chosen per tensor by measured error, see README "Target size"):
  alpaca-local convert ./alpaca-7b --target-size 4.2G --imatrix imatrix.gguf   # the best file <= 4.2 GB
  alpaca-local convert ./alpaca-7b --target-bpw 4.5 --calibrate                # <= 4.5 bits per weight
  alpaca-local convert ./alpaca-7b --fit 8 --ctx 8192 --calibrate              # largest that fits 8 GiB at 8k
  alpaca-local convert ./alpaca-7b --target-size 3800M --dry-run               # the mix and its size only"""

# Decimal units as file managers and `ls -h --si` show them; the binary ones spelt out.
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """'4.2G' -> 4_200_000_000, '3800M', '512MiB', '123456789' -> bytes; UsageError otherwise."""
    m = _SIZE_RE.match(text)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise UsageError(f"--target-size {text!r} is not a size; give bytes or a number with K, M, G or T "
                         "(decimal, e.g. 4.2G, 3800M) or KiB, MiB, GiB, TiB")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise UsageError(f"--target-size {text!r} is not a size; give more than 0 bytes")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("size targets")
    target = g.add_mutually_exclusive_group()
    target.add_argument("--target-size", metavar="SIZE",
                        help="the best file no larger than SIZE (bytes, or 4.2G, 3800M, 512MiB): each tensor's "
                             "type is chosen by its measured (imatrix-weighted) error")
    target.add_argument("--target-bpw", metavar="B", type=float,
                        help="the same with at most B bits per weight (tensor bytes x 8 / parameters)")
    target.add_argument("--fit", metavar="VRAM_GB", type=float,
                        help="the largest such file that fits VRAM_GB GiB of GPU memory with its KV cache and "
                             "buffers at --ctx (as `plan` computes them)")
    g.add_argument("--ctx", type=int, default=None, metavar="N", help="context length for --fit (default 4096)")
    g.add_argument("--dry-run", action="store_true",
                   help="with a target: print the chosen mix, its size and predicted loss; write nothing")


def wanted(args: argparse.Namespace) -> bool:
    """A size target was given; refuses flags that only make sense with one, or clash with one."""
    has = args.target_size is not None or args.target_bpw is not None or args.fit is not None
    if not has:
        if args.dry_run:
            raise UsageError("--dry-run goes with --target-size, --target-bpw or --fit")
        if args.ctx is not None:
            raise UsageError("--ctx goes with --fit")
        return False
    if list(args.quant) != ["q4_k_m"]:
        raise UsageError("--quant and a size target both choose the types; give one of them")
    if args.ctx is not None and args.fit is None:
        raise UsageError("--ctx goes with --fit")
    if args.target_size is not None:
        parse_size(args.target_size)
    if args.target_bpw is not None and not 0 < args.target_bpw <= 32:
        raise UsageError(f"--target-bpw {args.target_bpw:g} is out of range; give bits per weight above 0, at most 32")
    if args.fit is not None and not 0.1 <= args.fit <= 4096:
        raise UsageError(f"--fit {args.fit:g} is out of range; give GiB between 0.1 and 4096")
    if args.ctx is not None and not 1 <= args.ctx <= 1 << 24:
        raise UsageError(f"--ctx {args.ctx} is out of range; give 1 to {1 << 24}")
    return True


def budget_bytes(args: argparse.Namespace, plan, smallest: int, largest: int, header: int) -> tuple[int, str]:
    """(whole-file budget in bytes, how it was derived) from the flags; UsageError when no mix fits."""
    if args.target_size is not None:
        budget, how = parse_size(args.target_size), f"--target-size {args.target_size}"
    elif args.target_bpw is not None:
        n_params = sum(job.source.n_elements for job in plan.jobs)
        budget = header + int(args.target_bpw * n_params / 8)
        how = f"--target-bpw {args.target_bpw:g} ({n_params:,} parameters)"
    else:
        budget, how = _fit_budget(plan, args.fit, args.ctx or 4096)
        if budget > largest:
            return largest, how + f"; every tensor at its largest type fits ({largest:,} bytes)"
    from alpaca_local.convert.search import check_budget

    check_budget(budget, smallest, largest, how)
    return budget, how


def _fit_budget(plan, vram_gib: float, n_ctx: int) -> tuple[int, str]:
    """The file size whose weights, KV cache at `n_ctx`, compute buffers and overhead fit `vram_gib`
    (planner: plan/memory.plan_level at the base level, minus its weights). Every byte of the file
    is counted as device memory, which holds the ones llama.cpp keeps on the host (token_embd) too:
    the file fits, with that much to spare."""
    from alpaca_local.convert.search import BASE_LEVEL
    from alpaca_local.plan.memory import RunSettings, plan_level, shape_from_config, usable

    shape = shape_from_config(plan.config, plan.name, str(plan.source))
    p = plan_level(shape, BASE_LEVEL, RunSettings(n_ctx=n_ctx))
    budget = usable(int(vram_gib * (1 << 30))) - p.kv - p.compute - p.overhead
    how = (f"--fit {vram_gib:g} GiB at ctx {n_ctx} (KV {p.kv / 2**20:,.0f} MiB, compute {p.compute / 2**20:,.0f} MiB, "
           f"overhead {p.overhead / 2**20:,.0f} MiB)")
    if budget <= 0:
        raise UsageError(f"{how}: the KV cache and buffers alone do not fit; give a smaller --ctx or more VRAM")
    return budget, how


def choose(plan, args: argparse.Namespace, err):
    """Measure, allocate; print the summary on --dry-run (returns None), else return the result."""
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from alpaca_local.convert import search

    smallest, largest, header = search.size_range(plan)
    budget, how = budget_bytes(args, plan, smallest, largest, header)
    if not plan.imatrix_kv:
        err.print("note: no importance matrix: types are chosen by plain squared error; --imatrix FILE or "
                  "--calibrate weights it by the activations", highlight=False, soft_wrap=True)
    t0 = time.perf_counter()
    columns = (TextColumn("[bold]{task.description:<28}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, disable=args.json or not err.is_terminal) as bar:
        task = bar.add_task("measuring", total=len(plan.jobs))
        options = search.measure(plan, lambda name, done, n: bar.update(task, completed=done, description=name),
                                 workers=args.threads)
    measured = time.perf_counter() - t0
    result = search.search(plan, budget, options)
    info = summary(result, how, measured)
    if args.dry_run:
        if args.json:
            import json

            print(json.dumps(info, indent=2))
        else:
            print_summary(info)
        return None, info
    return result, info


def summary(result, how: str, seconds: float) -> dict:
    from alpaca_local.convert.search import mix_summary

    return {
        "target": how,
        "budget_bytes": result.budget,
        "predicted_bytes": result.file_bytes,
        "predicted_loss": result.predicted_loss,
        "objective": "imatrix-weighted squared error / energy, summed over tensors" if result.weighted
        else "squared error / energy, summed over tensors (no importance matrix)",
        "file_type": result.plan.quant,
        "mix": [{"type": t, "tensors": n, "bytes": b} for t, n, b in mix_summary(result)],
        "levels": {q: {"bytes": result.level_bytes[q], "predicted_loss": result.level_losses.get(q)}
                   for q in result.level_bytes},
        "measure_seconds": round(seconds, 2),
    }


def print_summary(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"target: {info['target']}: at most {info['budget_bytes']:,} bytes", highlight=False)
    console.print(f"chosen mix: {info['predicted_bytes']:,} bytes ({info['predicted_bytes'] / 1e6:,.1f} MB), "
                  f"labelled {info['file_type'].upper()}; predicted loss {info['predicted_loss']:.4g} "
                  f"({info['objective']}); measured in {info['measure_seconds']:.1f} s", highlight=False)
    mix = Table("type", "tensors", "MB", box=None, pad_edge=False)
    for row in info["mix"]:
        mix.add_row(row["type"], str(row["tensors"]), f"{row['bytes'] / 1e6:,.1f}")
    console.print(mix)
    levels = Table("standard level", "MB", "predicted loss", box=None, pad_edge=False)
    for q, row in info["levels"].items():
        loss = row["predicted_loss"]
        levels.add_row(q.upper(), f"{row['bytes'] / 1e6:,.1f}", "-" if loss is None else f"{loss:.4g}")
    console.print(levels)

"""The LoRA side of `alpaca-local convert`: --lora / --lora-scale (merge) and an adapter SRC (--base).

`add_arguments` adds the flags to convert's parser; `read_adapters` turns
--lora/--lora-scale into checked `Adapter`s for the merge; `run_adapter`
writes a llama.cpp adapter GGUF when SRC is a PEFT adapter folder.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from alpaca_local.errors import UsageError

HELP_EXAMPLES = """LoRA adapters (PEFT, Unsloth, axolotl output folders):
  alpaca-local convert ./llama-2-7b --lora ./my-alpaca-lora            # merge, quantize: one pass
  alpaca-local convert ./llama-2-7b --lora ./a --lora ./b --lora-scale 0.8
  alpaca-local convert ./my-alpaca-lora --base ./llama-2-7b -o lora.gguf  # llama.cpp adapter file
  alpaca-local chat models/llama-2-7b.Q4_K_M.gguf --lora lora.gguf"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lora", metavar="ADAPTER", type=Path, action="append", default=[],
        help="PEFT LoRA adapter folder (or Hub id) to merge while converting; repeat to apply several in order",
    )
    p.add_argument(
        "--lora-scale", metavar="S", type=float, action="append", default=[],
        help="multiply the adapter's scale by S (default 1); one value for all, or one per --lora",
    )
    p.add_argument(
        "--base", metavar="BASE", type=Path,
        help="when SRC is an adapter folder (or Hub id): the base model folder (or Hub id) it was trained on",
    )
    p.add_argument(
        "--outtype", choices=("f32", "f16", "q8_0"), default=None,
        help="when SRC is an adapter folder: tensor type of the adapter GGUF (default f16)",
    )


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """chat's and serve's --lora FILE / --lora-scale: an adapter GGUF llama.cpp applies at run time."""
    p.add_argument("--lora", metavar="FILE", type=Path, default=None,
                   help="apply a LoRA adapter GGUF (from `convert ADAPTER --base BASE`) at run time")
    p.add_argument("--lora-scale", metavar="S", type=float, default=1.0, help="strength of --lora (default: 1)")


def _scales(scales: list[float], n: int) -> list[float]:
    for s in scales:
        if not math.isfinite(s):
            raise UsageError(f"--lora-scale {s} is not a finite number")
    if not scales:
        return [1.0] * n
    if len(scales) == 1:
        return scales * n
    if len(scales) != n:
        raise UsageError(f"{len(scales)} --lora-scale values for {n} --lora adapters; give one, or one per adapter")
    return scales


def _adapter_folder(arg: Path, args: argparse.Namespace) -> tuple[Path, str | None]:
    """(folder, name) of a local adapter folder (its own name), or of a Hub adapter repository:
    downloaded whole (adapters are small) into the Hugging Face cache, named after the repo."""
    from alpaca_local.source.hub import resolve_source

    src = resolve_source(arg, offline=getattr(args, "offline", False))
    if isinstance(src, Path):
        return src, None
    src.close()
    return src.folder, src.name


def is_adapter_source(args: argparse.Namespace) -> bool:
    """SRC is a PEFT adapter: a local adapter folder, or a Hub id given with --base."""
    from alpaca_local.source.adapter import is_adapter_folder

    src = Path(args.source)
    return is_adapter_folder(src) if src.exists() else args.base is not None


def read_adapters(args: argparse.Namespace) -> list:
    """The --lora adapters (folders or Hub ids), each read and checked, with its --lora-scale."""
    from alpaca_local.source.adapter import read_adapter

    if args.lora_scale and not args.lora:
        raise UsageError("--lora-scale needs --lora ADAPTER")
    if args.base is not None or args.outtype is not None:
        flag = "--base" if args.base is not None else "--outtype"
        raise UsageError(f"{flag} is for converting an adapter folder (SRC with adapter_config.json); {args.source} is a model")
    adapters = []
    for path, scale in zip(args.lora, _scales(args.lora_scale, len(args.lora))):
        folder, name = _adapter_folder(path, args)
        adapters.append(read_adapter(folder, scale, name))
    return adapters


def run_adapter(args: argparse.Namespace) -> int:
    """SRC is a PEFT adapter folder: write the llama.cpp adapter GGUF."""
    from rich.console import Console

    from alpaca_local.convert.lora_gguf import write_adapter_gguf
    from alpaca_local.source.adapter import read_adapter

    if args.base is None:
        raise UsageError(f"{args.source} is a LoRA adapter; give the base model folder with --base BASE (or merge: convert BASE --lora {args.source})")
    if args.lora:
        raise UsageError("--lora merges adapters into a model; SRC is already an adapter, use --base")
    if args.quant != ["q4_k_m"]:
        raise UsageError("--quant is for models; an adapter GGUF takes --outtype f32|f16|q8_0")
    from alpaca_local.source.hub import resolve_source

    folder, name = _adapter_folder(Path(args.source), args)
    adapter = read_adapter(folder, _scales(args.lora_scale, 1)[0], name)
    base = resolve_source(args.base, offline=getattr(args, "offline", False), metadata_only=True)
    try:  # a Hub base: its config and tensor headers are all an adapter GGUF needs
        folder, weights, base_name = (base, None, None) if isinstance(base, Path) else (
            base.folder, base.weights(), base.name)
        result = write_adapter_gguf(adapter, folder, args.output, args.outtype or "f16", args.force,
                                    base_weights=weights, base_name=base_name)
    finally:
        if not isinstance(base, Path):
            base.close()
    summary = {
        "output": str(result.output), "outtype": result.outtype, "size_bytes": result.file_bytes,
        "tensors": result.n_tensors, "lora_alpha": result.alpha, "seconds": round(result.seconds, 2),
    }
    if args.json:
        import json

        print(json.dumps(summary, indent=2))
        return 0
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in summary.items():
        table.add_row(key.replace("_", " "), str(value))
    table.add_row("use", f"alpaca-local chat BASE.gguf --lora {result.output}")
    Console().print(table)
    return 0

"""`-ngl/--n-gpu-layers` and `--n-cpu-moe`, shared by chat and serve, and their default: the
planner's split when a GPU is found.

Neither flag given: where llama.cpp's build can offload and a GPU is found (`plan.gpu.detect`),
the planner's answer for this file at this context: every layer on the GPU, and for a
mixture-of-experts model the smallest --n-cpu-moe that fits GPU and RAM (`plan.moe_fit`); a
dense model too large for the GPU gets the most layers that fit. Without a GPU: 0 and 0.
`--n-cpu-moe` given alone means every layer on the GPU but those experts, as llama.cpp is used.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Split:
    n_gpu_layers: int
    n_cpu_moe: int
    note: str | None = None  # how the default was chosen, for stderr


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=None, metavar="N",
                   help="layers to offload to the GPU; -1 all (default: the planner's split when a GPU is found, else 0)")
    p.add_argument("--n-cpu-moe", type=int, default=None, metavar="N",
                   help="MoE models: keep the experts of the first N layers in RAM, as llama.cpp's --n-cpu-moe "
                        "(default: the planner's split when a GPU is found, else 0)")


def check(args: argparse.Namespace) -> None:
    from alpaca_local.errors import UsageError

    if args.n_gpu_layers is not None and args.n_gpu_layers < -1:
        raise UsageError(f"-ngl {args.n_gpu_layers}: give -1 (all) or more")
    if args.n_cpu_moe is not None and not 0 <= args.n_cpu_moe <= 4096:
        raise UsageError(f"--n-cpu-moe {args.n_cpu_moe}: give 0 to the number of layers")


def _gpu():
    """The GPU the planner would plan for, or None (no device, or a build that cannot offload)."""
    import llama_cpp

    from alpaca_local.plan.gpu import detect

    if not llama_cpp.llama_supports_gpu_offload():
        return None
    dev = detect()
    return dev if dev.backend != "cpu" and dev.gpus else None


def resolve(args: argparse.Namespace, path: Path) -> Split:
    """The split to load `path` with: the flags as given, the rest from the planner."""
    if args.n_gpu_layers is not None and args.n_cpu_moe is not None:
        return Split(args.n_gpu_layers, args.n_cpu_moe)
    dev = _gpu()
    if args.n_gpu_layers is not None:
        return Split(args.n_gpu_layers, 0)
    if dev is None:
        return Split(0, 0) if args.n_cpu_moe is None else Split(0, args.n_cpu_moe)
    if args.n_cpu_moe is not None:
        return Split(-1, args.n_cpu_moe)
    return planned(path, args.ctx, dev)


def planned(path: Path, n_ctx: int, dev, ram: int | None = None) -> Split:
    """The planner's split for the GGUF `path` on `dev` (plan.gpu.Device) at `n_ctx` tokens."""
    from alpaca_local.convert.gguf_read import read_gguf_header
    from alpaca_local.plan import memory as plan
    from alpaca_local.plan import moe_fit
    from alpaca_local.plan.gpu import available_ram

    shape = plan.shape_from_gguf(read_gguf_header(path))
    level, vram = shape.file_quant, dev.budget
    if level is None:
        return Split(0, 0, "the planner cannot size this file's quant level; running on the CPU (give -ngl)")
    s = plan.RunSettings(n_ctx=n_ctx, backend=dev.backend, cpu=plan.detect_cpu())
    where = f"{dev.gpus[0].name}, {plan.fmt_gib(vram)}"
    if shape.is_moe:
        ram = available_ram() if ram is None else ram
        split = moe_fit.split_for(shape, level, s, vram, ram if ram is not None else 1 << 62)
        if not split.fits:
            return Split(0, 0, f"the planner finds no split of GPU ({where}) and RAM for this model; running on the CPU")
        ngl, n = split.n_gpu_layers, split.n_cpu_moe or 0
    else:
        full = plan.fits(plan.plan_level(shape, level, s), vram)
        ngl, n = (shape.n_layer + 1 if full else plan.max_gpu_layers(shape, level, s, vram)), 0
    flags = f"-ngl {ngl}" + (f" --n-cpu-moe {n}" if n else "")
    return Split(ngl, n, f"GPU found ({where}): {flags}, the planner's split; give -ngl / --n-cpu-moe to choose")

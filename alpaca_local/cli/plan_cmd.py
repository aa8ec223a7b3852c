"""`alpaca-local plan`: which quant level fits this GPU, and the memory each level takes.

`--json` prints one object (sizes in bytes; stable, additions only):

    {
      "model": {"name", "source": "gguf"|"hf"|"catalog", "arch", "n_layer", "hidden",
                "n_head", "n_kv_head", "head_dim", "intermediate", "vocab", "n_ctx_train"},
      "device": {"backend": "cuda"|"metal"|"cpu", "budget_bytes", "usable_bytes",
                 "from": "--vram"|"detected", "note", "gpus": [{"name", "total_bytes", "free_bytes"}],
                 "cpu": {"features": [str], "from": str, "repack_types": {ggml type name: row multiple},
                         "buffers": "auto"|"explicit"|"none"}},
      "settings": {"n_ctx", "n_ctx_padded", "n_batch", "n_ubatch", "cache_type", "flash_attn"},
      "levels": [{"level", "file_bytes", "file_bytes_exact", "weights_gpu_bytes", "weights_cpu_bytes",
                  "repack_bytes", "kv_bytes", "compute_bytes", "output_bytes", "overhead_bytes", "total_bytes",
                  "fits": bool, "max_ctx": int|null (only with --ctx max), "max_gpu_layers",
                  "n_cpu_moe": int|null, "ram_bytes", "needs_imatrix": bool,
                  "mix": bool, "target_bytes": int|null}],  best quality first (see --levels)
      "recommendation": {"level": str|null, "full_offload": bool, "n_gpu_layers", "n_cpu_moe",
                         "gpu_bytes", "cpu_bytes", "reason", "mix": bool},
      "ram": {"budget_bytes", "usable_bytes", "from": "--ram"|"detected"|"unknown"}
      "lora": {"file", "tensors", "bytes"}   (only with --lora: the adapter counted in the weights)
    }
A GGUF file made by `convert --target-size` (a per-tensor mix, its recipe in alpaca_local.target.*)
is planned from its own tensors, exactly as any file: its row has "mix": true, "target_bytes" (the
budget it was made for) and "level" the standard level its general.file_type names (the nearest in
size); the table labels it "target 253M".
With `--ctx max`, each level's row is planned at its own largest context.
A mixture-of-experts model on a GPU (not with --ctx max) is planned with its experts split:
each level's row is at the smallest "n_cpu_moe" (llama.cpp's --n-cpu-moe: the experts of the
first N layers stay in RAM) that fits the GPU and the RAM, null when none does; "ram_bytes" is
the host memory that row needs (CPU model buffers, logits, runtime). "n_cpu_moe" is 0 for
dense models. See plan/moe_fit.py for how the recommendation weighs quality and speed.
"repack_bytes" is the part of weights_cpu_bytes (and, on the cpu backend, of
weights_gpu_bytes) that llama.cpp's CPU_REPACK buffer adds: weights of the types in
device.cpu.repack_types copied into an interleaved layout next to the mapped file
(none on cuda; see plan.REPACK_RULES). device.cpu.buffers is how alpaca-local's loads place
them (convert/cpu_repack.py CPU_BUFFER_MODES): "explicit" on a llama.cpp build with AMX,
"none" with --no-repack or ALPACA_LOCAL_CPU_BUFFERS=none.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from alpaca_local.cli import cpu_flags, levels

DESCRIPTION = """Say which quant level of a model fits your GPU, with the memory llama.cpp will
really take: weights on the GPU, KV cache at your context, compute buffer and
runtime overhead. MODEL is a GGUF file (only its header is read), a Hugging
Face folder or Hub id org/name[@revision] (sizes predicted with the converter's
own rules; from the Hub only config, tokenizer and safetensors headers are
fetched) or a catalog name (default: alpaca-7b). Sizes are GiB (2^30 bytes),
as GPU memory is sold."""

EXAMPLES = """examples:
  alpaca-local plan --vram 8                     # Alpaca 7B on an 8 GB GPU
  alpaca-local plan models/alpaca-7b.Q4_K_M.gguf # detect the GPU, read the file's header
  alpaca-local plan ./alpaca-7b --ctx max --vram 12
  alpaca-local plan Qwen/Qwen2.5-7B-Instruct --vram 8 # from the Hub, nothing large fetched
  alpaca-local plan llama-7b --cache-type q8_0 --json
  alpaca-local plan qwen3-30b-a3b --vram 8 --ram 32   # MoE: which experts stay in RAM, per level
  alpaca-local plan ./alpaca-7b --levels all      # the whole ladder, q8_0 down to iq1_s
  alpaca-local plan ./alpaca-7b --levels q6_k,iq4_xs,IQ3_M --vram 6
  alpaca-local plan models/alpaca-7b.TARGET-4.2G.gguf --vram 6   # a convert --target-size mix

Levels are listed best quality first (measured: KL divergence from f16, see README);
a * level needs an importance matrix (convert --imatrix FILE or --calibrate).

exit codes: 0 done, 1 bad model file, 2 usage error."""

MAX_VRAM_GB = 4096.0


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=DESCRIPTION, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="GGUF file, Hugging Face folder or Hub id, or catalog name (default: alpaca-7b)")
    p.add_argument("--vram", metavar="GB", type=float, default=None,
                   help="GPU memory in GiB (default: detect; CPU RAM when there is no GPU)")
    p.add_argument("--ctx", metavar="N|max", default="2048", help="context length, or 'max' for the largest that fits")
    p.add_argument("--cache-type", default="f16", type=str.lower, metavar="TYPE",
                   help="KV cache type: f16, q8_0, q4_0 (quantized caches use flash attention)")
    p.add_argument("--batch", type=int, default=512, metavar="N", help="n_batch (default 512; n_ubatch is min(N, 512))")
    p.add_argument("--ram", metavar="GB", type=float, default=None,
                   help="host RAM in GiB for what stays on the CPU, e.g. a MoE model's experts "
                        "(default: detect the available memory)")
    p.add_argument("--cpu", action="store_true", help="plan for CPU RAM even if a GPU is found")
    p.add_argument("--lora", metavar="FILE", default=None,
                   help="count a LoRA adapter GGUF applied at run time (chat/serve --lora) in the weights")
    cpu_flags.add_no_repack(p, "plan for chat/serve --no-repack: no CPU_REPACK copies "
                               "(also: ALPACA_LOCAL_CPU_BUFFERS=none)")
    p.add_argument("--levels", metavar="LIST", type=levels.levels_arg, default=None,
                   help="quant levels to show, comma-separated, or 'all' for the whole ladder (default: "
                        "f16,q8_0,q6_k,q5_k_m,q4_k_m,iq4_xs,q3_k_m,iq3_m,iq2_m; a GGUF file's own level is always shown)")
    p.add_argument("--json", action="store_true", help="print a JSON object (see module docs) instead of a table")


def _settings(args: argparse.Namespace, backend: str):
    from alpaca_local.errors import UsageError
    from alpaca_local.plan.memory import RunSettings, check_settings, detect_cpu, machine_mode, requested_mode

    ctx = args.ctx.strip().lower()
    if ctx != "max" and not ctx.isdigit():
        raise UsageError(f"--ctx {args.ctx!r} is not a number or 'max'")
    # The placement of CPU weights matters on the CPU backend (cuda repacks nothing); there
    # the build is asked whether it has AMX (convert/cpu_repack.py), which imports llama.cpp.
    buffers = machine_mode(args.no_repack) if backend == "cpu" else requested_mode(args.no_repack)
    s = RunSettings(n_ctx=2048 if ctx == "max" else int(ctx), n_batch=args.batch, cache_type=args.cache_type,
                    backend=backend, cpu=detect_cpu(), cpu_buffers=buffers)
    check_settings(s)
    return s, ctx == "max"


def _device(args: argparse.Namespace):
    from alpaca_local.errors import UsageError
    from alpaca_local.plan.gpu import GPU, Device, detect

    if args.vram is not None:
        if not 0.1 <= args.vram <= MAX_VRAM_GB:
            raise UsageError(f"--vram {args.vram:g} is out of range; give GiB between 0.1 and {MAX_VRAM_GB:g}")
        size = int(args.vram * (1 << 30))
        backend = "cpu" if args.cpu else "cuda"
        return Device(backend, (GPU("--vram", size, size),), "from --vram"), "--vram"
    dev = detect()
    if args.cpu and dev.backend != "cpu":
        from alpaca_local.plan.gpu import parse_meminfo

        with open("/proc/meminfo", encoding="ascii") as f:
            ram = parse_meminfo(f.read())
        dev = Device("cpu", (ram,) if ram else (), "planning for CPU RAM (--cpu)")
    if not dev.gpus:
        raise UsageError("cannot tell how much memory this machine has; give --vram GB")
    return dev, "detected"


def _ram(args: argparse.Namespace) -> tuple[int | None, str]:
    """Host RAM for the CPU side of a split: --ram, else /proc/meminfo's MemAvailable."""
    from alpaca_local.errors import UsageError
    from alpaca_local.plan.gpu import available_ram

    if args.ram is not None:
        if not 0.1 <= args.ram <= MAX_VRAM_GB:
            raise UsageError(f"--ram {args.ram:g} is out of range; give GiB between 0.1 and {MAX_VRAM_GB:g}")
        return int(args.ram * (1 << 30)), "--ram"
    ram = available_ram()
    return (ram, "detected") if ram else (None, "unknown")


def _lora(path: str | None, shape) -> tuple:
    """The adapter's tensors as the planner counts them, after checking it is a LoRA for this architecture."""
    if path is None:
        return ()
    from pathlib import Path

    from alpaca_local.convert.lora_gguf import read_adapter_header
    from alpaca_local.errors import InputError
    from alpaca_local.plan.shape import PlannedTensor

    adapter = read_adapter_header(Path(path))
    if adapter.arch != shape.arch:
        raise InputError(f"{path} is a LoRA for {adapter.arch} but the model is {shape.arch}; give the adapter made for it")
    return tuple(PlannedTensor(t.name, t.shape, t.ggml_type, t.nbytes) for t in adapter.tensors)


def build_report(args: argparse.Namespace) -> dict:
    from alpaca_local.plan import memory as plan

    dev, origin = _device(args)
    s, ctx_max = _settings(args, dev.backend)
    shape = plan.load_shape(args.model)
    lora = _lora(args.lora, shape)
    s = replace(s, lora=lora)
    budget = dev.budget
    ram, ram_from = _ram(args)
    levels = plan.levels_for(shape, tuple(args.levels) if args.levels else plan.LEVELS)
    rows, plans, splits = [], {}, []
    cpu = s.cpu_features
    split_experts = shape.is_moe and dev.backend != "cpu" and not ctx_max
    for level in levels:
        ls = s
        best_ctx = None
        if ctx_max:
            best_ctx = plan.max_context(shape, level, s, budget)
            ls = replace(s, n_ctx=best_ctx or plan.CTX_PAD)
        if split_experts:
            from alpaca_local.plan import moe_fit

            split = moe_fit.split_for(shape, level, ls, budget, ram if ram is not None else 1 << 62)
            splits.append(split)
            plans[level] = split.plan
            rows.append({**_row(split.plan, split.fits, None, split.n_gpu_layers, split.n_cpu_moe, split.ram),
                         "needs_imatrix": plan.needs_imatrix(shape, level)})
            continue
        p = plan.plan_level(shape, level, ls)
        plans[level] = p
        fits = plan.fits(p, budget)
        ngl = shape.n_layer + 1 if fits else plan.max_gpu_layers(shape, level, ls, budget)
        rows.append({**_row(p, fits, best_ctx, ngl, 0, p.weights_cpu + p.output + plan.OVERHEAD["cpu"]),
                     "needs_imatrix": plan.needs_imatrix(shape, level)})
    for row in rows:  # the file's own row, when the file is a per-tensor mix
        mix = shape.file_target is not None and row["level"] == shape.file_quant
        row.update(mix=mix, target_bytes=shape.file_target if mix else None)
    if split_experts:
        rec = moe_fit.recommend(shape, splits, budget)
    else:
        rec = plan.recommend(shape, plans, s, budget) if not ctx_max else _ctx_max_recommendation(shape, plans, rows, budget)
    report = {
        "model": {**{k: getattr(shape, k) for k in ("name", "source", "arch", "n_layer", "hidden", "n_head",
                                                    "n_kv_head", "head_dim", "intermediate")},
                  "vocab": shape.vocab_size, "n_ctx_train": shape.n_ctx},
        "device": {"backend": dev.backend, "budget_bytes": budget, "usable_bytes": plan.usable(budget), "from": origin,
                   "note": dev.note, "gpus": [{"name": g.name, "total_bytes": g.total, "free_bytes": g.free} for g in dev.gpus],
                   "cpu": {"features": list(cpu.features), "from": cpu.source,
                           "repack_types": {t.name: n for t, n in plan.cpu_placement(s, shape, ())[0].items()},
                           "buffers": s.cpu_buffers}},
        "settings": {"n_ctx": "max" if ctx_max else s.n_ctx, "n_ctx_padded": None if ctx_max else plan.padded_ctx(s.n_ctx),
                     "n_batch": s.n_batch, "n_ubatch": s.n_ubatch, "cache_type": s.cache_type, "flash_attn": s.flash_attn},
        "levels": rows,
        "recommendation": {"level": rec.level, "full_offload": rec.full, "n_gpu_layers": rec.n_gpu_layers,
                           "n_cpu_moe": rec.n_cpu_moe, "gpu_bytes": rec.gpu_bytes, "cpu_bytes": rec.cpu_bytes,
                           "reason": rec.reason,
                           "mix": shape.file_target is not None and rec.level == shape.file_quant},
        "ram": {"budget_bytes": ram, "usable_bytes": plan.usable(ram) if ram else None, "from": ram_from},
    }
    if args.lora:
        report["lora"] = {"file": args.lora, "tensors": len(lora), "bytes": sum(t.nbytes for t in lora)}
    return report


def _row(p, fits: bool, max_ctx: int | None, max_ngl: int, n_cpu_moe: int | None, ram: int) -> dict:
    return {
        "level": p.level, "file_bytes": p.file_bytes, "file_bytes_exact": p.exact_file,
        "weights_gpu_bytes": p.weights_gpu, "weights_cpu_bytes": p.weights_cpu, "repack_bytes": p.repack, "kv_bytes": p.kv,
        "compute_bytes": p.compute, "output_bytes": p.output, "overhead_bytes": p.overhead,
        "total_bytes": p.total_gpu, "fits": fits, "max_ctx": max_ctx, "max_gpu_layers": max_ngl,
        "n_cpu_moe": n_cpu_moe, "ram_bytes": ram,
    }


def _label(row: dict) -> str:
    """A row's name in the table: the level, or "target 253M" for a per-tensor mix."""
    from alpaca_local.convert.search import target_label

    return target_label(row["target_bytes"]) if row["mix"] else row["level"]


def _ctx_max_recommendation(shape, plans: dict, rows: list[dict], budget: int):
    from alpaca_local.plan.memory import Recommendation, fmt_gib

    for row in rows:
        if row["max_ctx"]:
            p = plans[row["level"]]
            return Recommendation(row["level"], shape.n_layer + 1, True, p.total_gpu, p.weights_cpu + p.output,
                                  f"highest quality that fits; up to {row['max_ctx']} tokens of context "
                                  f"({fmt_gib(budget)} budget)")
    return Recommendation(None, 0, False, 0, 0, "no level fits fully even at 256 tokens of context")


def run(args: argparse.Namespace) -> int:
    report = build_report(args)
    if args.json:
        import json

        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


def _print(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    gib = lambda n: f"{n / (1 << 30):.2f}"  # noqa: E731
    m, d, s = report["model"], report["device"], report["settings"]
    where = "VRAM" if d["backend"] != "cpu" else "RAM"
    title = (f"{m['name']} ({m['arch']}, {m['n_layer']} layers) - ctx {s['n_ctx']}, KV {s['cache_type']}, "
             f"batch {s['n_batch']} - {where} {gib(d['budget_bytes'])} GiB ({d['from']})")
    t = Table(title=title, title_justify="left")
    # On the CPU, the repacked copies are part of "weights in RAM"; the column says how much.
    repack = d["backend"] == "cpu" and any(r["repack_bytes"] for r in report["levels"])
    # A MoE split: the host memory each row needs, and how many layers' experts stay there.
    moe = any(r["n_cpu_moe"] for r in report["levels"]) or report["recommendation"]["n_cpu_moe"] > 0
    # (the overhead column gives way to them; it is in the total either way)
    for col in ("level", "file", f"weights in {where}", *(("of which repack",) if repack else ()), "KV", "compute",
                *(() if moe else ("overhead",)), "total", *(("RAM", "n-cpu-moe") if moe else ("fits",))):
        t.add_column(col, justify="left" if col == "level" else "right")
    if s["n_ctx"] == "max":
        t.add_column("max ctx", justify="right")
    label = {r["level"]: _label(r) for r in report["levels"]}
    for r in report["levels"]:
        fit = "[green]yes[/]" if r["fits"] else f"[red]no[/] ({r['max_gpu_layers']} layers)"
        if moe:  # the smallest --n-cpu-moe that fits GPU and RAM
            fit = f"[green]{r['n_cpu_moe']}[/]" if r["fits"] else "[red]no[/]"
        cells = [label[r["level"]] + ("*" if r["needs_imatrix"] else ""), gib(r["file_bytes"]) + ("" if r["file_bytes_exact"] else "~"), gib(r["weights_gpu_bytes"]),
                 *((gib(r["repack_bytes"]),) if repack else ()), gib(r["kv_bytes"]), gib(r["compute_bytes"]),
                 *(() if moe else (gib(r["overhead_bytes"]),)), gib(r["total_bytes"]),
                 *((gib(r["ram_bytes"]),) if moe else ()), fit]
        if s["n_ctx"] == "max":
            cells.append(str(r["max_ctx"] or "-"))
        t.add_row(*cells)
    console = Console()
    console.print(t)
    console.print(f"sizes in GiB; ~ = header size estimated; usable {gib(d['usable_bytes'])} GiB after the safety margin. {d['note']}")
    for r in report["levels"]:
        if r["mix"]:
            console.print(f"{label[r['level']]}: this file, a per-tensor mix made by convert --target-size "
                          f"{r['target_bytes']:,} (labelled {r['level'].upper()}, the nearest level in size); "
                          "sized from its own tensors.", highlight=False)
    if any(r["needs_imatrix"] for r in report["levels"]):
        console.print("* needs an importance matrix: convert --imatrix FILE or --calibrate (sized as made with one).")
    if report.get("lora"):
        lo = report["lora"]
        console.print(f"weights include the LoRA {lo['file']}: {lo['tensors']} tensors, {lo['bytes'] / 1e6:,.1f} MB.")
    if repack:
        c = d["cpu"]
        console.print(f"repack: llama.cpp copies {', '.join(c['repack_types'])} weights into an interleaved layout "
                      f"beside the mapped file (CPU features {', '.join(c['features'])}, from {c['from']}).")
        if c["buffers"] == "explicit":
            console.print("This llama.cpp build has AMX, whose buffer crashes at the first decode (llama.cpp "
                          "#20824): alpaca-local hands CPU_REPACK its weights itself, as counted here.")
    rec = dict(report["recommendation"])
    if rec["level"]:
        rec["level"] = label.get(rec["level"], rec["level"])
    if moe:
        ram = report["ram"]
        console.print(f"RAM {gib(ram['budget_bytes']) + ' GiB (' + ram['from'] + ')' if ram['budget_bytes'] else 'unknown'}; "
                      "n-cpu-moe: the smallest --n-cpu-moe N that fits, N = the first N layers keep their experts "
                      "in RAM (a token reads only a few experts: far cheaper than whole layers); total includes "
                      f"{gib(report['levels'][0]['overhead_bytes'])} GiB of runtime overhead.")
    if rec["level"] and rec["n_cpu_moe"]:
        ngl = "" if rec["n_gpu_layers"] > m["n_layer"] else f" -ngl {rec['n_gpu_layers']}"
        console.print(f"[bold]recommended: {rec['level']} with --n-cpu-moe {rec['n_cpu_moe']}{ngl}[/] - {rec['reason']}; "
                      f"GPU {gib(rec['gpu_bytes'])} GiB, RAM {gib(rec['cpu_bytes'])} GiB.")
    elif rec["level"] and rec["full_offload"]:
        console.print(f"[bold]recommended: {rec['level']}[/] - {rec['reason']}; "
                      f"needs {gib(rec['gpu_bytes'])} GiB of {gib(d['budget_bytes'])} GiB.")
    elif rec["level"]:
        console.print(f"[bold]recommended: {rec['level']} with -ngl {rec['n_gpu_layers']}[/] (n_gpu_layers) - {rec['reason']}; "
                      f"GPU {gib(rec['gpu_bytes'])} GiB, CPU RAM {gib(rec['cpu_bytes'])} GiB.")
    else:
        console.print(f"[bold]recommended: none[/] - {rec['reason']}")

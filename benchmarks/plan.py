"""Planner benchmarks: latency on a 7B GGUF header, and prediction error against llama.cpp.

    .venv/bin/python benchmarks/plan.py            # both tables (~1 min, CPU only)

1. Latency: a 7B-shaped GGUF (full 291-tensor table and 32001-token vocab, real
   file size) is written as a *sparse* file: header bytes, then a hole up to the
   size the tensors take. `plan` reads only the header, so it is a real test of
   the 0.5 s target without 4-13 GB of disk.
2. Accuracy: GGUF files made by our converter (several shapes and levels) and the sparse
   7B files are loaded by llama-cpp-python on the CPU in a subprocess; the
   buffer sizes llama.cpp logs (CPU_Mapped, CPU_REPACK, KV, compute) are compared
   with `plan`'s prediction.

The helpers are imported by tests/test_plan.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gguf  # noqa: E402

from alpaca_local.plan import catalog  # noqa: E402
from alpaca_local.plan import memory as plan  # noqa: E402
from alpaca_local.convert.architectures import LLAMA  # noqa: E402
from alpaca_local.convert.cpu_repack import BUFFERS_ENV  # noqa: E402

MiB = 1 << 20

# --------------------------------------------------------------------------
# A header-only (sparse) GGUF of any LLaMA shape
# --------------------------------------------------------------------------


def write_sparse_gguf(path: Path, shape: plan.ModelShape, level: str, eos: int = 2) -> Path:
    """A loadable GGUF with real metadata, vocab and tensor table, whose data is a hole of zeros
    (the shape's architecture; a SentencePiece-style vocabulary, which llama.cpp loads for any).
    `eos`: the end-of-sequence token ("</s>", 2); zero weights give every token the same logit and
    the sampler the lowest id, so a speed test that must generate moves it to the last one."""
    arch = plan._architecture(shape) or LLAMA
    cfg = replace(plan._as_config(shape, arch), explicit_head_dim=True)  # key_length: head_dim may not be hidden / heads
    w = gguf.GGUFWriter(path, arch.arch_name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(shape.name)
    arch.metadata(w, cfg)
    w.add_file_type(int(plan.quant_rules.file_type(level)))
    n_special, n_bytes = 3, 256
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(n_bytes)]
    tokens += [f"\u2581t{i}" for i in range(shape.vocab_size - len(tokens))]
    types = [2, 3, 3] + [6] * n_bytes + [1] * (shape.vocab_size - n_special - n_bytes)
    if eos != 2:
        tokens[2], tokens[eos], types[2], types[eos] = tokens[eos], tokens[2], types[eos], types[2]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * shape.vocab_size)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(eos)
    data = 0
    for t in plan.tensors_for(shape, level):
        w.add_tensor_info(t.name, t.shape, gguf.np.dtype(gguf.np.float32), t.nbytes, raw_dtype=t.ggml_type)
        data += plan._pad(t.nbytes, plan.GGUF_ALIGNMENT)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    header = plan._pad(path.stat().st_size, plan.GGUF_ALIGNMENT)
    os.truncate(path, header + data)  # the hole: no disk blocks, reads as zeros
    return path


# --------------------------------------------------------------------------
# What llama.cpp itself reports
# --------------------------------------------------------------------------

_PROBE = r"""
import json, os, sys, tempfile
import llama_cpp
from alpaca_local.convert.gguf_read import read_gguf_header
from alpaca_local.run.cpu_buffers import llama_defaults, load_placement
path, n_ctx, n_batch, cache, swa_full = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
ctype = getattr(llama_cpp, "GGML_TYPE_" + cache.upper())
# Weights placed as alpaca-local's own loads place them ($ALPACA_LOCAL_CPU_BUFFERS, AMX builds):
# the planner predicts those loads.
with llama_defaults(load_placement(read_gguf_header(path))):
    m = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=n_batch, n_gpu_layers=0, verbose=True,
                        type_k=ctype, type_v=ctype, flash_attn=cache != "f16",
                        swa_full=None if swa_full == "default" else swa_full == "1")
print(json.dumps({"model_size": llama_cpp.llama_model_size(m.model)}))
"""

# "load_tensors:   CPU_Mapped model buffer size =     1.47 MiB" (llama-model.cpp), KV and output
# buffers (llama-kv-cache.cpp, llama-context.cpp), and the 4-decimal compute line that
# ~llama_context prints on teardown.
_PATTERNS = {
    "model": r"(\S+) model buffer size =\s*([\d.]+) MiB",
    "kv": r"(\S+) KV buffer size =\s*([\d.]+) MiB",
    # the size at teardown ("is": as reserved; "of ..., does not match": it grew), and as reserved
    "compute": r"(\S+) compute buffer size (?:is|of)\s*([\d.]+) MiB",
    "compute_reserved": r"(\S+) compute buffer size =\s*([\d.]+) MiB",
    "output": r"(\S+)\s+output buffer size =\s*([\d.]+) MiB",
}


def llama_cpp_report(path: Path, n_ctx: int, n_batch: int = 512, cache: str = "f16",
                     swa_full: bool | None = None, cpu_buffers: str | None = None) -> dict:
    """Load `path` in llama-cpp-python (CPU) in a subprocess; the logged buffer sizes in MiB.

    `swa_full`: passed to Llama(); None leaves llama-cpp-python's default. `cpu_buffers`: the
    placement mode (convert/cpu_repack.py CPU_BUFFER_MODES); None: this machine's.

    A subprocess because llama.cpp logs straight to fd 2 and may abort the process on a bad file.
    Returns {"model": {buffer: MiB}, "kv": ..., "compute": ..., "output": ..., "model_size": bytes}.
    """
    with tempfile.TemporaryFile() as err:
        flag = "default" if swa_full is None else str(int(swa_full))
        env = dict(os.environ, PYTHONPATH=str(ROOT), **({BUFFERS_ENV: cpu_buffers} if cpu_buffers else {}))
        proc = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(n_ctx), str(n_batch), cache, flag],
                              stdout=subprocess.PIPE, stderr=err, timeout=300, env=env)
        err.seek(0)
        log = err.read().decode(errors="replace")
    if proc.returncode:
        raise RuntimeError(f"llama.cpp failed on {path}: {log[-2000:]}")
    return json.loads(proc.stdout.decode().strip().splitlines()[-1]) | parse_buffers(log)


def parse_buffers(log: str) -> dict:
    """The buffer sizes (MiB) in a llama.cpp load log: {"model": {buffer: MiB}, "kv": ...,
    "compute": ..., "output": ..., "kv_cells": [cells of each cache]} (any backend: CPU, CUDA0, CUDA_Host)."""
    # "llama_kv_cache: size =    0.75 MiB (  1024 cells, ...": each cache's cells (two with SWA layers)
    report: dict = {"kv_cells": [int(n) for n in re.findall(r"llama_kv_cache: size =\s*[\d.]+ MiB \(\s*(\d+) cells", log)]}
    for key, pattern in _PATTERNS.items():
        # Summed per buffer name: a model with sliding-window layers has two KV caches
        # (llama_kv_cache_iswa: base and SWA), each logging its own "CPU KV buffer size" line.
        report[key] = {}
        for buf, size in re.findall(pattern, log):
            report[key][buf] = report[key].get(buf, 0.0) + float(size)
    report["compute"] = report["compute"] or report["compute_reserved"]  # a process that died before teardown
    return report


def mib(n: int, decimals: int) -> float:
    return round(n / MiB, decimals)


def compare(path: Path, n_ctx: int, n_batch: int = 512, cache: str = "f16", swa_full: bool | None = None,
            cpu_buffers: str | None = None) -> dict:
    """Prediction vs llama.cpp (CPU backend) for one file: MiB each, plus relative total error.

    "model" is all model buffers together; "mapped" (CPU_Mapped) and "repack"
    (CPU_REPACK, ggml-cpu's interleaved copies) are its two parts; "other_buffers" names any
    other model buffer llama.cpp made (an AMX one would be there), which the planner does not expect.
    `cpu_buffers`: the placement mode of both sides; None: this machine's.
    """
    from alpaca_local.convert.gguf_read import read_gguf_header

    shape = plan.shape_from_gguf(read_gguf_header(path))
    s = plan.RunSettings(n_ctx=n_ctx, n_batch=n_batch, cache_type=cache, backend="cpu", cpu_buffers=cpu_buffers,
                         swa_full=plan.RunSettings.swa_full if swa_full is None else swa_full)
    p = plan.plan_level(shape, shape.file_quant, s)
    got = llama_cpp_report(path, n_ctx, n_batch, cache, swa_full, cpu_buffers)
    measured = {k: sum(got[k].values()) for k in ("model", "kv", "compute", "output")}
    predicted = {"model": p.weights_cpu / MiB, "kv": p.kv / MiB, "compute": p.compute / MiB, "output": p.output / MiB}
    m_total, p_total = sum(measured.values()), sum(predicted.values())
    return {
        "file": path.name, "n_ctx": n_ctx, "cache": cache, "kv_cells": got["kv_cells"],
        "measured": measured, "predicted": predicted,
        "buffers": {"mapped": (got["model"].get("CPU_Mapped", 0.0), (p.weights_cpu - p.repack) / MiB),
                    "repack": (got["model"].get("CPU_REPACK", 0.0), p.repack / MiB)},
        "model_size": got["model_size"], "tensor_bytes": sum(t.nbytes for t in shape.file_tensors),
        "repacked": "CPU_REPACK" in got["model"], "total_error": (p_total - m_total) / m_total,
        "other_buffers": sorted(set(got["model"]) - {"CPU_Mapped", "CPU_REPACK"}),
        "model_error": (predicted["model"] - measured["model"]) / measured["model"],
    }


def library_cpu_features() -> str:
    """What the installed llama.cpp was compiled for (ggml_cpu_has_* are compile-time tests),
    to check `plan.detect_cpu` against."""
    out = subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
                         capture_output=True, text=True, check=True).stdout
    return " ".join(w for w in re.findall(r"(\w+) = 1", out) if w in ("AVX2", "AVX512", "REPACK", "AMX_INT8",
                                                                         "NEON", "DOTPROD", "MATMUL_INT8", "SVE"))


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

SHAPES = {  # name -> tests/tinymodels.build_llama keyword arguments
    "mha-256": dict(hidden=256, n_layer=2, n_head=4, n_kv_head=4, intermediate=512),
    "gqa-384": dict(hidden=384, n_layer=4, n_head=6, n_kv_head=2, intermediate=1536),
    "mha-512": dict(hidden=512, n_layer=3, n_head=8, n_kv_head=8, intermediate=1024),
    "mqa-256": dict(hidden=256, n_layer=2, n_head=2, n_kv_head=1, intermediate=768, sp_vocab_size=1000),
    # ffn_gate/up have 804 rows: a multiple of 4, not of 8, so x86 does not repack them
    "ffn-804": dict(hidden=256, n_layer=2, n_head=4, n_kv_head=4, intermediate=804),
}
LEVELS = ("f16", "q8_0", "q4_k_m", "q4_0")


def latency(tmp: Path) -> None:
    shape = plan.shape_from_config(catalog.load("alpaca-7b"), "alpaca-7b", "catalog")
    print("planner latency on a sparse 7B GGUF (full tensor table + 32001-token vocab)")
    for level in ("q4_k_m", "f16"):
        path = write_sparse_gguf(tmp / f"alpaca-7b.{level}.gguf", shape, level)
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "alpaca_local", "plan", str(path), "--vram", "8", "--json"],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        from alpaca_local.convert.gguf_read import read_gguf_header

        read_gguf_header(path)
        read = time.perf_counter() - t0
        rec = json.loads(out.stdout)["recommendation"]["level"]
        print(f"  {level:7s} {path.stat().st_size / 1e9:6.2f} GB file: header read {read * 1000:6.1f} ms, "
              f"`plan` command {wall * 1000:6.0f} ms (recommends {rec})")


def accuracy(tmp: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import tinyarch
    import tinymodels

    from alpaca_local.convert.pipeline import convert

    files = []
    for name, kw in SHAPES.items():
        src = tinymodels.build_llama(tmp / f"hf-{name}", **kw).path
        for level in LEVELS:
            files.append(convert(src, tmp / f"{name}.{level}.gguf", level).output)
    for arch in tinyarch.ARCHS:  # Mistral, Llama 3 (tied), Qwen2 (biases), Gemma 2 (sliding window)
        src = tinyarch.BUILDERS[arch](tmp / f"hf-{arch}").path
        for level in ("f16", "q8_0", "q4_k_m"):
            files.append(convert(src, tmp / f"{arch}.{level}.gguf", level).output)
    shape7 = plan.shape_from_config(catalog.load("alpaca-7b"), "alpaca-7b", "catalog")
    files.append(write_sparse_gguf(tmp / "alpaca-7b.Q8_0.gguf", shape7, "q8_0"))
    files.append(write_sparse_gguf(tmp / "alpaca-7b.Q4_0.gguf", shape7, "q4_0"))
    cpu = plan.detect_cpu()
    print(f"\nCPU_REPACK rule: features {', '.join(cpu.features) or 'none'} ({cpu.source}); "
          f"llama.cpp build: {library_cpu_features()}; repacked types: "
          + ", ".join(f"{t.name} (rows % {n})" for t, n in cpu.repack_rows.items()))
    print("prediction vs llama.cpp (CPU backend), MiB, measured then predicted; model = CPU_Mapped + CPU_REPACK;")
    print("model bytes exact (=) when sum of ggml_nbytes == llama_model_size; model err is against the printed\n"
          "2-decimal buffers, so files of a few MiB show the rounding")
    print(f"  {'file':22s} {'ctx':>5s} {'kv':>5s} | {'CPU_Mapped':>16s} | {'CPU_REPACK':>16s} | {'model err':>9s} | "
          f"{'KV':>15s} | {'compute':>17s} | total err")
    for path in files:
        for n_ctx, cache in ((1000, "f16"), (2048, "f16"), (4096, "f16"), (2048, "q8_0"), (256, "f16")):
            if path.name.startswith("alpaca-7b") and (n_ctx == 4096 or ("Q4_0" in path.name and n_ctx != 2048)):
                continue  # the 7B q4_0 repacks ~3.5 GB per load: one setting is enough
            r = compare(path, n_ctx, cache=cache)
            m, p, b = r["measured"], r["predicted"], r["buffers"]
            exact = "=" if r["model_size"] == r["tensor_bytes"] else "!"
            print(f"  {r['file']:22s} {n_ctx:5d} {cache:>5s} | {b['mapped'][0]:7.2f} {b['mapped'][1]:7.2f}{exact} | "
                  f"{b['repack'][0]:7.2f} {b['repack'][1]:8.2f} | {r['model_error']:+9.1%} | "
                  f"{m['kv']:7.2f} {p['kv']:7.2f} | {m['compute']:8.3f} {p['compute']:8.3f} | {r['total_error']:+6.1%}")


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        latency(Path(d))
        accuracy(Path(d))


if __name__ == "__main__":
    main()

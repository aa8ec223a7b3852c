"""Where alpaca-local's own llama.cpp loads put a model's weights on the CPU, and a pre-flight
decode that turns a crash inside the native library into one line (issue 21).

In:  a GGUF header and the user's choice (`--no-repack`, `$ALPACA_LOCAL_CPU_BUFFERS`).
Out: a `LoadPlacement`, set on llama_model_params (`use_extra_bufts`, `tensor_buft_overrides`)
     by `chat.load_llama` (chat, serve, quality) and the imatrix collector.

The decision is `convert.cpu_repack`'s (the planner counts the same tensors): on a build whose
CPU backend registers AMX (llama.cpp #20824) the weights CPU_REPACK supports are handed to it
by name with the extra buffer types off; elsewhere llama.cpp places them itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NoReturn
from pathlib import Path

from alpaca_local.convert.cpu_repack import (
    BUFFERS_ENV,
    CPU_BUFFER_MODES,
    build_facts,
    crash_reasons,
    effective_mode,
    expert_override_patterns,
    explicit_repack,
    requested_mode,
)
from alpaca_local.convert.gguf_read import GGUFHeader
from alpaca_local.errors import RuntimeFailure

REPACK_BUFFER = "CPU_REPACK"  # ggml-cpu's buffer type name (repack.cpp ggml_backend_cpu_repack_buffer_type)
PREFLIGHT_ENV = "ALPACA_LOCAL_PREFLIGHT"  # "0": skip the pre-flight decode


@dataclass(frozen=True)
class LoadPlacement:
    """How one load places the weights of a model's CPU-resident layers."""

    requested: str  # the user's choice: "auto", "explicit" or "none"
    mode: str  # what the load does (convert.cpu_repack.effective_mode)
    repack: tuple[str, ...] = ()  # tensors handed to CPU_REPACK by name ("explicit")
    repack_buft: int = 0  # the CPU_REPACK buffer type of this build (ggml_backend_buffer_type_t)
    reason: str = ""  # why "auto" became "explicit"
    n_cpu_moe: int = 0  # --n-cpu-moe: the experts of the first n_cpu_moe layers stay in CPU buffers
    cpu_buft: int = 0  # the CPU backend's buffer type, which those overrides name (ggml.cpu_buffer_type)

    @property
    def use_extra_bufts(self) -> bool:
        return self.mode == "auto"

    def describe(self) -> str:
        if self.mode == "explicit":
            text = f"{len(self.repack)} weights handed to CPU_REPACK by name and extra buffer types off"
        else:
            text = {"auto": "llama.cpp's own buffer placement", "none": "extra buffer types off"}[self.mode]
        return text + (f"; the experts of the first {self.n_cpu_moe} layers in CPU buffers" if self.n_cpu_moe else "")


def load_placement(header: GGUFHeader, no_repack: bool = False, n_gpu_layers: int = 0,
                   n_cpu_moe: int = 0) -> LoadPlacement:
    """The placement for loading `header`'s model on this machine with this build; `n_cpu_moe`:
    llama.cpp's --n-cpu-moe, the same override list (convert.cpu_repack.expert_override_patterns)."""
    from alpaca_local.convert.ggml import cpu_buffer_type, cpu_extra_buffer_types

    requested = requested_mode(no_repack)
    bufts, gpu_build, cpu = build_facts()
    experts = {"n_cpu_moe": n_cpu_moe, "cpu_buft": cpu_buffer_type()} if n_cpu_moe > 0 else {}
    # On a GPU build every layer's weights, offloaded or not, go through the GPU's host buffer
    # type first (convert/cpu_repack.py): nothing to steer. Without one, n_gpu_layers is moot.
    mode = effective_mode(requested, bufts, gpu_build and n_gpu_layers != 0)
    if mode != "explicit":
        return LoadPlacement(requested, mode, **experts)
    buft = cpu_extra_buffer_types().get(REPACK_BUFFER, 0)
    names = tuple(explicit_repack(header.tensors, cpu.repack_rows)) if buft else ()
    return LoadPlacement(requested, mode, names, buft, "; ".join(crash_reasons(bufts)), **experts)


def override_patterns(names: Sequence[str]) -> list[str]:
    """A few anchored regexes that match exactly `names`. llama.cpp builds a std::regex from every
    pattern for every tensor it creates (llama-model-loader.cpp:1237-1239), so one pattern per
    tensor would cost a 7B model 65,000 regex compilations; grouping by the part after
    `blk.N.` leaves one pattern per distinct set of layers."""
    layers: dict[str, set[int]] = {}
    rest: list[str] = []
    for name in names:
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
        if m:
            layers.setdefault(m[2], set()).add(int(m[1]))
        else:
            rest.append(name)
    groups: dict[tuple[int, ...], list[str]] = {}
    for suffix, ids in layers.items():
        groups.setdefault(tuple(sorted(ids)), []).append(suffix)
    patterns = [
        rf"^blk\.({'|'.join(map(str, ids))})\.({'|'.join(re.escape(s) for s in sorted(sfx))})$"
        for ids, sfx in groups.items()
    ]
    return patterns + [f"^{re.escape(n)}$" for n in rest]


class _BuftOverride(ctypes.Structure):
    """struct llama_model_tensor_buft_override (include/llama.h): a regex and a buffer type."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def apply(params: object, placement: LoadPlacement) -> object:
    """Set `placement` on a llama_model_params. Returns the override array, which must stay
    alive until the load has finished (llama.cpp keeps the pointer during loading)."""
    params.use_extra_bufts = placement.use_extra_bufts  # type: ignore[attr-defined]
    # The repacked tensors first: the loader takes the first pattern that matches.
    pairs = [(p, placement.repack_buft) for p in (override_patterns(placement.repack) if placement.repack else [])]
    if placement.n_cpu_moe and placement.cpu_buft:
        pairs += [(p, placement.cpu_buft) for p in expert_override_patterns(placement.n_cpu_moe)]
    if not pairs:
        params.tensor_buft_overrides = None  # type: ignore[attr-defined]
        return None
    array = (_BuftOverride * (len(pairs) + 1))()  # NULL-terminated: the last entry stays zero
    for entry, (pattern, buft) in zip(array, pairs):
        entry.pattern, entry.buft = pattern.encode(), buft
    params.tensor_buft_overrides = ctypes.cast(array, ctypes.c_void_p)  # type: ignore[attr-defined]
    return array


_patch_lock = threading.Lock()


@contextlib.contextmanager
def llama_defaults(placement: LoadPlacement) -> Iterator[None]:
    """While a `llama_cpp.Llama` is constructed, hand it model params with `placement` set.

    Llama.__init__ takes no use_extra_bufts or tensor_buft_overrides: it fills the struct that
    llama_model_default_params returns and loads at once (llama_cpp/llama.py:227-392), so the
    defaults are swapped for the duration of that call, under a lock."""
    import llama_cpp.llama_cpp as low

    keep: list[object] = []
    original = low.llama_model_default_params

    def defaults():  # the fields Llama sets itself (n_gpu_layers, load_mode, ...) are left to it
        params = original()
        keep.append(apply(params, placement))
        return params

    with _patch_lock:
        low.llama_model_default_params = defaults
        try:
            yield
        finally:
            low.llama_model_default_params = original


# ---------------------------------------------------------------------------------------
# Pre-flight: the first load of its kind decodes a few tokens in a child process
# ---------------------------------------------------------------------------------------

class NativeCrash(RuntimeFailure):
    """llama.cpp died inside the native library (a signal, not an error it reports)."""


def cache_root() -> Path:
    """alpaca-local's cache: $ALPACA_LOCAL_CACHE, else $XDG_CACHE_HOME/alpaca-local, else ~/.cache/alpaca-local."""
    if os.environ.get("ALPACA_LOCAL_CACHE"):
        return Path(os.environ["ALPACA_LOCAL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "alpaca-local"


def preflight_key(header: GGUFHeader, placement: LoadPlacement, n_gpu_layers: int) -> str:
    """What decides which kernels a decode runs: the build, the placement, the architecture and
    each weight type with the buffer it lands in. Models that share these share one pre-flight."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    libs = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in lib_dir.glob("*.so*") if p.is_file())
    kinds = sorted({(t.ggml_type.name, "repack" if t.name in placement.repack else placement.mode)
                    for t in header.tensors})
    facts = [llama_cpp.__version__, str(lib_dir), libs, llama_cpp.llama_print_system_info().decode("utf-8", "replace"),
             placement.mode, header.arch, kinds, n_gpu_layers, placement.n_cpu_moe]
    return hashlib.sha256(json.dumps(facts, default=str).encode()).hexdigest()[:32]


def preflight(path: Path, header: GGUFHeader, placement: LoadPlacement, n_gpu_layers: int = 0) -> None:
    """Decode a few tokens of `path` in a child process with the same placement, once per
    `preflight_key`; raise NativeCrash with one line if the child dies of a signal.

    Why a child: a SIGSEGV inside ggml cannot be caught in-process, and the shell would print a
    bare "Segmentation fault". A child that fails without a signal (a bad file, no memory for the
    context) is not recorded: the real load reports that itself."""
    if os.environ.get(PREFLIGHT_ENV, "1").strip() == "0":
        return
    mark = cache_root() / "preflight" / preflight_key(header, placement, n_gpu_layers)
    if mark.exists():
        return
    env = dict(os.environ, **{BUFFERS_ENV: placement.mode, PREFLIGHT_ENV: "0"})
    cmd = [sys.executable, "-m", "alpaca_local.run.cpu_buffers", str(path), str(n_gpu_layers), str(placement.n_cpu_moe)]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=env, check=False)
    if proc.returncode < 0:
        log = mark.with_suffix(".crash.txt")
        with contextlib.suppress(OSError):
            mark.parent.mkdir(parents=True, exist_ok=True)
            log.write_bytes(proc.stderr)
        raise NativeCrash(crash_message(path, -proc.returncode, placement, log if log.exists() else None))
    if proc.returncode == 0:
        with contextlib.suppress(OSError):  # a read-only cache only costs a pre-flight next time
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.write_text(f"{path.name}\n")


def crash_message(path: Path, signum: int, placement: LoadPlacement, log: Path | None = None) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    fix = (f"try --no-repack (or {BUFFERS_ENV}=none)" if placement.mode != "none"
           else "try a file of another quant level")
    where = f"; its trace is in {log}" if log else ""
    return (f"llama.cpp crashed ({name}) in a test decode of {path.name} with {placement.describe()}, "
            f"before anything ran; {fix}{where}")


PREFLIGHT_CTX = 256
PREFLIGHT_PROMPT = 64  # tokens of the Alpaca prompt at most: >= 32, so a GPU build takes its batched paths


def _child(path: Path, n_gpu_layers: int, n_cpu_moe: int = 0) -> NoReturn:
    """The pre-flight itself: load as the parent will, decode the start of the prompt chat sends
    (one batch of up to PREFLIGHT_PROMPT tokens), then one token, the two paths a reply takes.
    Then leave at once (os._exit): the verdict is about the decode, and a crash in the native
    library's teardown at interpreter exit must not read as one."""
    import faulthandler

    from llama_cpp import Llama

    from alpaca_local.convert.gguf_read import read_gguf_header
    from alpaca_local.template import Turn, render_prompt

    faulthandler.enable()  # where it crashes goes to the trace file the parent keeps
    placement = load_placement(read_gguf_header(path), n_gpu_layers=n_gpu_layers,  # the mode comes in BUFFERS_ENV
                               n_cpu_moe=n_cpu_moe)
    with llama_defaults(placement):
        llm = Llama(model_path=str(path), n_ctx=PREFLIGHT_CTX, n_gpu_layers=n_gpu_layers, verbose=False)
    text = render_prompt([Turn("Give three tips for staying healthy.")]).encode("utf-8")
    ids = list(llm.tokenize(text, add_bos=True, special=False))[:PREFLIGHT_PROMPT] or [0]
    llm.eval(ids)  # the batched path (several rows at once) ...
    llm.eval([ids[-1]])  # ... and the one-token path generation takes
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":  # `python -m alpaca_local.run.cpu_buffers MODEL [N_GPU_LAYERS [N_CPU_MOE]]`: the child
    _child(Path(sys.argv[1]), *(int(a) for a in sys.argv[2:4]))

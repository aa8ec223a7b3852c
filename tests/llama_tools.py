"""Build llama.cpp's own tools (llama-imatrix, llama-server, llama-quantize, llama-perplexity,
llama-gguf-split)
from the sources vendored in the pinned llama-cpp-python sdist: the runtime reference.

One shared CMake build of a copy of those sources, both cached outside the clone and keyed by
the pinned version (`$ALPACA_LOCAL_TOOLS_CACHE`, default
`~/.cache/alpaca-local/llama.cpp-<version>-noamx`: src/ and build/), so any clone and a
fresh CI machine builds it once (a few minutes on 2 cores) and later runs reuse it. A file
lock makes parallel test processes wait for one build instead of starting their own.

    from tests.llama_tools import llama_tool
    exe = llama_tool("llama-imatrix")   # builds on first use; fails loudly without the vendor tree
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

from reference import LLAMA_CPP_VERSION, vendor_dir

TOOLS = ("llama-imatrix", "llama-server", "llama-quantize", "llama-perplexity", "llama-gguf-split")


# Built without AMX (issue 21): with GGML_NATIVE, an AMX CPU would compile ggml's AMX buffer type,
# which takes Q4_0/Q4_K/Q5_K/Q6_K/Q8_0 weights and crashes at the first decode (llama.cpp
# #20824). alpaca-local's own loads avoid it by handing the weights to CPU_REPACK themselves
# (run/cpu_buffers.py), so tools built with AMX compiled out place every tensor as those loads
# do. GCC and Clang let an explicit -mno-* win over -march=native whatever the order; on a CPU
# without AMX the flags change nothing.
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "alpaca-local" / f"llama.cpp-{LLAMA_CPP_VERSION}-noamx"
    return Path(os.environ.get("ALPACA_LOCAL_TOOLS_CACHE", default))


def _configure_args(src: Path, build: Path) -> list[str]:
    return [
        "cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_APP=OFF",
        # No network at build time: no web UI download, no HTTPS client.
        "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF",
        "-DGGML_NATIVE=ON", "-DGGML_CCACHE=OFF",
        f"-DCMAKE_C_FLAGS={NO_AMX_FLAGS}", f"-DCMAKE_CXX_FLAGS={NO_AMX_FLAGS}",
    ]


def _cached_source(src: Path, root: Path) -> Path:
    """The vendored sources, copied into the cache once. CMake ties a build folder to the source
    path it was configured from, and every clone (CI's included) has its own; building from a
    copy beside the build lets one cached build serve them all, and a tool added to TOOLS later
    builds incrementally instead of failing with "does not match the source ... used to
    generate cache"."""
    cached = root / "src"
    if not (cached / "CMakeLists.txt").exists():
        partial = root / "src.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(src, partial, symlinks=True)
        partial.rename(cached)
    return cached


def _configured_from(build: Path) -> Path | None:
    """The source folder an existing CMake build folder was configured from, or None."""
    cache = build / "CMakeCache.txt"
    if not cache.exists():
        return None
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith("CMAKE_HOME_DIRECTORY:INTERNAL="):
            return Path(line.split("=", 1)[1])
    return None


def build_tools(vendor: Path | None = None) -> Path:
    """Build every tool in TOOLS once; return the folder that holds the executables."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    build, done = root / "build", root / "built.ok"
    bin_dir = build / "bin"
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others wait, then reuse it
        if done.exists() and all((bin_dir / t).exists() for t in TOOLS):
            return bin_dir
        src = _cached_source(Path(vendor) if vendor else vendor_dir(), root)
        configured = _configured_from(build)
        if configured is not None and configured.resolve() != src.resolve():
            shutil.rmtree(build)  # configured from a clone's own tree (before the cached copy)
        log = root / "build.log"
        with open(log, "w") as out:
            jobs = str(os.cpu_count() or 2)
            for cmd in (_configure_args(src, build),
                        ["cmake", "--build", str(build), "--config", "Release", "-j", jobs, "--target", *TOOLS]):
                if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode:
                    raise RuntimeError(f"building llama.cpp's tools failed: {' '.join(cmd[:3])}...; see {log}")
        done.write_text(LLAMA_CPP_VERSION)
    return bin_dir


def llama_tool(name: str) -> Path:
    """Path to one of llama.cpp's tools, building them on first use."""
    if name not in TOOLS:
        raise ValueError(f"{name} is not one of {TOOLS}")
    return build_tools() / name


if __name__ == "__main__":  # `python tests/llama_tools.py`: warm the cache by hand
    print(build_tools())

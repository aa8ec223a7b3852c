"""Which accelerator this machine has and how much memory it offers the planner.

In: nothing (the machine). Out: `Device` (backend "cuda", "metal" or "cpu",
total and free bytes, one entry per GPU). Order of tries: NVML through ctypes
(no extra package), then `nvidia-smi` with a timeout, then Apple Silicon
unified memory (`sysctl hw.memsize` on Darwin arm64), then CPU RAM from
/proc/meminfo. Every probe fails quietly to the next one.
"""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
from dataclasses import dataclass

NVIDIA_SMI_TIMEOUT_S = 5.0
# macOS lets the GPU wire about 2/3 of RAM on machines up to 36 GB and 3/4 above
# (Metal's recommendedMaxWorkingSetSize; llama.cpp reports it at startup).
APPLE_GPU_FRACTION_SMALL = 2 / 3
APPLE_GPU_FRACTION_LARGE = 3 / 4
APPLE_LARGE_BYTES = 36 << 30


@dataclass(frozen=True)
class GPU:
    name: str
    total: int
    free: int


@dataclass(frozen=True)
class Device:
    backend: str  # "cuda", "metal" or "cpu"
    gpus: tuple[GPU, ...]
    note: str

    @property
    def budget(self) -> int:
        """Bytes the planner may use: the free memory of the largest GPU (or RAM)."""
        return max(g.free for g in self.gpus) if self.gpus else 0


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def _nvml() -> tuple[GPU, ...]:
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return ()
    if lib.nvmlInit_v2() != 0:
        return ()
    try:
        count = ctypes.c_uint()
        if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return ()
        gpus = []
        for i in range(count.value):
            handle, mem, name = ctypes.c_void_p(), _NvmlMemory(), ctypes.create_string_buffer(96)
            if lib.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle)) != 0:
                continue
            if lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) != 0:
                continue
            lib.nvmlDeviceGetName(handle, name, 96)
            gpus.append(GPU(name.value.decode(errors="replace") or f"GPU {i}", mem.total, mem.free))
        return tuple(gpus)
    finally:
        lib.nvmlShutdown()


def parse_nvidia_smi(text: str) -> tuple[GPU, ...]:
    """Lines of `nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv,noheader,nounits` (MiB)."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.rsplit(",", 2)]
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            gpus.append(GPU(parts[0], int(parts[1]) << 20, int(parts[2]) << 20))
    return tuple(gpus)


def _nvidia_smi() -> tuple[GPU, ...]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return ()
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return ()
    return parse_nvidia_smi(out.stdout)


def _apple() -> GPU | None:
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return None
    try:
        out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, timeout=2, check=True)
        mem = int(out.stdout.strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    frac = APPLE_GPU_FRACTION_LARGE if mem > APPLE_LARGE_BYTES else APPLE_GPU_FRACTION_SMALL
    return GPU("Apple Silicon (unified memory)", int(mem * frac), int(mem * frac))


def parse_meminfo(text: str) -> GPU | None:
    fields = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[key] = int(parts[0]) * 1024  # /proc/meminfo is in kB (KiB)
    if "MemTotal" not in fields:
        return None
    return GPU("CPU RAM", fields["MemTotal"], fields.get("MemAvailable", fields["MemTotal"]))


def available_ram() -> int | None:
    """Host memory available now (/proc/meminfo's MemAvailable), None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            ram = parse_meminfo(f.read())
    except OSError:
        return None
    return ram.free if ram else None


def detect() -> Device:
    gpus = _nvml() or _nvidia_smi()
    if gpus:
        return Device("cuda", gpus, f"{len(gpus)} NVIDIA GPU(s); planning for the one with the most free memory")
    apple = _apple()
    if apple:
        return Device("metal", (apple,), "Apple Silicon: the GPU may use about 2/3-3/4 of unified memory")
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            ram = parse_meminfo(f.read())
    except OSError:
        ram = None
    return Device("cpu", (ram,) if ram else (), "no GPU found; planning for CPU RAM (give --vram to plan for a GPU)")

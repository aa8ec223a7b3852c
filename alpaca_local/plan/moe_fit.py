"""The expert split of a mixture-of-experts model on a GPU: per quant level the smallest
`--n-cpu-moe` that fits the GPU and the RAM, and which level to recommend when quality and
speed pull apart.

In:  a MoE `ModelShape`, the run settings, the GPU's and the host's memory.
Out: one `ExpertSplit` per level and a `memory.Recommendation` carrying n_cpu_moe.

Why this and not whole layers: a token reads only n_expert_used of n_expert experts, so
keeping experts in RAM costs far less speed than keeping whole layers there (llama.cpp's
`--n-cpu-moe`; its `--fit` fills the GPU the same way but never changes the quant). The
speed estimate is the bytes a token reads: from VRAM, assumed BANDWIDTH_RATIO times faster
than RAM, and from RAM (every non-expert weight, plus n_expert_used / n_expert of the experts).
"""

from __future__ import annotations

from dataclasses import dataclass

from alpaca_local.convert import quant_levels
from alpaca_local.plan import memory
from alpaca_local.plan.memory import LevelPlan, Recommendation, RunSettings, fmt_gib
from alpaca_local.plan.moe import kept_on_cpu
from alpaca_local.plan.shape import ModelShape

# VRAM bandwidth over RAM bandwidth assumed by the speed estimate: a consumer GPU's 300-1000
# GB/s against dual-channel DDR4/DDR5's 50-100 GB/s.
BANDWIDTH_RATIO = 10.0
# Prefer the higher-quality level while its estimated speed stays within this fraction of the
# fastest level that fits: a few layers of experts in RAM cost little, a lower quant is for good.
SPEED_KEPT = 0.8
# The speed bar is the fastest fitting level at this rank of the quality ladder or above (the
# 4-bit levels and up): below it each step loses quality faster than it gains speed (see the
# KL divergence ladder in the README), so a 3- or 2-bit level is picked only when nothing above fits.
SPEED_BAR_FLOOR = "q4_0"


@dataclass(frozen=True)
class ExpertSplit:
    level: str
    n_cpu_moe: int | None  # the smallest that fits the GPU and the RAM; None: none does
    n_gpu_layers: int  # n_layer + 1, or fewer when even every expert in RAM leaves the GPU short
    plan: LevelPlan  # at that split
    ram: int  # host memory it needs: CPU model buffers, logits, runtime
    read_time: float  # bytes a token reads, VRAM bytes counted 1 / BANDWIDTH_RATIO (lower is faster)

    @property
    def fits(self) -> bool:
        return self.n_cpu_moe is not None


def host_bytes(p: LevelPlan) -> int:
    """Host memory a split needs: the CPU model buffers, the logits and the runtime itself."""
    return p.weights_cpu + p.output + memory.OVERHEAD["cpu"]


def fits_host(need: int, ram: int) -> bool:
    return need <= memory.usable(ram)  # the same safety margin as the GPU's


def read_time(shape: ModelShape, level: str, ngl: int, n_cpu_moe: int) -> float:
    """Bytes one decoded token reads, VRAM bytes weighted 1 / BANDWIDTH_RATIO."""
    used = shape.n_expert_used / shape.n_expert
    total = 0.0
    for t in memory.tensors_for(shape, level):
        if t.name in memory.GET_ROWS_TENSORS:
            continue  # one row per token
        share = used if "_exps." in t.name else 1.0
        on_gpu = memory._on_gpu(t.name, shape.n_layer, ngl) and not kept_on_cpu(t.name, n_cpu_moe)
        total += t.nbytes * share / (BANDWIDTH_RATIO if on_gpu else 1.0)
    return total


def split_for(shape: ModelShape, level: str, s: RunSettings, vram: int, ram: int) -> ExpertSplit:
    """The smallest --n-cpu-moe that fits `vram` (GPU bytes fall as it grows) and `ram` (host bytes
    rise); when all the experts in RAM still leave the GPU short, fewer GPU layers as well."""
    full = shape.n_layer + 1
    for n in range(shape.n_layer + 1):
        p = memory.plan_level(shape, level, s, full, n)
        if memory.fits(p, vram):
            ok = fits_host(host_bytes(p), ram)
            return ExpertSplit(level, n if ok else None, full, p, host_bytes(p), read_time(shape, level, full, n))
    n = shape.n_layer
    lo, hi = 0, full  # the largest -ngl that fits with every expert in RAM (GPU bytes grow with it)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if memory.fits(memory.plan_level(shape, level, s, mid, n), vram) else (lo, mid - 1)
    p = memory.plan_level(shape, level, s, lo, n)
    host = host_bytes(p) + memory.kv_bytes(shape, s.n_ctx, s.cache_type, None, s.n_ubatch, s.swa_full) - p.kv
    ok = lo > 0 and fits_host(host, ram)
    return ExpertSplit(level, n if ok else None, lo, p, host, read_time(shape, level, lo, n))


def recommend(shape: ModelShape, splits: list[ExpertSplit], vram: int) -> Recommendation:
    """The highest-quality level (splits are best first) whose estimated speed stays within
    SPEED_KEPT of the fastest level that fits, with the reason."""
    # As the dense recommendation: never a level only for models trained for it; a level that
    # needs an importance matrix only when no level without one fits, and one below
    # SPEED_BAR_FLOOR only when none above it fits (else the fastest such level, iq2_m or
    # q3_k_m on a big MoE, would set the speed bar and win on speed alone).
    fitting = [x for x in splits if x.fits
               and (not quant_levels.LEVELS[x.level].trained_for or x.level == shape.file_quant)]
    plain = [x for x in fitting if not memory.needs_imatrix(shape, x.level)]
    fitting = plain or fitting
    floor = quant_levels.LADDER.index(SPEED_BAR_FLOOR)
    fitting = [x for x in fitting if quant_levels.LADDER.index(x.level) <= floor] or fitting
    if not fitting:
        return Recommendation(None, 0, False, 0, 0, "no level fits, even with every expert in RAM; "
                              "free RAM or run on the CPU (-ngl 0)")
    fastest = min(fitting, key=lambda x: x.read_time)
    pick = next(x for x in fitting if fastest.read_time / x.read_time >= SPEED_KEPT)
    p, n = pick.plan, pick.n_cpu_moe or 0
    if pick.n_gpu_layers <= shape.n_layer:
        why = (f"every level is short of GPU memory even with all experts in RAM; {pick.level} keeps "
               f"{pick.n_gpu_layers} of {shape.n_layer + 1} layers on the GPU")
    elif n == 0:
        why = (f"highest quality that fits on the GPU with its experts, leaving {fmt_gib(vram - p.total_gpu)} free "
               f"(safety margin {fmt_gib(vram - memory.usable(vram))})")
    else:
        why = f"the experts of the first {n} of {shape.n_layer} layers stay in RAM ({fmt_gib(pick.ram)} of RAM)"
    if pick is not fastest:
        speed = fastest.read_time / pick.read_time
        why += (f"; about {speed:.0%} of the speed of {fastest.level} (--n-cpu-moe {fastest.n_cpu_moe}), "
                f"close enough to prefer the higher quality")
    higher = [x for x in splits[: splits.index(pick)] if x.fits]
    if higher:
        slower = higher[-1]
        why += (f"; {slower.level} would need --n-cpu-moe {slower.n_cpu_moe} and run at about "
                f"{pick.read_time / slower.read_time:.0%} of this speed")
    elif any(not x.fits for x in splits[: splits.index(pick)]):
        why += "; the higher levels do not fit in GPU and RAM together"
    full = pick.n_gpu_layers > shape.n_layer and n == 0
    return Recommendation(pick.level, pick.n_gpu_layers, full, p.total_gpu, pick.ram, why, n_cpu_moe=n)

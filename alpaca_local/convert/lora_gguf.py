"""A PEFT LoRA adapter -> a llama.cpp LoRA adapter GGUF, applied at run time.

In: an `Adapter` (source/adapter.py) and its base model folder (for the
architecture, the tensor names and the Q/K permutation). Out: the file
llama.cpp's vendored `convert_lora_to_gguf.py` writes: general.type
"adapter", adapter.type "lora", adapter.lora.alpha, and for each adapted
weight `<gguf name>.lora_a` (A, r x in) and `<gguf name>.lora_b` (B, out x r;
rows permuted like the weight for Q and K). Token-embedding LoRA is written
with lora_a = Aᵀ as that script does (llm_build_inp_embd gathers its rows).

Where that script is wrong we are right: llama.cpp applies scale = alpha / r
(llama-adapter.cpp), and the script writes lora_alpha, so an rsLoRA adapter
(alpha / sqrt(r)) comes out sqrt(r) too weak and rank_pattern / alpha_pattern
modules get the default scale. We write alpha so the default module's scale
is PEFT's, and fold any module whose scale differs into its B.

What llama.cpp cannot apply at run time (DoRA, modules_to_save, a resized
vocabulary, trainable token rows) is refused with a pointer to the merge route.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from alpaca_local.convert.architectures import ARCHITECTURES, CONFIG_DEFAULTS, SUPPORTED, map_name
from alpaca_local.convert.atomic import atomic_write, check_target
from alpaca_local.convert.ggml import quantize_rows
from alpaca_local.convert.pipeline import llama_cpp_order, rope_permute
from alpaca_local.errors import UnsupportedError, UsageError
from alpaca_local.source.adapter import Adapter, LoraPair, check_against_base, peft_scale
from alpaca_local.source.config import load_config
from alpaca_local.source.weights import read_weights

Q = gguf.GGMLQuantizationType
OUTTYPES: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


@dataclass(frozen=True)
class LoraTensor:
    name: str  # e.g. "blk.0.attn_q.weight.lora_a"
    values: np.ndarray  # float32, numpy order
    ggml_type: Q


@dataclass(frozen=True)
class AdapterGGUF:
    arch_name: str
    alpha: float
    tensors: tuple[LoraTensor, ...]
    outtype: str


@dataclass(frozen=True)
class AdapterResult:
    output: Path
    outtype: str
    n_tensors: int
    file_bytes: int
    alpha: float
    seconds: float


def _refuse_merge_only(adapter: Adapter, base: dict) -> None:
    hint = f"merge it instead: alpaca-local convert BASE --lora {adapter.folder}"
    if adapter.use_dora:
        raise UnsupportedError(f"adapter {adapter.name} uses DoRA, which llama.cpp cannot apply at run time; {hint}")
    if adapter.token_rows:
        raise UnsupportedError(f"adapter {adapter.name} retrains token rows (trainable_token_indices), which a "
                               f"llama.cpp adapter cannot hold; {hint}")
    for target, ref in adapter.replacements.items():
        if target in adapter.base_layer_copies and ref.shape == base[target].shape:
            continue  # the frozen base layer, saved beside an embedding LoRA: the script skips it too
        what = "a resized vocabulary" if ref.shape != base[target].shape else f"a trained copy of {target!r} (modules_to_save)"
        raise UnsupportedError(f"adapter {adapter.name} carries {what}, which a llama.cpp adapter cannot hold; {hint}")


def alpha_for_llama_cpp(adapter: Adapter) -> float:
    """adapter.lora.alpha such that llama.cpp's alpha / r is PEFT's scale at the config's r."""
    return peft_scale(adapter.lora_alpha, adapter.rank, adapter.use_rslora) * adapter.rank


def _b_factor(pair: LoraPair, alpha: float, user_scale: float) -> float:
    """What B must be multiplied by so that llama.cpp's alpha / rank gives this module PEFT's scale."""
    applied = alpha / pair.rank if alpha else 1.0  # llama-adapter.cpp: alpha == 0 means scale 1
    return pair.scale / user_scale / applied


def _type_for(values: np.ndarray, outtype: str) -> Q:
    qtype = OUTTYPES[outtype][0]
    # gguf-py refuses Q8_0 rows that are not whole blocks; the script then falls back to F16.
    if qtype == Q.Q8_0 and values.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return qtype


def plan_adapter_gguf(
    adapter: Adapter, base_folder: Path, outtype: str = "f16", base_weights: dict | None = None
) -> AdapterGGUF:
    """Check the adapter against its base and compute every output tensor (adapters are small).

    `base_weights`: the base's tensors when they are not in `base_folder` (a Hub base,
    streamed: only its headers are read here)."""
    if outtype not in OUTTYPES:
        raise UsageError(f"--outtype {outtype!r} is not supported for adapters; choose {', '.join(OUTTYPES)}")
    cfg = load_config(base_folder, SUPPORTED, CONFIG_DEFAULTS)
    arch = ARCHITECTURES[cfg.hf_arch]
    base = read_weights(base_folder) if base_weights is None else base_weights
    check_against_base(adapter, base, cfg.hf_arch)
    _refuse_merge_only(adapter, base)
    alpha = alpha_for_llama_cpp(adapter)
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, cfg.n_layer)
    out: list[LoraTensor] = []
    for target, pair in adapter.pairs.items():
        mapped = map_name(arch, name_map, target)
        if mapped is None:
            raise UnsupportedError(f"adapter {adapter.name} adapts {pair.module!r}, which llama.cpp does not load for {arch.hf_class}")
        a, b = pair.a.to_f32(), pair.b.to_f32()
        factor = _b_factor(pair, alpha, adapter.user_scale)
        if factor != 1.0:
            b = b * np.float32(factor)
        if mapped.kind in arch.rope_permuted:
            b = rope_permute(b, cfg.head_dim)  # LlamaModel.permute acts on B's rows (LoraTorchTensor.permute)
        if pair.embedding:
            a = np.ascontiguousarray(a.T)  # convert_lora_to_gguf.py: token_embd.lora_a = A.T
        for suffix, values in ((".lora_a", a), (".lora_b", b)):
            out.append(LoraTensor(mapped.gguf_name + suffix, values, _type_for(values, outtype)))
    out.sort(key=lambda t: llama_cpp_order(t.name))
    return AdapterGGUF(arch.arch_name, alpha, tuple(out), outtype)


def default_adapter_output(adapter: Adapter, outtype: str, models_dir: Path) -> Path:
    """models/<adapter folder>.lora.<OUTTYPE>.gguf"""
    return models_dir / f"{adapter.name}.lora.{outtype.upper()}.gguf"


def write_adapter_gguf(
    adapter: Adapter, base_folder: Path, output: Path | None = None, outtype: str = "f16",
    force: bool = False, models_dir: Path = Path("models"), base_weights: dict | None = None,
    base_name: str | None = None,
) -> AdapterResult:
    """Write the adapter GGUF; the file appears only when complete."""
    t0 = time.perf_counter()
    plan = plan_adapter_gguf(adapter, base_folder, outtype, base_weights)
    if output is None:
        output = default_adapter_output(adapter, outtype, models_dir)
        output.parent.mkdir(parents=True, exist_ok=True)
    check_target(output, force, need_bytes=sum(t.values.nbytes for t in plan.tensors))
    with atomic_write(output) as tmp:
        w = gguf.GGUFWriter(tmp, plan.arch_name)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, plan.alpha)
        w.add_name(adapter.name)
        w.add_base_model_count(1)
        w.add_base_model_name(0, base_name or Path(base_folder).resolve().name)
        w.add_file_type(OUTTYPES[outtype][1])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)  # as the script writes it, whatever the type
        for t in plan.tensors:
            if t.ggml_type == Q.F32:
                w.add_tensor(t.name, t.values.astype(np.float32))
            elif t.ggml_type == Q.F16:
                w.add_tensor(t.name, t.values.astype(np.float16))
            else:
                data = quantize_rows(np.ascontiguousarray(t.values, dtype=np.float32), t.ggml_type)
                w.add_tensor(t.name, data.reshape(t.values.shape[0], -1), raw_dtype=t.ggml_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        size = tmp.stat().st_size
    return AdapterResult(output, outtype, len(plan.tensors), size, plan.alpha, time.perf_counter() - t0)


# --------------------------------------------------------------------------
# Reading an adapter GGUF back (chat/serve --lora, plan --lora): checked before llama.cpp sees it
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterHeader:
    path: Path
    arch: str
    alpha: float
    tensors: tuple  # gguf_read.TensorInfo of every .lora_a / .lora_b


def read_adapter_header(path: Path) -> AdapterHeader:
    """The header of a llama.cpp LoRA adapter GGUF, refusing a model file or another adapter kind."""
    from alpaca_local.convert.gguf_read import printable, read_gguf_header
    from alpaca_local.errors import InputError

    header = read_gguf_header(path)
    kind = header.kv.get("general.type")
    if kind != "adapter":
        raise InputError(f"{path} is not a LoRA adapter (general.type {printable(kind)}); give the adapter GGUF "
                         "that `alpaca-local convert ADAPTER --base BASE` writes")
    if header.kv.get(gguf.Keys.Adapter.TYPE) != "lora":
        raise InputError(f"{path}: adapter.type {printable(header.kv.get(gguf.Keys.Adapter.TYPE))} is not 'lora'")
    alpha = header.kv.get(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha):
        raise InputError(f"{path}: adapter.lora.alpha = {printable(alpha)} is not a number")
    odd = [t.name for t in header.tensors if not t.name.endswith((".lora_a", ".lora_b"))]
    if odd:
        raise InputError(f"{path}: tensor {printable(odd[0])} is not a .lora_a/.lora_b tensor; not a LoRA adapter")
    return AdapterHeader(Path(path), header.arch, float(alpha), header.tensors)


def check_adapter_fits(adapter: AdapterHeader, model_arch: str, model_tensors: dict[str, tuple[int, ...]],
                       model_path: Path) -> None:
    """Every pair targets a tensor of the model with shapes that fit (llama_adapter_lora_init's checks,
    src/llama-adapter.cpp, said in one line instead of a failed load)."""
    from alpaca_local.errors import InputError

    if adapter.arch != model_arch:
        raise InputError(f"{adapter.path} is a LoRA for {adapter.arch} but {model_path.name} is {model_arch}; "
                         "give the adapter made for this base")
    by_name = {t.name: t.shape for t in adapter.tensors}
    for name, shape in by_name.items():
        base, part = name.rsplit(".", 1)
        other = by_name.get(f"{base}.{'lora_b' if part == 'lora_a' else 'lora_a'}")
        w = model_tensors.get(base)
        if other is None or w is None or len(shape) != 2 or len(w) != 2:
            what = "has no partner" if other is None else f"targets {base!r}, which {model_path.name} lacks"
            raise InputError(f"{adapter.path}: {name} {what}; is this adapter for this base model?")
        a, b = (shape, other) if part == "lora_a" else (other, shape)
        embd = base == "token_embd.weight"  # lora_a is Aᵀ there (n_vocab x r)
        ok = (a[0] == w[0] and b[0] == w[1] and a[1] == b[1]) if embd else (a[1] == w[1] and b[0] == w[0] and a[0] == b[1])
        if not ok:
            raise InputError(f"{adapter.path}: {base} lora_a {list(a)} / lora_b {list(b)} do not fit the model's "
                             f"{list(w)}; is this adapter for this base model?")

"""The files `quality` measures: the f16 baseline, one file per quant level, size targets.

In:  a Hugging Face model folder or an f16 GGUF, level names, size targets, other GGUF files.
Out: paths of GGUF files in the work folder (kept, and reused while newer than their inputs),
     and the facts about a file that a row of the report shows.

Levels are made with our own converter from an HF folder; from an f16 GGUF with llama.cpp's
quantizer (`quantize_gguf`). A size target is the mix `convert --target-size` writes
(`convert.search`, which reads the HF weights: an f16 GGUF source refuses it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alpaca_local.convert.quant_rules import QUANT_FILE_SUFFIX, QUANTS
from alpaca_local.errors import InputError, RuntimeFailure, UsageError

BASELINE = "f16"
IMATRIX_TAG = "+imatrix"  # level label of a file quantized with an importance matrix
TARGET_PREFIX = "target-"  # row name of a per-tensor mix: "target-253M" (table: "target 253M")

Status = Callable[[str], None]  # one line saying what is being done now


def parse_quants(spec: str) -> list[str]:
    """"q4_0,Q8_0" -> ["q4_0", "q8_0"] (any level, any case, aliases; "all": the whole ladder);
    f16 is always the baseline, so it is dropped here."""
    from alpaca_local.convert.quant_levels import parse_list

    chosen = [q for q in parse_list(spec) if q != BASELINE]
    if not chosen:
        raise UsageError(f"--quants {spec!r} names no level to compare with f16; e.g. --quants q4_k_m,q8_0")
    return chosen


def default_work_dir(source: Path, models_dir: Path = Path("models")) -> Path:
    """models/quality/<model name>: converted files are kept there and reused."""
    name = source.resolve().name if source.is_dir() else source.name.removesuffix(".gguf").removesuffix(".F16")
    return models_dir / "quality" / name


def _newest_mtime(folder: Path) -> float:
    return max((f.stat().st_mtime for f in folder.iterdir() if f.is_file()), default=0.0)


def _level_path(work: Path, name: str, quant: str, imatrix: Path | None = None) -> Path:
    tag = f".imatrix-{imatrix.stem}" if imatrix is not None else ""
    return work / f"{name}.{QUANT_FILE_SUFFIX[quant]}{tag}.gguf"


def check_f16_gguf(path: Path) -> None:
    """Refuse a GGUF that is not f16: quantizing a quant again would measure the wrong thing."""
    from gguf.constants import GGMLQuantizationType as T
    from gguf.constants import LlamaFileType

    from alpaca_local.convert.split import read_gguf_model

    header = read_gguf_model(path)
    ftype = header.kv.get("general.file_type")
    types = {t.ggml_type for t in header.tensors}
    if ftype != int(LlamaFileType.MOSTLY_F16) or not types <= {T.F16, T.F32}:
        try:
            kind = LlamaFileType(ftype).name
        except ValueError:
            kind = repr(ftype)
        raise InputError(
            f"{path} is not an f16 GGUF (file type {kind}); give the Hugging Face folder, "
            "or an f16 file from `alpaca-local convert SRC --quant f16`"
        )


def prepare_baseline(source: Path, work: Path, status: Status) -> Path:
    """The f16 file: the given GGUF itself, or converted from the HF folder (reused when fresh)."""
    if source.is_file():
        check_f16_gguf(source)
        return source
    return _from_hf(source, work, BASELINE, status)


def prepare_level(source: Path, baseline: Path, work: Path, quant: str, threads: int | None, status: Status,
                  imatrix: Path | None = None) -> Path:
    """The file for one level (with `imatrix`: quantized with that importance matrix), reused when fresh."""
    if source.is_dir():
        return _from_hf(source, work, quant, status, imatrix)
    out = _level_path(work, baseline.name.removesuffix(".gguf").removesuffix(".F16"), quant, imatrix)
    if out.exists() and out.stat().st_mtime >= max(_mtime(baseline), _mtime(imatrix)):
        return out
    status(f"quantizing {baseline.name} to {quant}{' with the imatrix' if imatrix else ''} (llama.cpp quantize)")
    quantize_gguf(baseline, out, quant, threads, imatrix)
    return out


def _mtime(path: Path | None) -> float:
    return path.stat().st_mtime if path is not None else 0.0


def _fresh(out: Path, source: Path, imatrix: Path | None) -> bool:
    """A kept file is reused only when newer than every source file and the imatrix, so an edited
    checkpoint is converted again."""
    return out.exists() and out.stat().st_mtime >= max(_newest_mtime(source), _mtime(imatrix))


def _from_hf(source: Path, work: Path, quant: str, status: Status, imatrix: Path | None = None) -> Path:
    from alpaca_local.convert.pipeline import convert

    out = _level_path(work, source.resolve().name, quant, imatrix)
    if _fresh(out, source, imatrix):
        return out
    status(f"converting {source.name} to {quant}{' with the imatrix' if imatrix else ''}")
    work.mkdir(parents=True, exist_ok=True)
    convert(source, out, quant, force=True, imatrix=imatrix)
    return out


def quantize_gguf(src: Path, out: Path, quant: str, threads: int | None = None, imatrix: Path | None = None) -> None:
    """llama.cpp's quantize with default parameters (what `llama-quantize SRC OUT TYPE` does);
    with `imatrix`, given the per-tensor importance as `llama-quantize --imatrix` gives it."""
    import ctypes

    import llama_cpp

    from alpaca_local.convert.atomic import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(QUANTS[quant])
    params.nthread = threads or 0  # 0: every core
    if imatrix is not None:
        from alpaca_local.convert.imatrix_file import check_against_model, read_imatrix
        from alpaca_local.convert.split import read_gguf_model

        imat = read_imatrix(imatrix)
        # llama.cpp skips unknown names silently: refuse an imatrix made for another model first.
        check_against_model(imat, imatrix, {t.name: t.shape[-1] for t in read_gguf_model(src).tensors if len(t.shape) == 2})
        data = {name: np.ascontiguousarray(v, dtype=np.float32) for name, v in imat.importance().items()}
        entries = (llama_cpp.llama_model_imatrix_data * (len(data) + 1))()  # zeroed: the last one ends the list
        for entry, (name, values) in zip(entries, data.items()):
            entry.name, entry.size = name.encode(), values.size
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    with atomic_write(out) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise RuntimeFailure(f"llama.cpp could not quantize {src} to {quant} (code {rc}); nothing was written")


@dataclass(frozen=True)
class SizeTarget:
    """One `quality --target-size` item: a size in bytes, or a level (`level`: at the exact size
    of our own file of that level, so that the mix and the level compare at equal bytes)."""

    spec: str  # as the user wrote it: "253M", "q4_k_m"
    nbytes: int | None = None
    level: str | None = None


def target_budgets(source: Path, targets: Sequence[SizeTarget], imatrix: Path | None) -> list[int]:
    """Each target's budget in bytes, checked against the sizes this model's mixes can take
    (before anything is converted); a level's is its file's size as `convert` writes it."""
    from alpaca_local.convert import quant_levels, search
    from alpaca_local.convert.pipeline import header_nbytes, plan_conversion

    if not source.is_dir():
        raise UsageError("--target-size needs the Hugging Face folder (the search reads its weights); from an "
                         "f16 GGUF, make the file with `alpaca-local convert MODEL_DIR --target-size SIZE` and "
                         "give it with --also")
    smallest, largest, _ = search.size_range(plan_conversion(source, search.BASE_LEVEL, imatrix))
    budgets = []
    for t in targets:
        if t.level is not None:
            plan = plan_conversion(source, t.level, None if quant_levels.LEVELS[t.level].converter_outtype else imatrix)
            budget = header_nbytes(plan) + plan.tensor_bytes
            how = f"--target-size {t.spec} (the size of its {t.level} file)"
        else:
            budget, how = int(t.nbytes or 0), f"--target-size {t.spec}"
        search.check_budget(budget, smallest, largest, how)
        budgets.append(budget)
    return budgets


def _target_path(work: Path, name: str, budget: int, imatrix: Path | None) -> Path:
    tag = f".imatrix-{imatrix.stem}" if imatrix is not None else ""
    return work / f"{name}.TARGET-{budget}{tag}.gguf"  # exact bytes: 253M names many budgets


def prepare_target(source: Path, work: Path, budget: int, threads: int | None, status: Status,
                   imatrix: Path | None = None) -> Path:
    """The mix `convert --target-size` writes for `budget` bytes (with `imatrix`: weighted by it, as
    `convert --imatrix`), kept in `work` and reused on the same rules as the levels."""
    from alpaca_local.convert import search
    from alpaca_local.convert.pipeline import convert, plan_conversion

    out = _target_path(work, source.resolve().name, budget, imatrix)
    if _fresh(out, source, imatrix):
        return out
    label = search.target_label(budget)
    plan = plan_conversion(source, search.BASE_LEVEL, imatrix)
    options = search.measure(plan, lambda name, done, n: status(f"{label}: measuring {name} ({done}/{n})"),
                             workers=threads)
    result = search.search(plan, budget, options)
    status(f"converting {source.name} to {label}{' with the imatrix' if imatrix else ''}")
    work.mkdir(parents=True, exist_ok=True)
    convert(source, out, result.plan.quant, force=True, plan=result.plan, workers=threads)
    return out


def check_also(path: Path, baseline: Path | None) -> None:
    """Refuse an --also file that is not a GGUF with a vocabulary, or (given the f16 `baseline`)
    not one of this model: a vocabulary other than the f16's would score different tokens."""
    if not path.is_file():
        raise InputError(f"--also {path} does not exist; give a GGUF file of the same model")
    try:
        theirs = n_vocab(path)
    except InputError as exc:
        raise InputError(f"--also: {exc}") from None
    ours = n_vocab(baseline) if baseline is not None else theirs
    if theirs != ours:
        raise InputError(f"--also {path} has a vocabulary of {theirs:,} tokens, the model {ours:,}; "
                         "give a GGUF of the same model")


def also_label(path: Path) -> str:
    """An --also file's row: "target 253M" when it carries convert --target-size's recipe, else its name."""
    from alpaca_local.convert import search
    from alpaca_local.convert.gguf_read import read_gguf_header

    budget = search.recipe_budget(read_gguf_header(path).kv)
    return target_name(budget) if budget else path.name.removesuffix(".gguf")


def distinct_labels(labels: list[str], paths: list[Path]) -> list[str]:
    """The --also rows' names, told apart where two files would share one (`m.Q4_K_M.gguf` from two
    folders): those take their folder's name in front. A row named like a level or a target row
    keeps its name: its kind ("file") and its note say which it is."""
    return [f"{path.parent.name}/{name}" if labels.count(name) > 1 else name for name, path in zip(labels, paths)]


def target_name(budget: int) -> str:
    """The row name of a mix made for `budget` bytes: "target-253M"."""
    from alpaca_local.convert.search import short_size

    return TARGET_PREFIX + short_size(budget)


def file_facts(path: Path) -> tuple[int, float]:
    """File size and bits per weight = 8 * tensor bytes / parameters (llama-model-loader.cpp:1807);
    a split model's: every part's."""
    from alpaca_local.convert.split import read_gguf_model

    header = read_gguf_model(path)
    n_params = sum(math.prod(t.shape) for t in header.tensors)
    return header.file_size, 8 * header.tensor_data_bytes / max(n_params, 1)


def n_vocab(path: Path) -> int:
    from alpaca_local.convert.gguf_read import read_gguf_header

    header = read_gguf_header(path)
    tokens = header.kv.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise InputError(f"{path} has no tokenizer.ggml.tokens; it cannot tokenize the evaluation text")
    return len(tokens)

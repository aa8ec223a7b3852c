"""What each quant level loses against f16, measured the way llama.cpp measures it.

In:  a Hugging Face model folder or an f16 GGUF, quant names, an evaluation text.
Out: `QualityReport`: per level the file size, bits per weight, perplexity, KL
     divergence from f16 (mean, 99th percentile), top-1 agreement with f16 and
     prompt / generation speed.

The method is llama.cpp's `llama-perplexity --kl-divergence` (two runs: the f16
model saves its log-probabilities, then each quant is scored against them).
Line numbers refer to tools/perplexity/perplexity.cpp in the llama.cpp vendored
by llama-cpp-python 0.3.36:

- the text is tokenized once, with BOS when the model adds one (:473,
  `common_tokenize(ctx, text, true)`), and needs at least 2*n_ctx tokens (:478);
- it is cut into `len // n_ctx` chunks of n_ctx tokens (:491); each chunk is
  evaluated from an empty KV cache with its first token replaced by BOS (:1799);
- only the second half is scored: the logits at positions n_ctx/2 .. n_ctx-2
  predict tokens n_ctx/2+1 .. n_ctx-1 (:1772, :1849), so every scored token has
  at least n_ctx/2 tokens of context;
- per token: NLL = logsumexp(logits) - logit[next] (:210); KLD =
  sum_i p_f16(i) * (log p_f16(i) - log p_q(i)) over the i with
  log p_f16(i) > -16 (:230); "same top" = argmax of both agree (:238);
- PPL = exp(mean NLL) and each "±" is `mean_and_uncertainty` (:1750); the
  percentiles interpolate linearly on the sorted values (:1930); the top-1 ± is
  sqrt(p(1-p)/(n-1)) (:1981).

One deliberate difference: llama.cpp stores the f16 log-probabilities as
16-bit integers (a step of at most 16/65535 nats) to keep its logits file
small; we keep the f16 logits as float32 (in a scratch file, so memory stays
flat) and compute every log-softmax in float64.

Quant levels are made with our own converter from an HF folder; from an f16
GGUF (our converter needs HF input) with llama.cpp's quantizer
(`llama_model_quantize` with its default parameters, as `llama-quantize` runs).
Both routes give the same bytes (see README, "Exact").

Beside the levels: size targets (`SizeTarget`), each made from the HF folder by the search
`convert --target-size` runs (`convert.search`; it reads the HF weights, so an f16 GGUF
source refuses them), and any other GGUF of the same model (`also`), measured as they are.
The files are made in `quality_files`.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from alpaca_local.errors import InputError, UsageError
from alpaca_local.measure.quality_files import (  # noqa: F401  (re-exported: the measurement's public names)
    BASELINE, IMATRIX_TAG, TARGET_PREFIX, SizeTarget, Status, also_label, check_also, check_f16_gguf,
    default_work_dir, distinct_labels, file_facts, n_vocab, parse_quants, prepare_baseline, prepare_level, prepare_target,
    quantize_gguf, target_budgets, target_name,
)

if TYPE_CHECKING:
    from llama_cpp import Llama

DEFAULT_QUANTS = ("q4_0", "q4_k_m", "q5_k_m", "q8_0")
DEFAULT_CTX = 512  # llama-perplexity's usual -c for these tables
MIN_CTX = 16
DEFAULT_GEN_TOKENS = 32
KLD_LOG_P_FLOOR = -16.0  # perplexity.cpp:230 skips f16 probabilities below e^-16
KLD_MIN_COUNT = 100  # perplexity.cpp:1887 prints no statistics for fewer scored tokens



# --------------------------------------------------------------------------
# Pure arithmetic on logits (tested against direct numpy in tests/test_quality.py)
# --------------------------------------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities in float64 (max subtracted first, as perplexity.cpp:191)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def token_nll(logp: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) per row."""
    return -logp[np.arange(len(targets)), targets]


def kl_divergence(base_logp: np.ndarray, logp: np.ndarray, floor: float | None = KLD_LOG_P_FLOOR) -> np.ndarray:
    """KL(p_base || p) per row; terms with log p_base <= floor are dropped, as llama.cpp does."""
    terms = np.exp(base_logp) * (base_logp - logp)
    if floor is not None:
        terms = np.where(base_logp > floor, terms, 0.0)
    return terms.sum(axis=-1)


def same_top(base_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Whether the most likely token agrees (first index on ties, like the C loops)."""
    return np.argmax(base_logits, axis=-1) == np.argmax(logits, axis=-1)


@dataclass(frozen=True)
class TokenScores:
    """Per scored token: NLL under the model and under f16, KLD, top-1 agreement."""

    nll: np.ndarray
    nll_base: np.ndarray
    kld: np.ndarray
    same_top: np.ndarray

    @staticmethod
    def concat(parts: Sequence[TokenScores]) -> TokenScores:
        return TokenScores(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("nll", "nll_base", "kld", "same_top")))


def score_chunk(base_logits: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> TokenScores:
    """Scores of one chunk's scored rows; row k of the logits predicts targets[k]."""
    base_logp, logp = log_softmax(base_logits), log_softmax(logits)
    return TokenScores(
        token_nll(logp, targets), token_nll(base_logp, targets),
        kl_divergence(base_logp, logp), same_top(base_logits, logits),
    )


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error, exactly as perplexity.cpp:1750 (0 below 11 values)."""
    count = len(values)
    if count < 1:
        return 0.0, 0.0
    mean = float(np.sum(values, dtype=np.float64) / count)
    var = float(np.sum(np.square(values, dtype=np.float64)) / count - mean * mean)
    return mean, (math.sqrt(var / (count - 1)) if var > 0 and count > 10 else 0.0)


def percentile(values: np.ndarray, fraction: float) -> float:
    """perplexity.cpp:1930: linear interpolation between the sorted neighbours."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = fraction * (len(v) - 1)
    i = int(p)
    p -= i
    return float((1 - p) * v[i] + p * v[min(i + 1, len(v) - 1)])


@dataclass(frozen=True)
class Stats:
    count: int  # scored tokens
    perplexity: float
    perplexity_err: float
    ppl_ratio: float  # PPL / PPL(f16)
    mean_kld: float
    mean_kld_err: float
    kld_p99: float
    same_top: float  # fraction of tokens whose top-1 equals f16's
    same_top_err: float


def summarize(s: TokenScores) -> Stats:
    """The summary lines of llama-perplexity --kl-divergence (perplexity.cpp:1891-1982)."""
    log_ppl, log_ppl_err = mean_and_uncertainty(s.nll)
    log_base, _ = mean_and_uncertainty(s.nll_base)
    kld, kld_err = mean_and_uncertainty(s.kld)
    n = len(s.same_top)
    top = float(np.mean(s.same_top)) if n else 0.0
    ppl = math.exp(log_ppl)
    return Stats(
        count=n, perplexity=ppl, perplexity_err=ppl * log_ppl_err, ppl_ratio=math.exp(log_ppl - log_base),
        mean_kld=kld, mean_kld_err=kld_err, kld_p99=percentile(s.kld, 0.99) if n else 0.0,
        same_top=top, same_top_err=math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0,
    )


def make_chunks(tokens: Sequence[int], n_ctx: int, bos: int | None) -> list[list[int]]:
    """len // n_ctx chunks; the first token of each becomes BOS when the model uses one."""
    chunks = [list(tokens[i * n_ctx : (i + 1) * n_ctx]) for i in range(len(tokens) // n_ctx)]
    if bos is not None:
        for c in chunks:
            c[0] = bos
    return chunks


def scored_targets(chunk: Sequence[int], n_ctx: int) -> np.ndarray:
    """The tokens the scored rows predict: positions n_ctx/2+1 .. n_ctx-1."""
    return np.asarray(chunk[n_ctx // 2 + 1 : n_ctx], dtype=np.int64)


# --------------------------------------------------------------------------
# Running the models (llama-cpp-python)
# --------------------------------------------------------------------------

def load(path: Path, n_ctx: int, threads: int | None, no_repack: bool = False) -> Llama:
    """A `Llama` returning logits for every position; one decode call per chunk."""
    from alpaca_local.run.chat import load_llama

    return load_llama(
        path, n_ctx, no_repack=no_repack, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, n_threads=threads,
        n_threads_batch=threads,
    )


def tokenize(llm: Llama, text: str) -> tuple[list[int], int | None]:
    """Tokens of the whole text (BOS first when the model adds one) and that BOS id, or None."""
    import llama_cpp

    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llm._model.vocab))
    tokens = list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))
    return tokens, (int(llm.token_bos()) if add_bos else None)


def chunk_logits(llm: Llama, chunk: list[int]) -> tuple[np.ndarray, float]:
    """float32 logits of the scored rows (positions n_ctx/2 .. n_ctx-2) and the decode seconds."""
    n_ctx = len(chunk)
    llm.reset()  # eval then clears the KV cache from position 0: every chunk starts empty
    t0 = time.perf_counter()
    llm.eval(chunk)
    seconds = time.perf_counter() - t0
    return np.array(llm.scores[n_ctx // 2 : n_ctx - 1], dtype=np.float32), seconds


def generation_speed(llm: Llama, prompt: list[int], n_tokens: int) -> float | None:
    """Greedy tokens/s after the first token (the first one carries the prompt's evaluation)."""
    n_tokens = min(n_tokens, llm.n_ctx() - len(prompt))
    if n_tokens < 2:
        return None
    llm.reset()
    t0, count = 0.0, 0
    for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        count += 1
        if count == 1:
            t0 = time.perf_counter()
        if count >= n_tokens:
            break
    return (count - 1) / max(time.perf_counter() - t0, 1e-9)


# --------------------------------------------------------------------------
# The whole measurement
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class LevelResult:
    quant: str  # the row's name: "q4_k_m", "q4_k_m+imatrix", "target-253M", an --also file's stem
    path: Path
    size_bytes: int
    bits_per_weight: float
    stats: Stats
    prompt_tokens_per_s: float
    gen_tokens_per_s: float | None
    kind: str = "level"  # "level", "target" (a --target-size made here) or "file" (an --also file)
    target_bytes: int | None = None  # a per-tensor mix: the budget it was made for (alpaca_local.target.bytes)
    nearest_level: str | None = None  # a mix: the level its general.file_type names
    target_of: str | None = None  # a --target-size given as a level: that level

    @property
    def label(self) -> str:
        """The table's name for the row: "target 253M" for a mix."""
        return self.quant.replace("-", " ", 1) if self.quant.startswith(TARGET_PREFIX) else self.quant

    def as_dict(self) -> dict:
        d = {"quant": self.quant, "path": str(self.path), "size_bytes": self.size_bytes,
             "bits_per_weight": round(self.bits_per_weight, 4)}
        d.update({k: v for k, v in asdict(self.stats).items() if k != "count"})
        d["prompt_tokens_per_s"] = round(self.prompt_tokens_per_s, 2)
        d["gen_tokens_per_s"] = None if self.gen_tokens_per_s is None else round(self.gen_tokens_per_s, 2)
        d["kind"] = self.kind
        if self.target_bytes is not None:
            d.update(target_bytes=self.target_bytes, nearest_level=self.nearest_level)
        if self.target_of is not None:
            d["target_of"] = self.target_of
        return d


@dataclass(frozen=True)
class QualityReport:
    model: str
    n_ctx: int
    n_text_tokens: int
    n_chunks: int
    n_scored: int
    levels: tuple[LevelResult, ...]

    def as_dict(self) -> dict:
        return {"model": self.model, "n_ctx": self.n_ctx, "text_tokens": self.n_text_tokens,
                "chunks": self.n_chunks, "scored_tokens": self.n_scored,
                "levels": [lv.as_dict() for lv in self.levels]}


class _BaseLogits:
    """The f16 logits of every scored row, in a float32 scratch file (n_chunks x rows x vocab)."""

    def __init__(self, folder: Path, n_chunks: int, rows: int, n_vocab: int) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix=".quality-", dir=folder)
        self.array = np.lib.format.open_memmap(
            Path(self._dir.name) / "f16-logits.npy", mode="w+", dtype=np.float32, shape=(n_chunks, rows, n_vocab))

    def close(self) -> None:
        del self.array
        self._dir.cleanup()


def _evaluate(path: Path, quant: str, chunks: list[list[int]], base: _BaseLogits, n_ctx: int,
              threads: int | None, gen_tokens: int, status: Status, no_repack: bool = False) -> LevelResult:
    """Score one file on every chunk; the f16 run scores against itself and fills `base`."""
    llm = load(path, n_ctx, threads, no_repack)
    parts, seconds = [], 0.0
    for i, chunk in enumerate(chunks):
        status(f"evaluating {quant}: chunk {i + 1}/{len(chunks)}")
        logits, dt = chunk_logits(llm, chunk)
        seconds += dt
        if quant == BASELINE:
            base.array[i] = logits
        parts.append(score_chunk(base.array[i], logits, scored_targets(chunk, n_ctx)))
    status(f"timing generation with {quant}")
    gen = generation_speed(llm, chunks[0][: min(64, n_ctx // 2)], gen_tokens)
    llm.close()
    size, bpw = file_facts(path)
    prompt_tps = len(chunks) * n_ctx / max(seconds, 1e-9)
    return LevelResult(quant, path, size, bpw, summarize(TokenScores.concat(parts)), prompt_tps, gen)


def _check_ctx(n_ctx: int) -> None:
    """Refuse a context too small to score anything, before any file is made."""
    if n_ctx < MIN_CTX:
        raise UsageError(f"--ctx {n_ctx} is too small; give at least {MIN_CTX} (default {DEFAULT_CTX})")


def measure_quality(
    source: Path,
    quants: Sequence[str] = DEFAULT_QUANTS,
    text: str | None = None,
    n_ctx: int = DEFAULT_CTX,
    work: Path | None = None,
    threads: int | None = None,
    gen_tokens: int = DEFAULT_GEN_TOKENS,
    status: Status = lambda line: None,
    imatrix: Path | None = None,
    no_repack: bool = False,
    targets: Sequence[SizeTarget] = (),
    also: Sequence[Path] = (),
) -> QualityReport:
    """f16 first (its logits become the reference), then each quant level against it; with
    `imatrix`, each level twice: plain, then quantized with the importance matrix ("q4_k_m+imatrix").
    Then each size target (a per-tensor mix made from the HF folder, with `imatrix` when given),
    then each `also` file as it is."""
    if not source.exists():
        raise InputError(f"{source} does not exist; give a Hugging Face model folder or an f16 .gguf file")
    _check_ctx(n_ctx)
    work = work or default_work_dir(source)
    needs = _imatrix_levels(source, quants, imatrix)
    budgets = target_budgets(source, targets, imatrix) if targets else []
    for path in also:  # before anything is converted; against the f16's vocabulary once it is there
        check_also(path, None)
    baseline = prepare_baseline(source, work, status)
    for path in also:
        check_also(path, baseline)
    # Each level is made only when its turn comes, after the text has been checked against the f16.
    # A level that needs an importance matrix is measured with it only.
    # (row name, file or how to make it, kind, the level a target's size is taken from)
    entries = [(f"{quant}{IMATRIX_TAG}" if imat is not None else quant,
                lambda quant=quant, imat=imat: prepare_level(source, baseline, work, quant, threads, status, imat),
                "level", None)
               for quant in quants
               for imat in ((imatrix,) if quant in needs else (None, imatrix) if imatrix is not None else (None,))]
    entries += [(target_name(budget), lambda budget=budget: prepare_target(source, work, budget, threads, status, imatrix),
                 "target", t.level) for t, budget in zip(targets, budgets)]
    labels = distinct_labels([also_label(path) for path in also], also)
    entries += [(label, path, "file", None) for label, path in zip(labels, also)]
    name = source.resolve().name if source.is_dir() else source.stem
    report = measure_files(baseline, [(label, f) for label, f, _, _ in entries], text, n_ctx, work, threads,
                           gen_tokens, status, name, no_repack)
    rows = [report.levels[0]] + [_described(lv, kind, of) for lv, (_, _, kind, of) in zip(report.levels[1:], entries)]
    return replace(report, levels=tuple(rows))


def _described(lv: LevelResult, kind: str, target_of: str | None) -> LevelResult:
    """The row with what its file says of itself: a per-tensor mix's budget and labelled level."""
    if kind == "level":
        return lv
    from alpaca_local.convert.gguf_read import read_gguf_header
    from alpaca_local.convert.quant_rules import level_of_file_type
    from alpaca_local.convert.search import recipe_budget

    kv = read_gguf_header(lv.path).kv
    budget = recipe_budget(kv)
    nearest = level_of_file_type(kv.get("general.file_type")) if budget else None
    return replace(lv, kind=kind, target_bytes=budget, nearest_level=nearest, target_of=target_of)


def measure_files(
    baseline: Path,
    files: Sequence[tuple[str, Path | Callable[[], Path]]],
    text: str | None = None,
    n_ctx: int = DEFAULT_CTX,
    work: Path | None = None,
    threads: int | None = None,
    gen_tokens: int = DEFAULT_GEN_TOKENS,
    status: Status = lambda line: None,
    name: str | None = None,
    no_repack: bool = False,
) -> QualityReport:
    """The f16 `baseline` first (its logits become the reference), then each (label, file) against
    it: what `quality` measures, for files that exist (convert --card-quality's levels) or are made
    when their turn comes (a callable returning the path).
    `work` holds the f16 logits while it runs (default: beside the baseline)."""
    _check_ctx(n_ctx)
    text = default_text() if text is None else text
    work = work or baseline.parent
    tokens, chunks = _tokenize_checked(baseline, text, n_ctx, threads, no_repack)
    work.mkdir(parents=True, exist_ok=True)
    rows = n_ctx - 1 - n_ctx // 2
    base = _BaseLogits(work, len(chunks), rows, n_vocab(baseline))
    try:
        results = [_evaluate(baseline, BASELINE, chunks, base, n_ctx, threads, gen_tokens, status, no_repack)]
        for label, path in files:
            path = path if isinstance(path, Path) else path()
            results.append(_evaluate(path, label, chunks, base, n_ctx, threads, gen_tokens, status, no_repack))
    finally:
        base.close()
    return QualityReport(name or baseline.stem, n_ctx, len(tokens), len(chunks), len(chunks) * rows, tuple(results))


def _imatrix_levels(source: Path, quants: Sequence[str], imatrix: Path | None) -> set[str]:
    """The levels that cannot be made without an importance matrix from this source (measured
    with `imatrix` only); without one, such a level is refused here, before the long runs."""
    from alpaca_local.convert.pipeline import levels_needing_imatrix, plan_conversion

    if source.is_dir():
        needs = levels_needing_imatrix(plan_conversion(source, BASELINE), quants)
    else:  # an f16 GGUF: the same per-tensor rule on its own shapes, when we know its architecture
        from alpaca_local.convert.gguf_read import read_gguf_header
        from alpaca_local.plan.memory import imatrix_levels, shape_from_gguf

        needs = imatrix_levels(shape_from_gguf(read_gguf_header(source)), quants)
    if needs and imatrix is None:
        raise UsageError(f"{', '.join(sorted(needs))} need an importance matrix; add --imatrix FILE "
                         f"(from `alpaca-local imatrix {source}`)")
    return needs


def _tokenize_checked(baseline: Path, text: str, n_ctx: int, threads: int | None,
                      no_repack: bool = False) -> tuple[list[int], list[list[int]]]:
    """Tokenize with the f16 model; every level then sees these same ids (llama.cpp: the logits file)."""
    llm = load(baseline, n_ctx, threads, no_repack)
    tokens, bos = tokenize(llm, text)
    llm.close()
    if len(tokens) < 2 * n_ctx:  # perplexity.cpp:478
        raise InputError(
            f"the evaluation text is {len(tokens)} tokens; --ctx {n_ctx} needs at least {2 * n_ctx} "
            "(two chunks); give a longer --text or a smaller --ctx"
        )
    return tokens, make_chunks(tokens, n_ctx, bos)


def default_text() -> str:
    """The evaluation text shipped with the package (alpaca_local/measure/data/eval.txt)."""
    from importlib.resources import files

    return (files("alpaca_local.measure") / "data" / "eval.txt").read_text(encoding="utf-8")

"""Chat with a GGUF model in the Stanford Alpaca format: the library behind `alpaca-local chat`.

In:  a model spec (path, name in models/, or nothing), turns of instructions.
Out: a generator of small results, `Piece` (text to show) then one `Done` (the whole
response and its counts and timings), consumed by one-shot mode, the REPL and a server.

The prompt text comes only from `template.render_prompt`. It is tokenized as plain
text (special-token parsing off) after an optional BOS, so user words such as `</s>`
or `### Response:` can never change the template. Generation stops at end-of-generation
tokens and at a line that opens a new Alpaca block; that line is never shown.
"""

from __future__ import annotations

import codecs
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from alpaca_local.errors import InputError, UsageError
from alpaca_local.template import MARKERS, Turn, render_prompt

if TYPE_CHECKING:
    from alpaca_local.convert.gguf_read import GGUFHeader

DEFAULT_MODELS_DIR = Path("models")


# ---------------------------------------------------------------------------------------
# Finding and checking the model file
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelInfo:
    """What the GGUF header says, read before llama.cpp sees the file."""

    path: Path
    version: int
    arch: str
    context_length: int | None  # `{arch}.context_length`, the trained context
    chat_template: str | None = None  # `tokenizer.chat_template`, for --template model
    header: GGUFHeader | None = None  # the whole checked header (tensors: where load_llama puts them)


def resolve_model(spec: str | None, models_dir: Path = DEFAULT_MODELS_DIR) -> Path:
    """A path as given; else a name in models_dir (`alpaca-7b` -> alpaca-7b.*.gguf); else the newest *.gguf."""
    if spec is None:
        found = sorted(_ggufs(models_dir), key=lambda p: p.stat().st_mtime)
        if not found:
            raise InputError(
                f"no model given and no *.gguf in {models_dir}/; "
                "convert one first: alpaca-local convert SRC (e.g. ./alpaca-7b)"
            )
        return found[-1]
    path = Path(spec)
    if path.exists() or path.suffix == ".gguf" or os.sep in spec:
        if not path.exists():
            raise InputError(f"model file {spec} does not exist")
        return path
    return _by_name(spec, models_dir)


def _ggufs(models_dir: Path) -> list[Path]:
    """The models in models_dir: *.gguf files, a split model by its first part only."""
    from alpaca_local.convert.split import is_later_part

    if not models_dir.is_dir():
        return []
    return [p for p in models_dir.glob("*.gguf") if p.is_file() and not is_later_part(p)]


def _by_name(name: str, models_dir: Path) -> Path:
    matches = [p for p in _ggufs(models_dir) if p.name.startswith(name + ".") or p.stem == name]
    if matches:
        return max(matches, key=lambda p: p.stat().st_mtime)  # several quants: the newest
    known = ", ".join(sorted(p.name for p in _ggufs(models_dir))) or "none"
    raise InputError(
        f"no model {name!r}: not a file, and no {models_dir}/{name}.*.gguf "
        f"(models there: {known}); convert one with: alpaca-local convert SRC"
    )


def read_model_info(path: Path) -> ModelInfo:
    """Check the file is a whole GGUF (magic, version 2/3, every tensor inside the file) and
    read its architecture and trained context, before llama.cpp sees it: llama.cpp's own
    failure on a bad file is a log line we silence and a bare ValueError."""
    from alpaca_local.convert.gguf_read import printable
    from alpaca_local.convert.split import read_gguf_model

    header = read_gguf_model(path)  # a split model: every part, as llama.cpp will read them
    arch = header.arch
    ctx = header.kv.get(f"{arch}.context_length")
    if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx <= 0):
        raise InputError(f"{path}: metadata {arch}.context_length = {printable(ctx)} is not a positive integer")
    template = header.kv.get("tokenizer.chat_template")
    return ModelInfo(path, header.version, arch, ctx, template if isinstance(template, str) and template else None,
                     header)


def check_context(n_ctx: int, info: ModelInfo) -> None:
    """Refuse a context the model was not trained for: llama.cpp would load it and produce garbage."""
    if n_ctx < 16:
        raise UsageError(f"--ctx {n_ctx} is too small; give at least 16 (default 2048)")
    if info.context_length is not None and n_ctx > info.context_length:
        raise UsageError(
            f"--ctx {n_ctx} is larger than the {info.context_length} tokens "
            f"{info.path.name} was trained on; give --ctx {info.context_length} or less"
        )


# ---------------------------------------------------------------------------------------
# The model, as generation needs it
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampling:
    """Defaults of llama.cpp's classic `main` as used with Alpaca (-n 256 --temp 0.7)."""

    max_tokens: int = 256  # -1: until the context is full
    temp: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.1
    seed: int | None = None


class TokenModel(Protocol):
    """The few calls chat needs; `LlamaModel` wraps llama-cpp-python, tests use fakes."""

    add_bos: bool
    bos_id: int
    n_ctx: int

    def tokenize(self, text: str) -> list[int]: ...  # plain text: no BOS, no special tokens

    def tokenize_special(self, text: str) -> list[int]: ...  # template text: special tokens parsed

    def is_special(self, token: int) -> bool: ...

    def token_text(self, token: int) -> str: ...

    def piece(self, token: int) -> bytes: ...

    def is_eog(self, token: int) -> bool: ...

    def generate(self, ids: list[int], sampling: Sampling) -> Iterator[int]: ...

    def reset(self) -> None: ...


class LlamaModel:
    """A llama-cpp-python `Llama` behind the `TokenModel` calls."""

    def __init__(self, llm) -> None:
        import llama_cpp

        self.llm = llm
        self._vocab = llm._model.vocab
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.bos_id = int(llm.token_bos())
        self.eos_id = int(llm.token_eos())
        self.n_ctx = int(llm.n_ctx())

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def tokenize_special(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def token_text(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def is_special(self, token: int) -> bool:
        """Control and user-defined tokens: the ones llama.cpp matches as whole strings."""
        import llama_cpp

        attr = llama_cpp.llama_vocab_get_attr(self._vocab, token)
        return bool(attr & (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED))

    def piece(self, token: int) -> bytes:
        return self.llm.detokenize([token])

    def is_eog(self, token: int) -> bool:
        return bool(self._is_eog(self._vocab, token))

    def generate(self, ids: list[int], sampling: Sampling) -> Iterator[int]:
        if sampling.seed is not None:
            self.llm.set_seed(sampling.seed)
        return self.llm.generate(
            ids, top_k=sampling.top_k, top_p=sampling.top_p, temp=sampling.temp,
            repeat_penalty=sampling.repeat_penalty,
        )

    def reset(self) -> None:
        self.llm.reset()


def load_llama(path: Path, n_ctx: int = 2048, cls: type | None = None, no_repack: bool = False,
               n_cpu_moe: int = 0, **kwargs):
    """Validate the file (header, trained context), then load it with llama.cpp's logging
    silenced and its weights placed by `cpu_buffers` (an AMX build would crash otherwise).
    `cls` is `llama_cpp.Llama` or a subclass; `kwargs` go to it. `no_repack`: no extra
    buffer types (--no-repack); `n_cpu_moe`: keep the experts of the first N layers in CPU
    buffers (--n-cpu-moe). The one loader of chat, serve and quality."""
    from alpaca_local.run import cpu_buffers

    info = read_model_info(path)
    check_context(n_ctx, info)
    if cls is None:
        from llama_cpp import Llama as cls
    silence_llama_cpp()
    ngl = int(kwargs.get("n_gpu_layers") or 0)
    placement = cpu_buffers.load_placement(info.header, no_repack, ngl, n_cpu_moe)
    if not kwargs.get("vocab_only"):
        cpu_buffers.preflight(path, info.header, placement, ngl)
    try:
        with cpu_buffers.llama_defaults(placement):
            llm = cls(model_path=str(path), n_ctx=n_ctx, verbose=False, **kwargs)
    except (ValueError, RuntimeError, OSError) as exc:
        raise InputError(f"llama.cpp could not load {path} ({exc}); is it a complete, supported model?") from None
    llm.placement = placement  # what --verbose and the benchmarks report
    return llm


def load_model(
    path: Path, n_ctx: int = 2048, n_gpu_layers: int = 0, n_threads: int | None = None, no_repack: bool = False,
    n_cpu_moe: int = 0, **llama_kwargs,
) -> LlamaModel:
    return LlamaModel(load_llama(path, n_ctx, no_repack=no_repack, n_cpu_moe=n_cpu_moe, n_gpu_layers=n_gpu_layers,
                                 n_threads=n_threads, **llama_kwargs))


def lora_kwargs(lora: Path | None, scale: float, model: Path) -> dict:
    """Llama(lora_path=, lora_scale=) for a LoRA adapter GGUF applied at run time, after checking
    that it is one and that it fits `model` (llama.cpp's own refusal is a silenced log line)."""
    import math

    if lora is None:
        if scale != 1.0:
            raise UsageError("--lora-scale needs --lora FILE")
        return {}
    if not math.isfinite(scale):
        raise UsageError(f"--lora-scale {scale} is not a finite number")
    from alpaca_local.convert.lora_gguf import check_adapter_fits, read_adapter_header
    from alpaca_local.convert.split import read_gguf_model

    adapter = read_adapter_header(lora)
    header = read_gguf_model(model)
    check_adapter_fits(adapter, header.arch, {t.name: t.shape for t in header.tensors}, model)
    return {"lora_path": str(lora), "lora_scale": scale}


_quiet_log = None  # the ctypes callback must outlive every call llama.cpp makes to it


def silence_llama_cpp() -> None:
    """Drop all of llama.cpp's log lines (stderr must stay clean for pipes).

    `verbose=False` is not enough: llama-cpp-python 0.3.x maps ggml's log levels with an
    old enum, so WARN lines (e.g. Gemma's "using full-size SWA cache") print as errors.
    """
    global _quiet_log
    import llama_cpp

    if _quiet_log is None:
        _quiet_log = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(_quiet_log, None)


# ---------------------------------------------------------------------------------------
# Prompt -> token ids
# ---------------------------------------------------------------------------------------

def prompt_ids(model: TokenModel, prompt: str) -> list[int]:
    """BOS (when the model asks for it) + the prompt as plain text: user text cannot inject tokens."""
    return ([model.bos_id] if model.add_bos else []) + model.tokenize(prompt)


@dataclass(frozen=True)
class PromptFormat:
    """How turns become the text and the token ids the model sees, and where answers stop."""

    name: str
    text: Callable[[list[Turn], str | None], str]
    ids: Callable[[TokenModel, list[Turn], str | None], list[int]]
    markers: tuple[str, ...]
    count: Callable[[TokenModel, str], int]  # tokens of a rendered prompt, for history trimming


ALPACA = PromptFormat(
    "alpaca", render_prompt, lambda model, turns, system: prompt_ids(model, render_prompt(turns, system)),
    MARKERS, lambda model, text: len(prompt_ids(model, text)),
)


def model_format(source: str, bos: str, eos: str) -> PromptFormat:
    """The model's own chat template (sandboxed); stops at end-of-generation tokens only."""
    from alpaca_local.run.model_template import fragments, render_segments

    def text(turns: list[Turn], system: str | None) -> str:
        return "".join(s.text for s in render_segments(source, turns, system, bos, eos))

    def ids(model: TokenModel, turns: list[Turn], system: str | None) -> list[int]:
        def specials_in(template_text: str) -> dict[str, int]:
            found = (i for i in model.tokenize_special(template_text) if model.is_special(i))
            return {model.token_text(i): i for i in found}

        out: list[int] = []
        for frag in fragments(render_segments(source, turns, system, bos, eos), specials_in):
            out += [frag] if isinstance(frag, int) else model.tokenize(frag)
        if model.add_bos and (not out or out[0] != model.bos_id):
            out.insert(0, model.bos_id)  # templates that do not write {{ bos_token }} themselves
        return out

    # Counting parses the user's words as special too: close enough to decide which old turns to drop.
    return PromptFormat("model", text, ids, (), lambda model, t: len(model.tokenize_special(t)) + int(model.add_bos))


def prompt_format(name: str, info: ModelInfo, model: LlamaModel) -> PromptFormat:
    """`--template alpaca` (the default, the toolkit's contract) or `--template model`."""
    if name == "alpaca":
        return ALPACA
    if info.chat_template is None:
        raise InputError(f"{info.path.name} has no chat template (tokenizer.chat_template); use --template alpaca")
    return model_format(info.chat_template, model.token_text(model.bos_id), model.token_text(model.eos_id))


def fit_history(
    history: list[Turn], current: Turn, system: str | None, count: Callable[[str], int],
    n_ctx: int, reserve: int, render: Callable[[list[Turn], str | None], str] = render_prompt,
) -> list[Turn]:
    """Drop the oldest turns until prompt + `reserve` fits in n_ctx; never cut the current turn.

    `count` gives a prompt's token count (BOS included). Raises InputError when the
    current instruction alone leaves no room to answer.
    """
    alone = count(render([current], system))
    if alone >= n_ctx:
        raise InputError(
            f"the instruction is {alone} tokens, the context holds {n_ctx}; "
            "shorten it or give a larger --ctx"
        )
    kept = list(history)
    while kept and count(render(kept + [current], system)) + reserve > n_ctx:
        kept.pop(0)
    return kept + [current]


# ---------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    """Text to show now; the pieces of one answer join to `Done.text`."""

    text: str


@dataclass(frozen=True)
class Done:
    text: str  # the response, stripped, without the stop marker
    stop: str  # "eos", "marker", "length" or "interrupted"
    prompt_tokens: int
    completion_tokens: int  # tokens sampled, end-of-generation token excluded
    prompt_seconds: float  # until the first token: prompt evaluation + first sample
    generation_seconds: float  # from the first token to the last

    @property
    def tokens_per_second(self) -> float:
        """Generation speed after the first token, as llama.cpp's eval timing counts it."""
        if self.completion_tokens < 2 or self.generation_seconds <= 0:
            return 0.0
        return (self.completion_tokens - 1) / self.generation_seconds

    def as_dict(self) -> dict:
        return {
            "response": self.text,
            "stop": self.stop,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "timings": {
                "prompt_seconds": round(self.prompt_seconds, 4),
                "generation_seconds": round(self.generation_seconds, 4),
            },
            "tokens_per_second": round(self.tokens_per_second, 2),
        }


class StopFilter:
    """Turns streamed text into shown text: cuts at a new Alpaca block, strips the ends.

    A marker can arrive split across tokens ("\\n###", " Instruction", ":"), so any tail
    that could still become "\\n" + marker is held back, as is trailing whitespace (the
    answer is stripped, and the shown pieces must join to exactly the answer).
    """

    def __init__(self, markers: tuple[str, ...] = MARKERS) -> None:
        self.markers = markers
        self.text = ""  # the answer so far, leading whitespace dropped
        self.shown = 0  # how much of `text` has been handed out
        self.stopped = False

    def feed(self, chunk: str) -> str:
        """Add generated text; return what may be shown now. Sets `stopped` at a marker."""
        self.text += chunk
        if not self.shown:
            self.text = self.text.lstrip()
        cut = self._marker_at()
        if cut is not None:
            self.text = self.text[:cut].rstrip()
            self.stopped = True
            return self._release(len(self.text))
        return self._release(self._safe_end())

    def finish(self) -> str:
        """End of generation: the held-back tail, minus trailing whitespace."""
        self.text = self.text.rstrip()
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        out = self.text[self.shown:end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return out

    def _marker_at(self) -> int | None:
        # Held-back text always starts at or before a marker's "\n", so search from `shown`.
        hits = [i for m in self.markers if (i := self.text.find("\n" + m, self.shown)) >= 0]
        if not self.shown and any(self.text.startswith(m) for m in self.markers):
            hits.append(0)  # the answer itself opens a new block
        return min(hits) if hits else None

    def _safe_end(self) -> int:
        end = len(self.text)
        start = self.text.rfind("\n", self.shown)
        while start >= 0:  # the earliest newline whose tail may still grow into a marker
            tail = self.text[start:]
            if any(("\n" + m).startswith(tail) for m in self.markers):
                end = start
            start = self.text.rfind("\n", self.shown, start)
        if not self.shown and any(m.startswith(self.text) for m in self.markers):
            end = 0
        return len(self.text[:end].rstrip())


def generate(
    model: TokenModel, ids: list[int], sampling: Sampling = Sampling(),
    clock: Callable[[], float] = time.perf_counter, markers: tuple[str, ...] = MARKERS,
) -> Iterator[Piece | Done]:
    """Stream the answer to prompt `ids` as `Piece`s, then one `Done`.

    Closing the generator (or a KeyboardInterrupt inside it) stops the model; the
    caller then gets no `Done`, and the next call starts from a reset model.
    """
    room = model.n_ctx - len(ids)
    if room <= 0:
        raise InputError(f"the prompt is {len(ids)} tokens, the context holds {model.n_ctx}; give a larger --ctx")
    limit = room if sampling.max_tokens < 0 else min(sampling.max_tokens, room)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens
    stops = StopFilter(markers)
    n, stop = 0, "length"
    start = clock()
    first = last = start
    tokens = model.generate(ids, sampling)
    try:
        for token in tokens:
            last = clock()
            if n == 0:
                first = last
            if model.is_eog(token):
                stop = "eos"
                break
            n += 1
            shown = stops.feed(decoder.decode(model.piece(token)))
            if shown:
                yield Piece(shown)
            if stops.stopped:
                stop = "marker"
                break
            if n >= limit:
                break
    except BaseException:
        model.reset()  # the KV cache may hold a half-evaluated batch
        raise
    finally:
        close = getattr(tokens, "close", None)  # a generator: stop llama.cpp's loop now
        if close is not None:
            close()
    tail = "" if stops.stopped else stops.feed(decoder.decode(b"", final=True)) + stops.finish()
    if tail:
        yield Piece(tail)
    yield Done(stops.text, stop, len(ids), n, first - start, last - first)


def answer(model: TokenModel, turns: list[Turn], system: str | None = None, sampling: Sampling = Sampling()) -> Done:
    """One prompt, the whole answer: the non-streaming convenience."""
    ids = prompt_ids(model, render_prompt(turns, system))
    result = None
    for item in generate(model, ids, sampling):
        if isinstance(item, Done):
            result = item
    assert result is not None
    return result

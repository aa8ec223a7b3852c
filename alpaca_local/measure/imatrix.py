"""Compute an importance matrix the way `llama-imatrix` does, inside llama-cpp-python.

In:  a GGUF model, a calibration text, a chunk size (-c, default 512) and a chunk limit.
Out: `Imatrix` (convert/imatrix_file.py): for every weight that multiplies activations
     in a MUL_MAT / MUL_MAT_ID node, the sum over tokens of each input column's square
     and the number of tokens summed; written in llama.cpp's GGUF imatrix format.

How (tools/imatrix/imatrix.cpp in the llama.cpp vendored by llama-cpp-python 0.3.36):
- the text is tokenized once with the model's BOS (`common_tokenize(ctx, prompt, true)`,
  :804, special tokens not parsed) and needs at least 2 chunks (:818); it is cut into
  len // n_ctx chunks (:832); each chunk is decoded from an empty KV cache (:868) with
  its first token replaced by BOS when the model adds one (:884), every position
  asking for logits (:892: otherwise the last layer's FFN would see one row);
- llama.cpp calls our `cb_eval` for every graph node (`collect_imatrix`, :249): we
  ask for MUL_MAT_ID nodes, and for MUL_MAT nodes whose activations (src1) are F32
  with at least 16 rows and whose weight (src0) is named `blk.*` (`output.weight`
  only with process_output); then x**2 of every activation row is added to the
  weight's per-column sums and the row count to its count (:386-404); MUL_MAT_ID
  adds each routed token to its expert's slice (:300-340);
- chunk_count is the largest count // n_ctx (:409), chunk_size is n_ctx.

We decode one chunk per call (llama-imatrix packs n_batch / n_ctx chunks as parallel
sequences; the sums are the same up to float rounding). A chunk is merged into the
totals only once its decode finished, so Ctrl-C (which stops the graph at the next
node) leaves whole chunks only: `ImatrixRun.result(partial=True)` then saves them.
"""

from __future__ import annotations

import ctypes
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alpaca_local.convert.ggml import GGMLUnavailable, library
from alpaca_local.convert.imatrix_file import Imatrix, ImatrixEntry
from alpaca_local.errors import InputError, RuntimeFailure

DEFAULT_CTX = 512  # llama-imatrix's default -c
MIN_ROWS = 16  # imatrix.cpp:262: "why are small batches ignored (<16 tokens)?"
GGML_TYPE_F32 = 0
GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64  # ggml/include/ggml.h:222-229
GGML_OBJECT_SIZE = 32  # sizeof(struct ggml_object), ggml.c


class GGMLTensor(ctypes.Structure):
    """struct ggml_tensor (ggml/include/ggml.h:685); checked against ggml_tensor_overhead() at load."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


@dataclass(frozen=True)
class _Ggml:
    lib: ctypes.CDLL
    mul_mat: int
    mul_mat_id: int


def _ggml() -> _Ggml:
    lib = library()
    lib.ggml_tensor_overhead.restype = ctypes.c_size_t
    if lib.ggml_tensor_overhead() - GGML_OBJECT_SIZE != ctypes.sizeof(GGMLTensor):
        raise GGMLUnavailable("this ggml's struct ggml_tensor has another layout; reinstall the pinned llama-cpp-python")
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    # enum ggml_op values by name, so a reordered enum cannot silently change what we collect.
    # Both come early in the enum (ggml.h:524); stop there, never index past GGML_OP_COUNT.
    ops: dict[bytes, int] = {}
    for i in range(256):
        ops[lib.ggml_op_name(i)] = i
        if b"MUL_MAT" in ops and b"MUL_MAT_ID" in ops:
            return _Ggml(lib, ops[b"MUL_MAT"], ops[b"MUL_MAT_ID"])
    raise GGMLUnavailable("this ggml has no MUL_MAT_ID op; reinstall the pinned llama-cpp-python")


def weight_name(raw: bytes) -> str:
    """filter_tensor_name (imatrix.cpp:80): CUDA0#blk.0.attn_k.weight#0 -> blk.0.attn_k.weight."""
    name = raw.decode("utf-8", errors="replace")
    if "#" in name:
        name = name.split("#", 2)[1]
    return name


class Collector:
    """The cb_eval callback: per weight, float32 sums of squares per column and token counts."""

    def __init__(self, process_output: bool = False) -> None:
        self.g = _ggml()
        self.process_output = process_output
        self.sums: dict[str, np.ndarray] = {}  # (n_mat, n_cols), merged chunks only
        self.counts: dict[str, np.ndarray] = {}  # (n_mat,)
        self._pending: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.stop = False  # set on Ctrl-C: the next node ends the graph
        self.error: BaseException | None = None
        import llama_cpp

        # kept alive as long as the context: llama.cpp holds only the C pointer
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)

    # -- called by llama.cpp for each graph node ------------------------------------------
    def _on_node(self, t_ptr: int, ask: bool, _user: int) -> bool:
        try:
            t = GGMLTensor.from_address(t_ptr)
            if ask:
                return self._wants(t)
            if self.stop:
                return False
            self._collect(t)
            return True
        except BaseException as exc:  # noqa: BLE001 (an exception must not cross into C)
            if isinstance(exc, KeyboardInterrupt):
                self.stop = True
            elif self.error is None:
                self.error = exc
            return False

    def _wants(self, t: GGMLTensor) -> bool:
        if t.op == self.g.mul_mat_id:
            return True
        if t.op != self.g.mul_mat:
            return False
        src0, src1 = GGMLTensor.from_address(t.src[0]), GGMLTensor.from_address(t.src[1])
        if src1.ne[1] < MIN_ROWS or src1.type != GGML_TYPE_F32:
            return False
        name = weight_name(src0.name)
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    def _activations(self, src1: GGMLTensor, ptr: int) -> np.ndarray:
        """src1 as a float32 array [ne3, ne2, ne1, ne0], copied off the device when needed."""
        lib = self.g.lib
        nbytes = lib.ggml_nbytes(ptr)
        if src1.buffer and not lib.ggml_backend_buffer_is_host(src1.buffer):
            host = np.empty(nbytes, dtype=np.uint8)
            lib.ggml_backend_tensor_get(ptr, host.ctypes.data, 0, nbytes)
            base = host
        else:
            base = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(src1.data))
        shape = tuple(int(src1.ne[i]) for i in reversed(range(GGML_MAX_DIMS)))
        strides = tuple(int(src1.nb[i]) for i in reversed(range(GGML_MAX_DIMS)))
        return np.ndarray(shape, dtype=np.float32, buffer=base, strides=strides)

    def _slot(self, name: str, n_mat: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
        if name not in self._pending:
            self._pending[name] = (np.zeros((n_mat, n_cols), np.float32), np.zeros(n_mat, np.int64))
        sums, counts = self._pending[name]
        known = self.sums.get(name)
        if sums.shape != (n_mat, n_cols) or (known is not None and known.shape != sums.shape):
            raise RuntimeFailure(f"inconsistent activation size for {name}; the model graph changed between chunks")
        return sums, counts

    def _collect(self, t: GGMLTensor) -> None:
        src0 = GGMLTensor.from_address(t.src[0])
        src1 = GGMLTensor.from_address(t.src[1])
        name = weight_name(src0.name)
        x = self._activations(src1, t.src[1])  # [ne3, ne2, ne1, ne0]
        sq = np.square(x, dtype=np.float32)
        if t.op == self.g.mul_mat_id:
            # ids [n_tokens, n_expert_used] (numpy order); src1 [n_tokens, n_used or 1, ne0] (:300-340)
            ids_t = GGMLTensor.from_address(t.src[2])
            ids = self._ids(ids_t, t.src[2])
            n_as = int(src0.ne[2])
            sums, counts = self._slot(name, n_as, int(src1.ne[0]))
            rows = sq[0]  # [n_tokens, ne1, ne0]
            for idx in range(ids.shape[1]):
                experts = ids[:, idx]
                if ((experts < 0) | (experts >= n_as)).any():
                    raise RuntimeFailure(f"expert id out of range in {name}")
                np.add.at(sums, experts, rows[:, idx % rows.shape[1], :])
                np.add.at(counts, experts, 1)
            return
        n2, n3 = int(src0.ne[2]), int(src0.ne[3])
        n_mat = n2 * n3
        sums, counts = self._slot(name, n_mat, int(src1.ne[0]))
        for i3 in range(sq.shape[0]):
            for i2 in range(sq.shape[1]):
                mat = (i3 % n3) * n2 + (i2 % n2)
                sums[mat] += sq[i3, i2].sum(axis=0, dtype=np.float32)
        counts += sq.shape[0] * sq.shape[1] * sq.shape[2] // n_mat  # ggml_nrows(src1) / n_mat

    def _ids(self, ids_t: GGMLTensor, ptr: int) -> np.ndarray:
        """The routing ids (I32, not contiguous) as [n_tokens, n_expert_used]."""
        nbytes = self.g.lib.ggml_nbytes(ptr)
        host = np.empty(nbytes, dtype=np.uint8)
        self.g.lib.ggml_backend_tensor_get(ptr, host.ctypes.data, 0, nbytes)
        return np.ndarray((int(ids_t.ne[1]), int(ids_t.ne[0])), dtype=np.int32, buffer=host,
                          strides=(int(ids_t.nb[1]), int(ids_t.nb[0])))

    # -- chunk bookkeeping -------------------------------------------------------------------
    def commit(self) -> None:
        """A chunk finished: add what it collected to the totals."""
        for name, (sums, counts) in self._pending.items():
            if name in self.sums:
                self.sums[name] += sums
                self.counts[name] += counts
            else:
                self.sums[name], self.counts[name] = sums, counts
        self._pending = {}

    def discard(self) -> None:
        self._pending = {}

    def check_finite(self) -> None:
        for name, sums in self.sums.items():
            if not np.isfinite(sums).all():  # imatrix.cpp:404 exits here too
                raise RuntimeFailure(f"non-finite activations in {name}; the model overflows on this text")


@dataclass(frozen=True)
class ChunkDone:
    index: int  # 1-based
    total: int
    tokens: int  # tokens decoded so far
    seconds: float


class _DeferredInterrupts:
    """While a model is loaded, SIGINT and SIGTERM only set a flag; `check()` raises KeyboardInterrupt.

    Why: llama.cpp calls back into Python (the log callback, our eval callback) from C, and
    Python runs a signal handler at the next bytecode, often inside such a callback, where
    ctypes prints and swallows the exception: the interrupt would be lost. A flag is not:
    it is raised once, at the next check, or when the handlers are restored.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, collector: Collector) -> None:
        self.collector, self.flagged, self.raised, self.previous = collector, False, False, {}
        try:
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            pass

    def _handler(self, signum, frame) -> None:  # noqa: ANN001
        self.flagged = self.collector.stop = True  # the graph stops at its next node

    def interrupt(self) -> None:
        self.raised = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.flagged and not self.raised:
            self.interrupt()

    def restore(self) -> None:
        """Put the previous handlers back; an interrupt that came since the last check is raised now."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
        self.check()


class ImatrixRun:
    """One model loaded with the collector attached; `run()` decodes the chunks. Ctrl-C or
    SIGTERM at any point raises KeyboardInterrupt at the next check (`close()` always)."""

    def __init__(self, model: Path, n_ctx: int = DEFAULT_CTX, threads: int | None = None,
                 n_gpu_layers: int = 0, process_output: bool = False, no_repack: bool = False) -> None:
        from alpaca_local.run import cpu_buffers
        from alpaca_local.run.chat import check_context, read_model_info, silence_llama_cpp

        info = read_model_info(model)
        check_context(n_ctx, info)
        silence_llama_cpp()
        # Placed as chat places it (an AMX build crashes otherwise), pre-flight included.
        self.placement = cpu_buffers.load_placement(info.header, no_repack, n_gpu_layers)
        cpu_buffers.preflight(model, info.header, self.placement, n_gpu_layers)
        self.n_ctx = n_ctx
        self.done = 0  # chunks merged so far
        self.collector = Collector(process_output)
        self._ctx = None
        self._interrupts = _DeferredInterrupts(self.collector)
        try:
            self._load(model, n_ctx, threads, n_gpu_layers)
            self._interrupts.check()
        except BaseException:
            self.close()
            raise

    def _load(self, model: Path, n_ctx: int, threads: int | None, n_gpu_layers: int) -> None:
        import llama_cpp

        from alpaca_local.run.cpu_buffers import apply

        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        keep = apply(mp, self.placement)  # noqa: F841  (the overrides must outlive the load)
        self._model = llama_cpp.llama_model_load_from_file(str(model).encode(), mp)
        if not self._model:
            raise InputError(f"llama.cpp could not load {model}; is it a complete, supported model?")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_seq_max = 1
        if threads:
            cp.n_threads = cp.n_threads_batch = threads
        cp.cb_eval = self.collector.callback
        cp.cb_eval_user_data = None
        self._ctx = llama_cpp.llama_init_from_model(self._model, cp)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise RuntimeFailure(f"llama.cpp could not create a context of {n_ctx} tokens for {model}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)

    def close(self) -> None:
        import llama_cpp

        if self._ctx:  # freeing logs through llama.cpp's callback: still under the flag handlers
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = None
        self._interrupts.restore()

    def tokenize(self, text: str) -> list[int]:
        """common_tokenize(ctx, text, add_special=true, parse_special=false)."""
        import llama_cpp

        raw = text.encode("utf-8")
        cap = len(raw) + 16
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), buf, cap, True, False)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), buf, cap, True, False)
        return list(buf[:n])

    def chunks(self, text: str, n_chunks: int | None = None) -> list[list[int]]:
        import llama_cpp

        from alpaca_local.measure.quality import make_chunks

        # llama-imatrix -f drops one trailing newline of the file (common/arg.cpp:1807)
        tokens = self.tokenize(text.removesuffix("\n"))
        self._interrupts.check()
        if len(tokens) < 2 * self.n_ctx:  # imatrix.cpp:818
            raise InputError(
                f"the calibration text is {len(tokens)} tokens; -c {self.n_ctx} needs at least {2 * self.n_ctx} "
                "(two chunks); give a longer --text or a smaller -c"
            )
        bos = int(llama_cpp.llama_vocab_bos(self._vocab)) if llama_cpp.llama_vocab_get_add_bos(self._vocab) else None
        chunks = make_chunks(tokens, self.n_ctx, bos)
        return chunks[:n_chunks] if n_chunks else chunks

    def _decode(self, chunk: list[int]) -> None:
        import llama_cpp

        b = self._batch
        for i, tok in enumerate(chunk):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, i, 1, True
            b.seq_id[i][0] = 0
        b.n_tokens = len(chunk)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        rc = llama_cpp.llama_decode(self._ctx, b)
        c = self.collector
        if c.stop:  # Ctrl-C / SIGTERM: the graph was cut short, this chunk is incomplete
            c.discard()
            self._interrupts.interrupt()
        if c.error is not None:
            raise c.error
        if rc != 0:
            raise RuntimeFailure(f"llama.cpp failed to evaluate a chunk (llama_decode returned {rc})")
        c.commit()

    def run(self, chunks: list[list[int]], progress: Callable[[ChunkDone], None] | None = None) -> int:
        """Decode every chunk; returns how many were merged (all of them unless interrupted)."""
        t0 = time.perf_counter()
        for i, chunk in enumerate(chunks):
            self._interrupts.check()
            self._decode(chunk)
            self.done = i + 1
            if progress:
                progress(ChunkDone(i + 1, len(chunks), (i + 1) * self.n_ctx, time.perf_counter() - t0))
        return self.done

    def result(self, datasets: list[str], partial: bool = False) -> Imatrix:
        c = self.collector
        c.check_finite()
        entries = {name: ImatrixEntry(c.sums[name].copy(), c.counts[name].copy()) for name in c.sums}
        max_count = max((int(v.max()) for v in c.counts.values()), default=0)
        return Imatrix(entries, list(datasets), chunk_count=max_count // self.n_ctx, chunk_size=self.n_ctx,
                       partial=partial)


def compute_imatrix(model: Path, text: str, dataset: str, n_ctx: int = DEFAULT_CTX, n_chunks: int | None = None,
                    threads: int | None = None, n_gpu_layers: int = 0,
                    progress: Callable[[ChunkDone], None] | None = None, no_repack: bool = False) -> Imatrix:
    """The whole run in one call (Ctrl-C propagates; use ImatrixRun to keep a partial result)."""
    run = ImatrixRun(model, n_ctx, threads, n_gpu_layers, no_repack=no_repack)
    try:
        run.run(run.chunks(text, n_chunks), progress)
        return run.result([dataset])
    finally:
        run.close()


def default_text() -> str:
    """The calibration text shipped with the package (alpaca_local/measure/data/calibration.txt)."""
    from importlib.resources import files

    return (files("alpaca_local.measure") / "data" / "calibration.txt").read_text(encoding="utf-8")


DEFAULT_DATASET = "alpaca-local:calibration.txt"

"""Importance-matrix files: read and write llama.cpp's GGUF format, read its legacy `.dat`.

In:  a file written by `llama-imatrix` (either format) or by `alpaca-local imatrix`.
Out: `Imatrix`: per weight name the raw sums of squared activations (one row per
     expert; dense weights have one) and their token counts, plus the dataset and
     chunk metadata; `Imatrix.importance()` gives the per-column weights exactly as
     llama-quantize hands them to ggml's quantizers.

GGUF layout (tools/imatrix/imatrix.cpp, IMatrixCollector::save_imatrix): metadata
`general.type` = "imatrix", `imatrix.datasets` (string array), `imatrix.chunk_count`
and `imatrix.chunk_size` (u32); per weight, in name order, two F32 tensors
`<weight>.in_sum2` (ne = [n_cols, n_mat]) and `<weight>.counts` (ne = [1, n_mat]).

Legacy `.dat` layout (common/imatrix-loader.cpp, common_imatrix_load_legacy), all
little-endian int32 / float32:
    n_entries | n_entries × (len | name | ncall | nval | nval × float)
    [ chunk count | len | dataset ]          (optional trailer)
where each value is already (sum / count) × ncall.

Both readers check every length against the bytes left before using it (the
header through `gguf_read`), and refuse non-finite or negative sums, names that
are not plain tensor names, and sums/counts that do not pair up: one `InputError`
line each, never a traceback.
"""

from __future__ import annotations

import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf.constants import GGMLQuantizationType

from alpaca_local.convert.gguf_read import GGUF_MAGIC, printable, read_gguf_header
from alpaca_local.errors import InputError

SUM_SUFFIX, COUNT_SUFFIX = ".in_sum2", ".counts"
KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"
# Ours, not llama.cpp's: set on a file saved after Ctrl-C (fewer chunks than asked for).
KEY_PARTIAL = "alpaca_local.imatrix.partial"

MAX_NAME = 512  # GGML_MAX_NAME is 64; tensor names from real models are far shorter
MAX_ENTRIES = 1 << 16
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass
class ImatrixEntry:
    sums: np.ndarray  # float32, (n_mat, n_cols): sum over tokens of x**2 per input column
    counts: np.ndarray  # int64, (n_mat,): tokens summed (legacy: ncall, sums pre-scaled)


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    partial: bool = False

    def importance(self) -> dict[str, np.ndarray]:
        """name -> float32 weights, flattened over experts: quantize.cpp's load_imatrix.

        GGUF: sums / count per expert, 1.0 where the count is 0 (an expert never routed to).
        Legacy: sums / ncall (the file stores (sum / count) × ncall); unchanged when ncall is 0.
        """
        out: dict[str, np.ndarray] = {}
        for name, e in self.entries.items():
            if self.legacy:
                ncall = int(e.counts[0]) if len(e.counts) else 0
                values = e.sums / np.float32(ncall) if ncall > 0 else e.sums.copy()
            else:
                counts = e.counts.astype(np.float32)[:, None]  # (float) entry.counts[j]
                safe = np.where(counts > 0, counts, np.float32(1))
                values = np.where(counts > 0, e.sums / safe, np.float32(1))
            out[name] = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        return out


def _check_name(path: Path, name: str) -> str:
    if not (0 < len(name) <= MAX_NAME and _NAME_RE.match(name)):
        raise InputError(f"{path}: imatrix entry name {printable(name)} is not a tensor name; the file is damaged")
    return name


def _check_values(path: Path, name: str, sums: np.ndarray) -> None:
    if not np.isfinite(sums).all():
        raise InputError(f"{path}: imatrix entry {name} contains NaN or infinity; recompute the imatrix")
    if (sums < 0).any():
        raise InputError(f"{path}: imatrix entry {name} has negative sums of squares; the file is damaged")


def read_imatrix(path: str | Path) -> Imatrix:
    """Read either format; which one is decided by the first four bytes, as llama.cpp does."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"imatrix file {path} not found") from None
    except OSError as exc:
        raise InputError(f"cannot read imatrix file {path}: {exc.strerror}") from exc
    if stat.S_ISDIR(mode):
        raise InputError(f"{path} is a folder; give an imatrix file (.gguf or .dat)")
    if not stat.S_ISREG(mode):
        raise InputError(f"{path} is not a regular file; give an imatrix file (.gguf or .dat)")
    with open(path, "rb") as f:
        magic = f.read(4)
    imatrix = _read_gguf(path) if magic == GGUF_MAGIC else _read_legacy(path)
    if not imatrix.entries:
        raise InputError(f"{path}: the imatrix has no entries; recompute it with `alpaca-local imatrix`")
    return imatrix


def _read_gguf(path: Path) -> Imatrix:
    header = read_gguf_header(path)
    kind = header.kv.get("general.type")
    if kind is not None and kind != "imatrix":
        raise InputError(f"{path} is a GGUF {printable(kind)} file, not an imatrix; give the file `imatrix` wrote")
    if not header.tensors:
        raise InputError(f"{path}: the imatrix has no entries; recompute it with `alpaca-local imatrix`")
    pairs: dict[str, dict[str, object]] = {}
    for t in header.tensors:
        for suffix in (SUM_SUFFIX, COUNT_SUFFIX):
            if t.name.endswith(suffix):
                base = _check_name(path, t.name[: -len(suffix)])
                pairs.setdefault(base, {})[suffix] = t
                break
        else:
            raise InputError(f"{path}: tensor {printable(t.name)} is neither a .in_sum2 nor a .counts entry; "
                             "not an imatrix file")
    entries: dict[str, ImatrixEntry] = {}
    with open(path, "rb") as f:
        for name in sorted(pairs):
            pair = pairs[name]
            if len(pair) != 2:
                raise InputError(f"{path}: imatrix entry {name} has sums without counts or counts without sums")
            raw = {}
            for suffix, t in pair.items():
                if t.ggml_type != GGMLQuantizationType.F32:
                    raise InputError(f"{path}: {name}{suffix} is {t.ggml_type.name}; imatrix data must be F32")
                f.seek(header.data_offset + t.offset)
                raw[suffix] = np.frombuffer(f.read(t.nbytes), dtype="<f4").astype(np.float32)
            sums, counts = raw[SUM_SUFFIX], raw[COUNT_SUFFIX]
            if len(counts) == 0 or len(sums) % len(counts):
                raise InputError(f"{path}: imatrix entry {name} has {len(sums)} sums for {len(counts)} counts")
            _check_values(path, name, sums)
            if not np.isfinite(counts).all() or (counts < 0).any() or (counts > 2.0**53).any():
                raise InputError(f"{path}: imatrix entry {name} has an invalid count; the file is damaged")
            # std::lround, as common_imatrix_load reads them
            rounded = np.floor(counts.astype(np.float64) + 0.5).astype(np.int64)
            entries[name] = ImatrixEntry(sums.reshape(len(counts), -1), rounded)
    datasets = header.kv.get(KEY_DATASETS, [])
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        raise InputError(f"{path}: {KEY_DATASETS} is not a list of strings")
    return Imatrix(
        entries, list(datasets),
        chunk_count=_u32(path, header.kv, KEY_CHUNK_COUNT), chunk_size=_u32(path, header.kv, KEY_CHUNK_SIZE),
        partial=bool(header.kv.get(KEY_PARTIAL, False)),
    )


def _u32(path: Path, kv: dict, key: str) -> int:
    value = kv.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 32:
        raise InputError(f"{path}: metadata {key} = {printable(value)} is not a count")
    return value


class _Legacy:
    """Bounds-checked int32/float32 reads over the whole (small) legacy file."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.left():
            raise InputError(f"{self.path}: imatrix file is truncated ({what} needs {n} bytes, {self.left()} left)")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]


def _read_legacy(path: Path) -> Imatrix:
    cur = _Legacy(path.read_bytes(), path)
    if cur.left() < 4:
        raise InputError(f"{path} is not an imatrix file (too short for either format)")
    n_entries = cur.i32("entry count")
    # An entry needs at least 16 bytes (len, 1-byte name, ncall, nval, one float).
    if not 0 < n_entries <= MAX_ENTRIES or n_entries * 17 > cur.left():
        raise InputError(f"{path} is not an imatrix file (neither GGUF nor a legacy .dat with {n_entries} entries)")
    entries: dict[str, ImatrixEntry] = {}
    for i in range(n_entries):
        length = cur.i32(f"entry {i} name length")
        if not 0 < length <= MAX_NAME:
            raise InputError(f"{path}: imatrix entry {i} has a name of {length} bytes; the file is damaged")
        name = _check_name(path, cur.take(length, f"entry {i} name").decode("utf-8", errors="replace"))
        ncall, nval = cur.i32(f"{name} ncall"), cur.i32(f"{name} value count")
        if ncall < 0 or nval < 1 or nval * 4 > cur.left():
            raise InputError(f"{path}: imatrix entry {name} claims {nval} values, {cur.left()} bytes left (truncated?)")
        if name in entries:
            raise InputError(f"{path}: imatrix entry {name} appears twice")
        sums = np.frombuffer(cur.take(nval * 4, f"{name} values"), dtype="<f4").astype(np.float32)
        _check_values(path, name, sums)
        entries[name] = ImatrixEntry(sums.reshape(1, -1), np.array([ncall], dtype=np.int64))
    chunk_count, datasets = 0, []
    if cur.left():  # the trailer is optional; when present it must be whole
        chunk_count = cur.i32("chunk count")
        length = cur.i32("dataset name length")
        if length < 0:
            raise InputError(f"{path}: dataset name length {length} is negative; the file is damaged")
        if length:
            datasets.append(cur.take(length, "dataset name").decode("utf-8", errors="replace"))
        if cur.left():
            raise InputError(f"{path}: {cur.left()} unexpected bytes after the imatrix data; the file is damaged")
    return Imatrix(entries, datasets, chunk_count=max(chunk_count, 0), legacy=True)


def write_imatrix(imatrix: Imatrix, path: Path) -> None:
    """Write llama.cpp's GGUF imatrix format (what save_imatrix writes) to `path`.

    The caller makes the write atomic; tensors go in name order, sums before counts.
    """
    import gguf

    w = gguf.GGUFWriter(path, arch="")
    # GGUFWriter always adds general.architecture; an imatrix file has none.
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    w.add_type(gguf.GGUFType.IMATRIX)
    w.add_array(KEY_DATASETS, list(imatrix.datasets))
    w.add_uint32(KEY_CHUNK_COUNT, imatrix.chunk_count)
    w.add_uint32(KEY_CHUNK_SIZE, imatrix.chunk_size)
    if imatrix.partial:
        w.add_bool(KEY_PARTIAL, True)
    for name in sorted(imatrix.entries):
        e = imatrix.entries[name]
        sums, counts = np.ascontiguousarray(e.sums, dtype=np.float32), e.counts.astype(np.float32).reshape(-1, 1)
        if len(counts) == 1:  # ggml writes ggml_n_dims: a trailing ne of 1 is dropped
            sums, counts = sums.reshape(-1), counts.reshape(-1)
        w.add_tensor(name + SUM_SUFFIX, sums)
        w.add_tensor(name + COUNT_SUFFIX, counts)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check_against_model(imatrix: Imatrix, path: Path, row_lengths: dict[str, int]) -> None:
    """Every entry must name a weight of the model being written, with one value per input column.

    llama-quantize silently skips unknown names and aborts on a wrong length; an
    imatrix that names other tensors was computed for another model, so we refuse both.
    """
    for name, e in imatrix.entries.items():
        if name not in row_lengths:
            raise InputError(
                f"{path}: imatrix entry {name} is not a tensor of this model; "
                "the imatrix was computed for a different model"
            )
        n = e.sums.size
        if n != row_lengths[name]:
            raise InputError(
                f"{path}: imatrix entry {name} has {n} values but the tensor has {row_lengths[name]} columns; "
                "the imatrix was computed for a different model"
            )


def quantize_kv(path: Path, imatrix: Imatrix) -> tuple[tuple[str, str | int], ...]:
    """The keys tools/quantize/quantize.cpp adds (as kv_overrides) to a file quantized with `path`:
    its name and first dataset (cut to 127 bytes: val_str[128]), the entry and chunk counts."""

    def cut(text: str) -> str:
        return text.encode()[:127].decode("utf-8", errors="ignore")

    kv: list[tuple[str, str | int]] = [("quantize.imatrix.file", cut(str(path)))]
    if imatrix.datasets:
        kv.append(("quantize.imatrix.dataset", cut(imatrix.datasets[0])))
    kv.append(("quantize.imatrix.entries_count", len(imatrix.entries)))
    if imatrix.chunk_count > 0:  # quantize.cpp:526: only when m_last_call > 0
        kv.append(("quantize.imatrix.chunks_count", imatrix.chunk_count))
    return tuple(kv)

"""A tensor in a source file, located but not loaded.

Every reader (safetensors, pytorch zip) turns a checkpoint into `TensorRef`s:
a contiguous little-endian byte range in a file. Loading maps just that range,
so peak memory follows the tensor being converted, not the model. The file is
local unless `file` is given: any object with `read_at(offset, nbytes)`, such
as a Hub file read with HTTP range requests (`source.remote.RemoteFile`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from alpaca_local.errors import InputError

# Source dtypes we read, with their item size. BF16 has no numpy dtype: it is
# read as uint16 and widened to float32 by a shift (exact).
DTYPE_ITEMSIZE: dict[str, int] = {"F32": 4, "F16": 2, "BF16": 2}
_NUMPY_DTYPE = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


class RangeReader(Protocol):
    """Bytes of a file that is not on this disk: `read_at` in increasing offsets (the stream the
    converter reads once), `fetch` anywhere (one range request: the rows a size target samples)."""

    def read_at(self, offset: int, nbytes: int) -> bytes: ...

    def fetch(self, offset: int, nbytes: int) -> bytes: ...


@dataclass(frozen=True)
class TensorRef:
    name: str
    dtype: str  # one of DTYPE_ITEMSIZE
    shape: tuple[int, ...]  # numpy order: the last dimension is contiguous
    path: Path
    offset: int  # absolute byte offset of the first element in `path`
    file: RangeReader | None = None  # None: `path` is a local file


    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.n_elements * DTYPE_ITEMSIZE[self.dtype]

    def raw(self) -> np.ndarray:
        """The stored values, memory-mapped (F32/F16 as floats, BF16 as uint16)."""
        if self.n_elements == 0:
            return np.zeros(self.shape, dtype=_NUMPY_DTYPE[self.dtype])
        if self.file is not None:
            return self.read_raw_rows(0, self.n_rows).reshape(self.shape)
        return np.memmap(
            self.path, dtype=_NUMPY_DTYPE[self.dtype], mode="r", offset=self.offset, shape=self.shape
        )

    @property
    def n_rows(self) -> int:
        """Rows in ggml's sense: everything but the last (contiguous) dimension."""
        return math.prod(self.shape[:-1]) if self.shape else 1

    def read_raw_rows(self, start: int, stop: int, anywhere: bool = False) -> np.ndarray:
        """Rows [start, stop) as stored (BF16 as uint16 bits), shape (stop - start, row length).

        A plain read, not a memory map: mapped pages would count towards our
        resident memory for as long as the map lives. `anywhere`: a remote file is
        read by its own range request, outside the in-order stream (`RangeReader.fetch`).
        """
        row_len = self.shape[-1] if self.shape else 1
        dtype = _NUMPY_DTYPE[self.dtype]
        count = (stop - start) * row_len
        offset = self.offset + start * row_len * dtype.itemsize
        if self.file is not None:
            read = self.file.fetch if anywhere else self.file.read_at
            data = np.frombuffer(read(offset, count * dtype.itemsize), dtype=dtype)
        else:
            data = np.fromfile(self.path, dtype=dtype, count=count, offset=offset)
        if data.size != count:
            raise InputError(f"{self.path} ended early while reading {self.name}; the file is truncated, re-download it")
        return data.reshape(stop - start, row_len)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32, shape (stop - start, row length)."""
        return widen(self.read_raw_rows(start, stop), self.dtype)

    def to_f32(self) -> np.ndarray:
        """The values as float32 (exact for every source dtype)."""
        return widen(self.raw(), self.dtype)


def widen(data: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32)

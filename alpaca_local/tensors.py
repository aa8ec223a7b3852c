"""A tensor in a source file, located but not loaded.

Every reader (safetensors, pytorch zip) turns a checkpoint into `TensorRef`s:
a contiguous little-endian byte range in a file. Loading maps just that range,
so peak memory follows the tensor being converted, not the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Source dtypes we read, with their item size. BF16 has no numpy dtype: it is
# read as uint16 and widened to float32 by a shift (exact).
DTYPE_ITEMSIZE: dict[str, int] = {"F32": 4, "F16": 2, "BF16": 2}
_NUMPY_DTYPE = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


@dataclass(frozen=True)
class TensorRef:
    name: str
    dtype: str  # one of DTYPE_ITEMSIZE
    shape: tuple[int, ...]  # numpy order: the last dimension is contiguous
    path: Path
    offset: int  # absolute byte offset of the first element in `path`

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
        return np.memmap(
            self.path, dtype=_NUMPY_DTYPE[self.dtype], mode="r", offset=self.offset, shape=self.shape
        )

    def to_f32(self) -> np.ndarray:
        """The values as float32 (exact for every source dtype)."""
        data = self.raw()
        if self.dtype == "BF16":
            return (data.astype(np.uint32) << 16).view(np.float32)
        return data.astype(np.float32)

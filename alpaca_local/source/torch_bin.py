"""Read PyTorch `pytorch_model.bin` checkpoints without torch and without running them.

In: a file written by `torch.save(state_dict, path)` (the zip format, torch >= 1.6),
or a `pytorch_model.bin.index.json` naming shards. Out: `{name: TensorRef}` in
state-dict order, each a byte range of the .bin file, so nothing is loaded yet.

Layout of the zip (torch/serialization.py `_save`, caffe2/serialize/inline_container.cc):

    <archive>/data.pkl        the state dict, pickled with protocol 2. Each tensor is
                              REDUCE(torch._utils._rebuild_tensor_v2,
                                     (storage, storage_offset, size, stride,
                                      requires_grad, backward_hooks[, metadata]))
                              and each storage a persistent id
                              ('storage', torch.FloatStorage, key, location, numel).
    <archive>/data/<key>      the storage's raw bytes: ZIP_STORED, start aligned to 64.
    <archive>/byteorder       "little" or "big" (absent in old files: little).
    <archive>/version, .format_version, .storage_alignment, .data/serialization_id:
                              bookkeeping we do not need.

<archive> is the file's stem when torch wrote it ("pytorch_model"), or "archive".

Safety: a pickle reaches a callable only through `Unpickler.find_class`. Ours
answers from a table of harmless local stand-ins and refuses every other name
before anything runs, so a malicious checkpoint cannot execute code here.
We do not use `safetensors`/`torch` for this: torch is a 700 MB dependency, and
its `weights_only` loader still lives inside torch.
"""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alpaca_local.errors import InputError, UnsupportedError
from alpaca_local.source.tensors import DTYPE_ITEMSIZE, TensorRef

_CONVERT_HINT = "convert it to safetensors with a trusted tool"

# torch's legacy storage classes, as pickled in persistent ids, and the dtype
# each holds (torch/storage.py `_get_dtype_from_pickle_storage_type`). Only the
# first three are read; the rest are recognised so the error can name the dtype.
_STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
_TORCH_TO_REF_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}

# Zip local file header (APPNOTE.TXT 4.3.7): signature, version, flags, method,
# time, date, crc32, compressed size, size, name length, extra length.
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_LOCAL_HEADER_SIG = 0x04034B50
_PICKLE_PROTO = 0x80  # first byte of a protocol >= 2 pickle: the legacy torch format


# --- stand-ins that the unpickler hands out instead of torch objects -----------


@dataclass(frozen=True, slots=True)
class _StorageType:
    """Stands in for torch.FloatStorage & co: a name and the dtype it holds."""

    name: str
    dtype: str


@dataclass(frozen=True, slots=True)
class _Storage:
    """A persistent id, checked: which `data/<key>` record and how many elements."""

    type: _StorageType
    key: str
    numel: int


@dataclass(frozen=True, slots=True)
class _Tensor:
    """What `_rebuild_tensor_v2` would have built, as plain numbers."""

    storage: _Storage
    offset: int  # in elements of the storage's dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    metadata: Any


def _is_int(value: Any) -> bool:
    return type(value) is int


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _Tensor:
    # Mirrors torch._utils._rebuild_tensor_v2's signature; only records and checks.
    if not isinstance(storage, _Storage):
        raise _Corrupt("a tensor without a storage")
    if not _is_int(storage_offset) or storage_offset < 0:
        raise _Corrupt(f"a tensor with storage offset {storage_offset!r}")
    for what, dims in (("size", size), ("stride", stride)):
        if type(dims) is not tuple or not all(_is_int(d) and d >= 0 for d in dims):
            raise _Corrupt(f"a tensor with {what} {dims!r}")
    if len(size) != len(stride):
        raise _Corrupt(f"a tensor with size {size} but stride {stride}")
    return _Tensor(storage, storage_offset, size, stride, metadata)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> _Tensor:
    # nn.Parameter (a state dict saved with keep_vars=True): the tensor inside.
    if not isinstance(data, _Tensor):
        raise _Corrupt("a parameter that wraps no tensor")
    return data


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any, backward_hooks: Any, state: Any
) -> _Tensor:
    return _rebuild_parameter(data, requires_grad, backward_hooks)


# The only globals a checkpoint may name. Everything here is inert: functions
# that record numbers, a dict class, and non-callable storage-type markers.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _Corrupt(Exception):
    """data.pkl is well-formed pickle but not a sane state dict; wrapped below."""


# Opcodes torch.save never writes and we refuse before unpickling: protocol-5
# buffers (BYTEARRAY8 makes CPython allocate its declared length before reading
# it) and the copyreg extension registry.
_REFUSED_OPCODES = {"BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER", "EXT1", "EXT2", "EXT4"}


def _check_opcodes(data: bytes) -> None:
    for opcode, _, _ in pickletools.genops(data):  # parses only; runs nothing
        if opcode.name in _REFUSED_OPCODES:
            raise _Corrupt(f"pickle opcode {opcode.name}, which torch.save never writes")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        # Called for GLOBAL, STACK_GLOBAL, INST and EXT opcodes, before the
        # object is used: refusing here means nothing outside _ALLOWED runs.
        found = _ALLOWED.get((module, name))
        if found is None:
            raise InputError(
                f"refusing to load {self._path}: the pickle asks for {module}.{name}, "
                "which is not a tensor; only plain tensor checkpoints are read "
                f"({_CONVERT_HINT})"
            )
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        if (
            type(pid) is not tuple
            or len(pid) != 5
            or pid[0] != "storage"
            or not isinstance(pid[1], _StorageType)
            or type(pid[2]) is not str
            or type(pid[3]) is not str
            or not _is_int(pid[4])
            or pid[4] < 0
        ):
            raise _Corrupt(f"an unexpected persistent id {pid!r:.100}")
        return _Storage(pid[1], pid[2], pid[4])


# --- the zip container --------------------------------------------------------


def _archive_prefix(zf: zipfile.ZipFile, path: Path) -> str:
    pickles = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise InputError(
            f"{path} is a zip file but not a torch.save checkpoint "
            f"(expected one <archive>/data.pkl, found {len(pickles)}); {_CONVERT_HINT}"
        )
    return pickles[0][: -len("data.pkl")]


def _stored_range(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, file_size: int) -> int:
    """Absolute offset of a member's bytes, checked to be uncompressed and in the file."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise InputError(
            f"{path}: record {info.filename} is compressed (zip method {info.compress_type}); "
            "torch.save writes records uncompressed, so the file was repacked — "
            f"resave it with torch.save or {_CONVERT_HINT}"
        )
    fp = zf.fp
    assert fp is not None
    fp.seek(info.header_offset)
    header = fp.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size:
        raise InputError(f"{path} is truncated: record {info.filename} is cut off; re-download it")
    sig, _, flags, method, _, _, _, _, _, name_len, extra_len = _LOCAL_HEADER.unpack(header)
    if sig != _LOCAL_HEADER_SIG or method != zipfile.ZIP_STORED or flags & 0x1:
        raise InputError(
            f"{path} is corrupt: the local header of record {info.filename} does not match "
            "the zip directory; re-download it"
        )
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if info.compress_size != info.file_size or start + info.file_size > file_size:
        raise InputError(
            f"{path} is truncated: record {info.filename} runs past the end of the file; "
            "re-download it"
        )
    return start


def _check_byteorder(zf: zipfile.ZipFile, prefix: str, path: Path) -> None:
    try:
        order = zf.read(prefix + "byteorder").strip()
    except KeyError:
        return  # written before torch 1.12: little-endian in practice
    if order != b"little":
        raise UnsupportedError(
            f"{path} was saved on a {order.decode(errors='replace')}-endian machine; "
            f"only little-endian checkpoints are read ({_CONVERT_HINT})"
        )


def _is_c_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    # torch's rule (c10/core/Contiguity.h): dimensions of size 1 may have any
    # stride, and an empty tensor is always contiguous.
    if 0 in shape:
        return True
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride)):
        if size != 1:
            if step != expected:
                return False
            expected *= size
    return True


def _to_ref(
    name: str, tensor: _Tensor, path: Path, storage_start: int, storage_bytes: int
) -> TensorRef:
    torch_dtype = tensor.storage.type.dtype
    dtype = _TORCH_TO_REF_DTYPE.get(torch_dtype)
    if dtype is None:
        raise UnsupportedError(
            f"{path}: tensor {name!r} is {torch_dtype}; only float32, float16 and "
            "bfloat16 tensors are read"
        )
    if tensor.metadata:
        raise UnsupportedError(
            f"{path}: tensor {name!r} carries torch metadata {tensor.metadata!r:.80}; "
            f"only plain tensors are read ({_CONVERT_HINT})"
        )
    if not _is_c_contiguous(tensor.shape, tensor.stride):
        raise InputError(
            f"{path}: tensor {name!r} is not contiguous (shape {list(tensor.shape)}, "
            f"stride {list(tensor.stride)}); save it with .contiguous() or {_CONVERT_HINT}"
        )
    itemsize = DTYPE_ITEMSIZE[dtype]
    n_elements = 1
    for size in tensor.shape:
        n_elements *= size
    end = tensor.offset + n_elements
    if n_elements and (end > tensor.storage.numel or tensor.storage.numel * itemsize > storage_bytes):
        raise InputError(
            f"{path} is corrupt: tensor {name!r} (elements {tensor.offset}..{end}) lies outside "
            f"its storage record data/{tensor.storage.key} ({storage_bytes} bytes); re-download it"
        )
    return TensorRef(
        name=name,
        dtype=dtype,
        shape=tensor.shape,
        path=path,
        offset=storage_start + tensor.offset * itemsize,
    )


def _read_zip(zf: zipfile.ZipFile, path: Path, file_size: int) -> dict[str, TensorRef]:
    prefix = _archive_prefix(zf, path)
    _check_byteorder(zf, prefix, path)
    try:
        data_pkl = zf.read(prefix + "data.pkl")
        _check_opcodes(data_pkl)
        state = _RestrictedUnpickler(data_pkl, path).load()
    except (InputError, zipfile.BadZipFile):
        raise
    except _Corrupt as exc:
        raise InputError(f"{path} is corrupt: data.pkl holds {exc}; re-download it") from exc
    except Exception as exc:  # only our stand-ins ran, so any failure means bad bytes
        raise InputError(
            f"{path} is corrupt: data.pkl cannot be read ({type(exc).__name__}: {exc}); "
            "re-download it"
        ) from exc
    if type(state) not in (dict, collections.OrderedDict):
        raise InputError(
            f"{path} holds a {type(state).__name__}, not a state dict of tensors; "
            f"save model.state_dict() or {_CONVERT_HINT}"
        )

    storages: dict[str, tuple[int, int]] = {}  # key -> (absolute start, bytes)
    refs: dict[str, TensorRef] = {}
    for name, tensor in state.items():
        if type(name) is not str or not isinstance(tensor, _Tensor):
            raise InputError(
                f"{path}: entry {name!r:.80} is a {type(tensor).__name__}, not a tensor; "
                f"only flat state dicts are read (save model.state_dict() or {_CONVERT_HINT})"
            )
        key = tensor.storage.key
        if key not in storages:
            record = f"{prefix}data/{key}"
            try:
                info = zf.getinfo(record)
            except KeyError:
                raise InputError(
                    f"{path} is incomplete: storage record {record} of tensor {name!r} is "
                    "missing; re-download or resave it"
                ) from None
            storages[key] = (_stored_range(zf, info, path, file_size), info.file_size)
        refs[name] = _to_ref(name, tensor, path, *storages[key])
    return refs


def read_torch_bin(path: Path) -> dict[str, TensorRef]:
    """Index the tensors of a torch.save zip checkpoint, in state-dict order.

    Raises InputError for legacy, corrupt, truncated or malicious files and
    UnsupportedError for dtypes other than float32/float16/bfloat16.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            magic = f.read(4)
            file_size = f.seek(0, io.SEEK_END)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if magic[:1] == bytes([_PICKLE_PROTO]):
        raise InputError(
            f"{path} is in torch's legacy (pre-1.6) pickle format, which is not read; "
            f"resave it with torch>=1.6 (torch.save) or {_CONVERT_HINT}"
        )
    if magic != b"PK\x03\x04":
        raise InputError(f"{path} is not a PyTorch zip checkpoint; {_CONVERT_HINT}")
    try:
        with zipfile.ZipFile(path) as zf:
            return _read_zip(zf, path, file_size)
    except (
        zipfile.BadZipFile,  # also a CRC mismatch
        zipfile.LargeZipFile,
        EOFError,
        struct.error,
        zlib.error,
        NotImplementedError,  # an unknown compression method or zip feature
        ValueError,  # a mangled record name, an offset past any file size
        OverflowError,
        RuntimeError,  # an encrypted record
    ) as exc:
        raise InputError(
            f"{path} is truncated or corrupt ({exc}); re-download it"
        ) from exc
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc

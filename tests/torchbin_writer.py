"""Write torch.save-format checkpoints without torch, for tests.

`write_torch_bin` produces the bytes torch 2.x `torch.save(state_dict, path)`
writes, record for record (checked byte-for-byte against torch 2.13):

    zip, every record ZIP_STORED, version 0, flags 0x0808 (data descriptor, UTF-8;
    0x0800 and no descriptor for an empty record),
    time/date 0; the local header's extra field is "FB" + len + "Z"*pad so
    that the record's bytes start at a multiple of 64
    (caffe2/serialize/inline_container.cc `getPadding`); sizes and CRC follow
    the data in a PK\\x07\\x08 descriptor; central directory; zip64 end record
    and locator; end record.

    records: <archive>/data.pkl, .format_version ("1"), .storage_alignment ("64"),
    byteorder ("little"), data/<key> for each storage in first-use order,
    version ("3\\n"), .data/serialization_id.

data.pkl is made by Python's pickler (protocol 2), like torch's: tensors reduce
to torch._utils._rebuild_tensor_v2 and storages become persistent ids. The
globals torch names are emitted as GLOBAL opcodes from stand-in markers, so
torch need not be importable. `write_malicious_bin` puts hostile pickles in an
otherwise valid zip.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ALIGNMENT = 64
DEFAULT_SERIALIZATION_ID = "1234567890123456789012345678901234567890"

# numpy dtype -> torch storage class name; uint16 means bfloat16 only when asked.
_STORAGE_CLASS = {
    np.dtype("<f4"): "FloatStorage",
    np.dtype("<f2"): "HalfStorage",
    np.dtype("<f8"): "DoubleStorage",
    np.dtype("<i8"): "LongStorage",
    np.dtype("<i4"): "IntStorage",
    np.dtype("u1"): "ByteStorage",
}


class Global:
    """A marker pickled as GLOBAL '<module> <name>' (no import needed)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> Any:  # pickle's save_reduce wants a callable
        raise TypeError("a pickling marker, not a function")


REBUILD_TENSOR_V2 = Global("torch._utils", "_rebuild_tensor_v2")
REBUILD_PARAMETER = Global("torch._utils", "_rebuild_parameter")
_STORAGE_GLOBALS: dict[str, Global] = {}


def _storage_global(name: str) -> Global:
    # One marker per class, so repeats are memo hits (BINGET) as in torch's pickle.
    return _STORAGE_GLOBALS.setdefault(name, Global("torch", name))


@dataclass(eq=False)
class Storage:
    """One storage: a 1-D array whose bytes become `data/<key>`."""

    data: np.ndarray
    bf16: bool = False
    key: str | None = None  # assigned in first-use order while pickling

    @property
    def class_name(self) -> str:
        if self.bf16:
            assert self.data.dtype == np.uint16, "bf16 storages hold raw uint16 bits"
            return "BFloat16Storage"
        return _STORAGE_CLASS[self.data.dtype.newbyteorder("<")]


@dataclass(eq=False)
class View:
    """A tensor over (part of) a storage, as torch describes it."""

    storage: Storage
    offset: int  # elements
    shape: tuple[int, ...]
    stride: tuple[int, ...] | None = None  # None: C order
    parameter: bool = False  # pickle as nn.Parameter (state_dict(keep_vars=True))

    def __reduce_ex__(self, protocol: int) -> tuple:
        # Fresh tuples, as torch builds `tuple(self.size())` and `self.stride()`
        # each time: a shared tuple object would become a BINGET instead.
        shape = tuple(int(d) for d in self.shape)
        stride = self.stride if self.stride is not None else _c_strides(self.shape)
        args = (self.storage, self.offset, shape, tuple(int(s) for s in stride), False,
                collections.OrderedDict())
        if self.parameter:
            return (REBUILD_PARAMETER, (_Rebuilt(args), False, collections.OrderedDict()))
        return (REBUILD_TENSOR_V2, args)


class _Rebuilt:
    def __init__(self, args: tuple) -> None:
        self.args = args

    def __reduce_ex__(self, protocol: int) -> tuple:
        return (REBUILD_TENSOR_V2, self.args)


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler: overridable dispatch
    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=2)
        self.storages: list[Storage] = []

    def save_marker(self, obj: Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[Global] = save_marker

    def persistent_id(self, obj: Any) -> tuple | None:
        # torch/serialization.py `_save.persistent_id`
        if not isinstance(obj, Storage):
            return None
        if obj.key is None:
            obj.key = str(len(self.storages))
            self.storages.append(obj)
        return ("storage", _storage_global(obj.class_name), obj.key, "cpu", obj.data.size)


def _as_tensor(value: Any, bf16: bool) -> View:
    if isinstance(value, View):
        return value
    array = np.asarray(value)  # not ascontiguousarray: it turns a 0-d array into 1-d
    if not array.flags.c_contiguous:
        array = array.copy(order="C")
    return View(Storage(array.reshape(-1), bf16=bf16), 0, array.shape)


def pickle_state_dict(tensors: Mapping[str, Any], bf16_names: tuple[str, ...] = ()) -> tuple[bytes, list[Storage]]:
    """data.pkl for `tensors` (arrays or Views), and its storages in key order.

    The container keeps its type: a dict pickles as EMPTY_DICT, an OrderedDict
    as REDUCE(collections.OrderedDict, ()), as torch does.
    """
    state = type(tensors)() if isinstance(tensors, collections.OrderedDict) else {}
    for name, value in tensors.items():
        state[name] = _as_tensor(value, name in bf16_names)
    for view in state.values():
        view.storage.key = None
    buf = io.BytesIO()
    pickler = _TorchPickler(buf)
    pickler.dump(state)
    return buf.getvalue(), pickler.storages


def _padding(cursor: int, name: bytes) -> bytes:
    # inline_container.cc getPadding: the data of a record starts at a multiple
    # of 64; the gap is an extra field "FB" + u16 length + "Z"s (4 bytes minimum).
    start = cursor + 30 + len(name) + 4
    pad = -start % ALIGNMENT
    return b"FB" + struct.pack("<H", pad) + b"Z" * pad


def build_zip(records: list[tuple[str, bytes]]) -> bytes:
    """A zip laid out exactly as torch's PyTorchStreamWriter (miniz) lays it out."""
    out = bytearray()
    central = bytearray()
    for name, data in records:
        raw_name = name.encode()
        offset = len(out)
        crc = zlib.crc32(data)
        extra = _padding(offset, raw_name)
        # miniz writes an empty record without a data descriptor (flag bit 3 clear).
        flags = 0x0808 if data else 0x0800
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, flags, 0, 0, 0, 0, 0, 0,
                           len(raw_name), len(extra))
        out += raw_name + extra + data
        if data:
            out += struct.pack("<IIII", 0x08074B50, crc, len(data), len(data))
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0, flags, 0, 0, 0,
                               crc, len(data), len(data), len(raw_name), 0, 0, 0, 0, 0, offset)
        central += raw_name
    cd_offset, cd_size, count = len(out), len(central), len(records)
    out += central
    zip64_end = len(out)
    out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 45, 0, 0, count, count,
                       cd_size, cd_offset)
    out += struct.pack("<IIQI", 0x07064B50, 0, zip64_end, 1)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, cd_size, cd_offset, 0)
    return bytes(out)


def archive_name(path: Path) -> str:
    # PyTorchStreamWriter: the file's base name up to its last dot.
    base = Path(path).name
    return base.rsplit(".", 1)[0] if "." in base else base


def torch_records(
    data_pkl: bytes,
    storages: list[Storage],
    archive: str,
    serialization_id: str = DEFAULT_SERIALIZATION_ID,
) -> list[tuple[str, bytes]]:
    """The records of a torch 2.x checkpoint, in the order torch writes them."""
    records = [
        ("data.pkl", data_pkl),
        (".format_version", b"1"),
        (".storage_alignment", str(ALIGNMENT).encode()),
        ("byteorder", b"little"),
    ]
    records += [(f"data/{s.key}", s.data.astype(s.data.dtype.newbyteorder("<")).tobytes())
                for s in storages]
    records += [("version", b"3\n"), (".data/serialization_id", serialization_id.encode())]
    return [(f"{archive}/{name}", data) for name, data in records]


def write_torch_bin(
    path: Path,
    tensors: Mapping[str, Any],
    bf16_names: tuple[str, ...] = (),
    serialization_id: str = DEFAULT_SERIALIZATION_ID,
) -> Path:
    """Write `tensors` (name -> np.ndarray or View) as torch.save would.

    Arrays in `bf16_names` must be uint16 bit patterns and are stored as bfloat16.
    """
    data_pkl, storages = pickle_state_dict(tensors, bf16_names)
    records = torch_records(data_pkl, storages, archive_name(path), serialization_id)
    Path(path).write_bytes(build_zip(records))
    return Path(path)


# --- hostile files -------------------------------------------------------------


class _Call:
    """Pickles as REDUCE(GLOBAL module.name, args): what an attacker would emit."""

    def __init__(self, module: str, name: str, *args: Any) -> None:
        self.func, self.args = Global(module, name), args

    def __call__(self, *args: Any) -> Any:  # usable as the callee of another call
        raise TypeError("a pickling marker, not a function")

    def __reduce_ex__(self, protocol: int) -> tuple:
        return (self.func, self.args)


def malicious_pickle(kind: str, marker: Path) -> bytes:
    """A data.pkl that, if unpickled naively, creates `marker`.

    kinds: "os.system", "posix.system", "builtins.eval", "builtins.exec",
    "subprocess", "import" (builtins.__import__ then getattr on the module),
    "nested" (the call hidden inside an otherwise valid tensor's arguments),
    "stack_global" (protocol 4: the name comes from STACK_GLOBAL).
    """
    touch = f"touch {marker}"
    py = f"open({str(marker)!r}, 'w').close()"
    payloads = {
        "os.system": _Call("os", "system", touch),
        "posix.system": _Call("posix", "system", touch),
        "builtins.eval": _Call("builtins", "eval", py),
        "builtins.exec": _Call("builtins", "exec", py),
        "subprocess": _Call("subprocess", "check_call", ["touch", str(marker)]),
        "import": _Call("builtins", "getattr", _Call("builtins", "__import__", "os"), "system"),
    }
    if kind == "stack_global":
        # Protocol 4 names globals with STACK_GLOBAL; the real os.system pickles
        # by reference (as posix.system), it is not called here.
        import os

        return pickle.dumps({"w": _CallObj(os.system, touch)}, protocol=4)
    if kind == "nested":
        good = View(Storage(np.zeros(2, np.float32)), 0, (2,))
        evil = _Rebuilt((good.storage, 0, (2,), (1,), False, _Call("os", "system", touch)))
        state: Any = {"good": good, "evil": evil}
    elif kind == "import":
        # getattr(__import__('os'), 'system')(touch)
        state = {"w": _CallObj(payloads["import"], touch)}
    else:
        state = {"w": payloads[kind]}
    buf = io.BytesIO()
    _TorchPickler(buf).dump(state)
    return buf.getvalue()


class _CallObj:
    """REDUCE(<object built by another call>, args)."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce_ex__(self, protocol: int) -> tuple:
        return (self.func, self.args)


def write_malicious_bin(path: Path, kind: str, marker: Path) -> Path:
    """A valid torch zip (one real storage record) whose data.pkl is hostile."""
    storage = Storage(np.zeros(2, np.float32), key="0")
    records = torch_records(malicious_pickle(kind, marker), [storage], archive_name(path))
    Path(path).write_bytes(build_zip(records))
    return Path(path)

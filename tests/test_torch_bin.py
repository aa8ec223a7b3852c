"""read_torch_bin: torch.save checkpoints, read without torch or trust.

Files come from tests/torchbin_writer.py, which writes the bytes torch 2.x writes.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from torchbin_writer import (
    Storage,
    View,
    _Call,
    _TorchPickler,
    archive_name,
    build_zip,
    malicious_pickle,
    pickle_state_dict,
    torch_records,
    write_malicious_bin,
    write_torch_bin,
)

from alpaca_local.errors import InputError, UnsupportedError
from alpaca_local.source.torch_bin import read_torch_bin

RNG = np.random.default_rng(0)


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


# --- reading what torch writes -------------------------------------------------


def test_round_trip_f32_f16_bf16(tmp_path: Path) -> None:
    tensors = {
        "model.embed_tokens.weight": RNG.standard_normal((5, 4)).astype(np.float32),
        "model.norm.weight": RNG.standard_normal(4).astype(np.float16),
        "lm_head.weight": _bf16_bits(RNG.standard_normal((3, 2, 4))),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float16),
    }
    path = write_torch_bin(tmp_path / "pytorch_model.bin", tensors, bf16_names=("lm_head.weight",))

    refs = read_torch_bin(path)

    assert list(refs) == list(tensors)  # state-dict order
    assert [r.dtype for r in refs.values()] == ["F32", "F16", "BF16", "F32", "F16"]
    for name, expected in tensors.items():
        ref = refs[name]
        assert ref.name == name and ref.path == path and ref.shape == expected.shape
        np.testing.assert_array_equal(ref.raw(), expected)  # bf16: the raw uint16 bits
    np.testing.assert_array_equal(
        refs["lm_head.weight"].to_f32(),
        (tensors["lm_head.weight"].astype(np.uint32) << 16).view(np.float32),
    )


def test_storages_are_64_byte_aligned_byte_ranges_of_the_file(tmp_path: Path) -> None:
    tensors = {f"w{i}": RNG.standard_normal((i + 1, 3)).astype(np.float32) for i in range(4)}
    path = write_torch_bin(tmp_path / "m.bin", tensors)
    raw = path.read_bytes()

    for name, ref in read_torch_bin(path).items():
        assert ref.offset % 64 == 0
        assert raw[ref.offset : ref.offset + ref.nbytes] == tensors[name].tobytes()


def test_tensors_sharing_a_storage_at_offsets(tmp_path: Path) -> None:
    base = np.arange(20, dtype=np.float32)
    storage = Storage(base)
    state = collections.OrderedDict(
        [("q", View(storage, 0, (2, 3))), ("k", View(storage, 6, (7,))), ("v", View(storage, 13, (7, 1)))]
    )
    path = write_torch_bin(tmp_path / "m.bin", state)
    with zipfile.ZipFile(path) as zf:
        assert [n for n in zf.namelist() if "/data/" in n] == ["m/data/0"]  # stored once

    refs = read_torch_bin(path)

    np.testing.assert_array_equal(refs["q"].raw(), base[:6].reshape(2, 3))
    np.testing.assert_array_equal(refs["k"].raw(), base[6:13])
    np.testing.assert_array_equal(refs["v"].raw(), base[13:].reshape(7, 1))
    assert refs["k"].offset - refs["q"].offset == 6 * 4


def test_parameters_are_read_as_their_tensor(tmp_path: Path) -> None:
    # state_dict(keep_vars=True) pickles nn.Parameter via _rebuild_parameter.
    data = RNG.standard_normal(3).astype(np.float32)
    path = write_torch_bin(tmp_path / "m.bin", {"p": View(Storage(data), 0, (3,), parameter=True)})

    np.testing.assert_array_equal(read_torch_bin(path)["p"].raw(), data)


def test_size_one_dimensions_may_have_any_stride(tmp_path: Path) -> None:
    # torch calls a (4, 1) view with stride (1, 4) contiguous; so do we.
    data = np.arange(4, dtype=np.float32)
    path = write_torch_bin(tmp_path / "m.bin", {"u": View(Storage(data), 0, (4, 1), stride=(1, 4))})

    np.testing.assert_array_equal(read_torch_bin(path)["u"].raw(), data.reshape(4, 1))


def test_any_archive_name_is_accepted(tmp_path: Path) -> None:
    # torch names the folder after the file stem, or "archive" for file objects.
    data_pkl, storages = pickle_state_dict({"w": np.ones(2, np.float32)})
    path = tmp_path / "renamed.bin"
    path.write_bytes(build_zip(torch_records(data_pkl, storages, "archive")))

    np.testing.assert_array_equal(read_torch_bin(path)["w"].raw(), [1, 1])


# --- refusing what it must not run ---------------------------------------------


@pytest.mark.parametrize(
    ("kind", "asked_for"),
    [
        ("os.system", "os.system"),
        ("posix.system", "posix.system"),
        ("builtins.eval", "builtins.eval"),
        ("builtins.exec", "builtins.exec"),
        ("subprocess", "subprocess.check_call"),
        ("import", "builtins.getattr"),
        ("nested", "os.system"),
        ("stack_global", "posix.system"),
    ],
)
def test_malicious_pickles_are_refused_before_anything_runs(
    tmp_path: Path, kind: str, asked_for: str
) -> None:
    marker = tmp_path / "pwned"
    path = write_malicious_bin(tmp_path / "evil.bin", kind, marker)

    with pytest.raises(InputError) as info:
        read_torch_bin(path)

    message = str(info.value)
    assert f"refusing to load {path}" in message
    assert f"asks for {asked_for}, which is not a tensor" in message
    assert "safetensors" in message and "\n" not in message
    assert not marker.exists()


def test_the_malicious_files_really_are_malicious(tmp_path: Path) -> None:
    # Guards the test above: a naive pickle.loads of the payload does run it.
    marker = tmp_path / "pwned"
    try:
        pickle.loads(malicious_pickle("builtins.exec", marker))
    except Exception:
        pass  # it fails afterwards, on the missing persistent_load
    assert marker.exists()


def test_a_whole_pickled_module_is_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    _TorchPickler(buf).dump(_Call("torch.nn.modules.linear", "Linear"))
    path = tmp_path / "model.bin"
    path.write_bytes(build_zip(torch_records(buf.getvalue(), [], "model")))

    with pytest.raises(InputError, match=r"asks for torch\.nn\.modules\.linear\.Linear"):
        read_torch_bin(path)


# --- bad files: one clear InputError each ---------------------------------------


def test_non_contiguous_tensor_is_refused(tmp_path: Path) -> None:
    # What torch.save writes for torch.zeros(2, 3).t(): shape (3, 2), stride (1, 3).
    view = View(Storage(np.zeros(6, np.float32)), 0, (3, 2), stride=(1, 3))
    path = write_torch_bin(tmp_path / "m.bin", {"t": view})

    with pytest.raises(InputError, match=r"tensor 't' is not contiguous \(shape \[3, 2\], stride \[1, 3\]\)"):
        read_torch_bin(path)


def test_other_dtypes_are_unsupported_and_named(tmp_path: Path) -> None:
    path = write_torch_bin(tmp_path / "m.bin", {"position_ids": np.arange(4, dtype=np.int64)})

    with pytest.raises(UnsupportedError, match=r"tensor 'position_ids' is int64; only float32, float16 and bfloat16"):
        read_torch_bin(path)


def test_missing_storage_record(tmp_path: Path) -> None:
    data_pkl, storages = pickle_state_dict({"a": np.ones(2, np.float32), "b": np.ones(3, np.float32)})
    records = [r for r in torch_records(data_pkl, storages, "m") if r[0] != "m/data/1"]
    path = tmp_path / "m.bin"
    path.write_bytes(build_zip(records))

    with pytest.raises(InputError, match=r"storage record m/data/1 of tensor 'b' is missing"):
        read_torch_bin(path)


def test_tensor_beyond_its_storage(tmp_path: Path) -> None:
    view = View(Storage(np.zeros(4, np.float32)), 2, (3,))
    path = write_torch_bin(tmp_path / "m.bin", {"w": view})

    with pytest.raises(InputError, match=r"tensor 'w' \(elements 2\.\.5\) lies outside its storage"):
        read_torch_bin(path)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95, 0.999])
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    path = write_torch_bin(tmp_path / "m.bin", {"w": np.ones((64, 64), np.float32)})
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])

    with pytest.raises(InputError, match="truncated or corrupt"):
        read_torch_bin(path)


def test_storage_cut_short_is_caught(tmp_path: Path) -> None:
    # A zip whose directory survives but whose storage record claims bytes the file lacks.
    path = write_torch_bin(tmp_path / "m.bin", {"w": np.ones(1000, np.float32)})
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("m/data/0")
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + 64  # somewhere inside the data
    del raw[start : start + 3000]
    path.write_bytes(bytes(raw))

    with pytest.raises(InputError):
        read_torch_bin(path)


def test_corrupt_pickle(tmp_path: Path) -> None:
    data_pkl, storages = pickle_state_dict({"w": np.ones(2, np.float32)})
    path = tmp_path / "m.bin"
    path.write_bytes(build_zip(torch_records(data_pkl[: len(data_pkl) // 2], storages, "m")))

    with pytest.raises(InputError, match=r"is corrupt: data\.pkl cannot be read"):
        read_torch_bin(path)


def test_compressed_storage_is_refused(tmp_path: Path) -> None:
    data_pkl, storages = pickle_state_dict({"w": np.zeros(256, np.float32)})
    path = tmp_path / "m.bin"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in torch_records(data_pkl, storages, "m"):
            zf.writestr(name, data)

    with pytest.raises(InputError, match=r"record m/data/0 is compressed"):
        read_torch_bin(path)


def test_legacy_pickle_format(tmp_path: Path) -> None:
    # torch < 1.6 (or _use_new_zipfile_serialization=False) starts with
    # PROTO 2 and LONG1 magic 0x1950a86a20f9469cfc6c.
    path = tmp_path / "old.bin"
    path.write_bytes(bytes.fromhex("80028a0a6cfc9c46f9206aa850192e") + b"\x80\x02M\xe9\x03.")

    with pytest.raises(InputError, match=r"legacy \(pre-1\.6\) pickle format.*torch>=1\.6.*safetensors"):
        read_torch_bin(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "not a PyTorch zip checkpoint"),
        (b"GGUF\x03\x00\x00\x00", "not a PyTorch zip checkpoint"),
    ],
)
def test_not_a_checkpoint(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(content)
    with pytest.raises(InputError, match=match):
        read_torch_bin(path)


def test_zip_without_data_pkl(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(build_zip([("m/readme.txt", b"hi")]))
    with pytest.raises(InputError, match=r"not a torch\.save checkpoint"):
        read_torch_bin(path)


def test_nested_checkpoint_is_refused(tmp_path: Path) -> None:
    # {"model": state_dict, ...} training checkpoints: say what to save instead.
    buf = io.BytesIO()
    _TorchPickler(buf).dump({"model": {}, "epoch": 3})
    path = tmp_path / "m.bin"
    path.write_bytes(build_zip(torch_records(buf.getvalue(), [], "m")))

    with pytest.raises(InputError, match=r"entry 'model' is a dict, not a tensor"):
        read_torch_bin(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read"):
        read_torch_bin(tmp_path / "nope.bin")


# --- against real torch, when it happens to be installed ---------------------------


def test_real_torch_round_trip(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")

    base = torch.arange(12, dtype=torch.float32)
    state = collections.OrderedDict(
        [
            ("f32", torch.randn(3, 4)),
            ("f16", torch.randn(5, dtype=torch.float16)),
            ("bf16", torch.randn(2, 3, dtype=torch.bfloat16)),
            ("shared_a", base[:6].view(2, 3)),
            ("shared_b", base[6:]),
        ]
    )
    torch_file = tmp_path / "torch.bin"
    torch.save(state, torch_file)

    refs = read_torch_bin(torch_file)
    for name, tensor in state.items():
        expected = tensor.view(torch.int16).numpy().view(np.uint16) if name == "bf16" else tensor.numpy()
        np.testing.assert_array_equal(refs[name].raw(), expected)

    # And torch reads ours, byte-identical to its own given the same serialization id.
    with zipfile.ZipFile(torch_file) as zf:
        serialization_id = zf.read("torch/.data/serialization_id").decode()
    ours = tmp_path / "ours" / "torch.bin"
    ours.parent.mkdir()
    shared = Storage(base.numpy())
    arrays = collections.OrderedDict(
        [
            ("f32", state["f32"].numpy()),
            ("f16", state["f16"].numpy()),
            ("bf16", state["bf16"].view(torch.int16).numpy().view(np.uint16)),
            ("shared_a", View(shared, 0, (2, 3))),
            ("shared_b", View(shared, 6, (6,))),
        ]
    )
    write_torch_bin(ours, arrays, bf16_names=("bf16",), serialization_id=serialization_id)

    assert archive_name(ours) == "torch"
    assert ours.read_bytes() == torch_file.read_bytes()
    loaded = torch.load(ours, weights_only=True)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor)

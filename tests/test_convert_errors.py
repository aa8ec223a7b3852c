"""convert on bad input: one clear line, a meaningful exit code, nothing written."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import tinymodels
from helpers import cli, leftovers, one_line, write_config

from alpaca_local.cli.main import main


@pytest.fixture
def model(tmp_path) -> Path:
    return tinymodels.build_llama(tmp_path / "src").path


def test_unsupported_architecture(model, tmp_path, capsys):
    write_config(model, architectures=["GPTNeoXForCausalLM"])
    rc, err = cli(capsys, "convert", str(model), "-o", str(tmp_path / "o.gguf"))
    one_line(rc, err, 1, "GPTNeoXForCausalLM", "LlamaForCausalLM")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_attention_heads": -4}, "num_attention_heads"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"num_hidden_layers": None}, "num_hidden_layers"),
        ({"hidden_size": "big"}, "hidden_size"),
        ({"num_hidden_layers": 3}, "lacks"),  # config says 3 layers, weights have 2
        ({"intermediate_size": 1024}, "shape"),  # weights do not match the config
    ],
)
def test_bad_config_values(model, tmp_path, capsys, changes, needle):
    write_config(model, **changes)
    rc, err = cli(capsys, "convert", str(model), "-o", str(tmp_path / "o.gguf"))
    one_line(rc, err, 1, needle)
    assert leftovers(tmp_path) == []


def test_config_not_json(model, tmp_path, capsys):
    (model / "config.json").write_text("{not json")
    rc, err = cli(capsys, "convert", str(model), "-o", str(tmp_path / "o.gguf"))
    one_line(rc, err, 1, "config.json", "not valid JSON")


def test_missing_config(model, tmp_path, capsys):
    (model / "config.json").unlink()
    rc, err = cli(capsys, "convert", str(model), "-o", str(tmp_path / "o.gguf"))
    one_line(rc, err, 1, "config.json")


def test_missing_tokenizer(model, tmp_path, capsys):
    (model / "tokenizer.model").unlink()
    rc, err = cli(capsys, "convert", str(model), "-o", str(tmp_path / "o.gguf"))
    one_line(rc, err, 1, "tokenizer.model")
    assert leftovers(tmp_path) == []


def test_corrupt_tokenizer(model, tmp_path, capsys):
    (model / "tokenizer.model").write_bytes(b"\x00garbage" * 10)
    rc, err = cli(capsys, "convert", str(model), "-o", str(tmp_path / "o.gguf"))
    one_line(rc, err, 1, "SentencePiece")


def test_tokenizer_from_another_model(tmp_path, capsys):
    """A tokenizer with more tokens than the embedding has rows belongs to other weights."""
    small = tinymodels.build_llama(tmp_path / "small", sp_vocab_size=480).path
    big = tinymodels.build_llama(tmp_path / "big", sp_vocab_size=512).path
    shutil.copy(big / "tokenizer.model", small / "tokenizer.model")
    rc, err = cli(capsys, "convert", str(small), "-o", str(tmp_path / "o.gguf"))
    one_line(rc, err, 1, "tokenizer", "rows")


def test_added_tokens_collide(model, tmp_path, capsys):
    (model / "added_tokens.json").write_text(json.dumps({"[PAD]": 512, "[OTHER]": 512}))
    rc, err = cli(capsys, "convert", str(model), "-o", str(tmp_path / "o.gguf"))
    one_line(rc, err, 1, "512")


def test_added_tokens_leave_gap(tmp_path, capsys):
    # 520 embedding rows hold ids 0..514, so the size check passes and only the gap (513) is wrong.
    model = tinymodels.build_llama(tmp_path / "m", vocab_size=520).path
    (model / "added_tokens.json").write_text(json.dumps({"[PAD]": 512, "[X]": 514}))
    rc, err = cli(capsys, "convert", str(model), "-o", str(tmp_path / "o.gguf"))
    one_line(rc, err, 1, "token id 513 is missing")
    assert leftovers(tmp_path) == []


def test_truncated_safetensors(model, tmp_path, capsys):
    f = model / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    rc, err = cli(capsys, "convert", str(model), "-o", str(tmp_path / "o.gguf"))
    one_line(rc, err, 1, "model.safetensors")
    assert leftovers(tmp_path) == []


def test_safetensors_header_not_json(model, tmp_path, capsys):
    f = model / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"@@@@"
    f.write_bytes(bytes(data))
    rc, err = cli(capsys, "convert", str(model), "-o", str(tmp_path / "o.gguf"))
    one_line(rc, err, 1, "not valid JSON")


def test_safetensors_header_length_absurd(model, tmp_path, capsys):
    f = model / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 60)
    f.write_bytes(bytes(data))
    rc, err = cli(capsys, "convert", str(model), "-o", str(tmp_path / "o.gguf"))
    one_line(rc, err, 1, "header")


def test_missing_shard(tmp_path, capsys):
    model = tinymodels.build_llama(tmp_path / "m", shards=3).path
    (model / "model-00002-of-00003.safetensors").unlink()
    rc, err = cli(capsys, "convert", str(model), "-o", str(tmp_path / "o.gguf"))
    one_line(rc, err, 1, "model-00002-of-00003.safetensors", "missing")


def test_index_names_tensor_in_no_shard(tmp_path, capsys):
    model = tinymodels.build_llama(tmp_path / "m", shards=2).path
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    rc, err = cli(capsys, "convert", str(model), "-o", str(tmp_path / "o.gguf"))
    one_line(rc, err, 1, "no shard")


def test_malicious_pickle_is_refused(tmp_path, capsys):
    """A .bin whose pickle calls os.system: refused before anything runs."""
    import torchbin_writer

    model = tinymodels.build_llama(tmp_path / "m").path
    (model / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torchbin_writer.write_malicious_bin(model / "pytorch_model.bin", "os.system", marker)
    rc, err = cli(capsys, "convert", str(model), "-o", str(tmp_path / "o.gguf"))
    one_line(rc, err, 1, "refusing")
    assert not marker.exists()
    assert leftovers(tmp_path) == []


def test_existing_output_needs_force(model, tmp_path, capsys):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"precious")
    rc, err = cli(capsys, "convert", str(model), "-o", str(out))
    one_line(rc, err, 2, "--force")
    assert out.read_bytes() == b"precious"
    assert main(["convert", str(model), "-o", str(out), "--force", "--json"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_output_is_directory(model, tmp_path, capsys):
    rc, err = cli(capsys, "convert", str(model), "-o", str(tmp_path))
    one_line(rc, err, 2, "directory")


def test_source_does_not_exist(tmp_path, capsys):
    rc, err = cli(capsys, "convert", str(tmp_path / "nope"), "-o", str(tmp_path / "o.gguf"))
    one_line(rc, err, 1, "does not exist")


def test_unknown_quant(model, tmp_path, capsys):
    rc, err = cli(capsys, "convert", str(model), "--quant", "q3_k_xl")
    one_line(rc, err, 2, "q3_k_xl")


def test_interrupt_leaves_nothing_and_keeps_old_file(model, tmp_path, capsys, monkeypatch):
    """Ctrl-C in the middle of writing: no partial file, the old target untouched."""
    import alpaca_local.convert.pipeline as conv

    out = tmp_path / "o.gguf"
    out.write_bytes(b"old model")
    calls = {"n": 0}
    real = conv.quantize_rows

    def interrupted(rows, ggml_type, imatrix=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(rows, ggml_type, imatrix)

    monkeypatch.setattr(conv, "quantize_rows", interrupted)
    rc = main(["convert", str(model), "-o", str(out), "--force", "--threads", "1", "--json"])
    assert rc == 130
    assert out.read_bytes() == b"old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.gguf", "src"]


class _FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are used, as a full disk's do
    (a short write first, then the error)."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data: bytes) -> int:
        import errno

        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name: str):
        return getattr(self.f, name)

    def __enter__(self) -> "_FullDisk":
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def test_disk_full_leaves_nothing(model, tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of the tensor data, raised from the real writer's own file (the real
    disk-full test on a small tmpfs is in test_hostile): one line, exit 1, temp file removed."""
    import builtins

    import alpaca_local.convert.pipeline as conv

    room = conv.plan_conversion(model, "q8_0").tensor_bytes // 2
    opened: list[_FullDisk] = []

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        opened.append(_FullDisk(builtins.open(path, mode, *args, **kwargs), room))
        return opened[-1]

    monkeypatch.setattr(conv, "open", open_on_a_full_disk, raising=False)
    rc, err = cli(capsys, "convert", str(model), "-o", str(tmp_path / "o.gguf"), "-q", "q8_0")
    one_line(rc, err, 1, "disk full", "nothing was written")
    assert leftovers(tmp_path) == []
    assert len(opened) == 1 and opened[0].room == 0  # the writer really met the full disk


def _write_index(folder: Path, weight_map: object) -> Path:
    path = folder / "pytorch_model.bin.index.json"
    path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return path


@pytest.mark.parametrize("shard", ["../outside.bin", "/etc/passwd", "sub/x.bin", "..", "", 3, "a\\b.bin"])
def test_index_refuses_paths_outside_the_folder(tmp_path, shard):
    from alpaca_local.errors import InputError
    from alpaca_local.source.weights import read_index

    with pytest.raises(InputError, match="not a plain file name"):
        read_index(_write_index(tmp_path, {"a": shard}))


@pytest.mark.parametrize("text", ["{not json", "[]", '{"weight_map": []}', '{"weight_map": {}}'])
def test_index_malformed(tmp_path, text):
    from alpaca_local.errors import InputError
    from alpaca_local.source.weights import read_index

    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(text)
    with pytest.raises(InputError):
        read_index(index)

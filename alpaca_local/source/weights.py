"""Find and index the weights of a Hugging Face model folder.

In: a folder. Out: every source tensor as a `TensorRef`, located but not
loaded, after checking the shard index against the shards (a missing shard, a
tensor in no shard or in two shards is an error before any work starts).
Formats, in the order looked for: sharded safetensors (index), one
model.safetensors, sharded pytorch .bin (index), one pytorch_model.bin.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

from alpaca_local.source.config import read_json
from alpaca_local.errors import InputError
from alpaca_local.source.safetensors_io import read_safetensors
from alpaca_local.source.tensors import TensorRef

Reader = Callable[[Path], dict[str, TensorRef]]


def _torch_reader(path: Path) -> dict[str, TensorRef]:
    from alpaca_local.source.torch_bin import read_torch_bin  # only .bin checkpoints need the unpickler

    return read_torch_bin(path)


# (single file, index file, shard glob, reader)
FORMATS: tuple[tuple[str, str, str, Reader], ...] = (
    ("model.safetensors", "model.safetensors.index.json", "model-*.safetensors", read_safetensors),
    ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin", _torch_reader),
)


def read_index(index_path: Path) -> dict[str, str]:
    """tensor name -> shard file name, from a *.index.json, with the names checked."""
    data = read_json(index_path, "the shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index_path}: no 'weight_map' object; the index is corrupt")
    for tensor, shard in weight_map.items():
        # Plain names only: an index must not send us to read files outside the model folder.
        p = PurePosixPath(shard) if isinstance(shard, str) else None
        if p is None or p.name != shard or shard in ("", ".", "..") or "\\" in shard:
            raise InputError(
                f"{index_path}: tensor {tensor!r} points to {shard!r}, which is not a plain file name in the folder"
            )
    return weight_map


def _read_sharded(folder: Path, index_path: Path, reader: Reader) -> dict[str, TensorRef]:
    weight_map = read_index(index_path)
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not (folder / shard).is_file():
            raise InputError(f"shard {shard} named in {index_path.name} is missing from {folder}; download it")
    return merge_shards(index_path.name, weight_map, ((shard, reader(folder / shard)) for shard in shards))


def merge_shards(
    index_name: str, weight_map: dict[str, str], shards: Iterable[tuple[str, dict[str, TensorRef]]]
) -> dict[str, TensorRef]:
    """One tensor table from each shard's, checked against the index (local or streamed shards)."""
    refs: dict[str, TensorRef] = {}
    where: dict[str, str] = {}
    for shard, found in shards:
        for name, ref in found.items():
            if name in refs:
                raise InputError(f"tensor {name!r} is in both {where[name]} and {shard}; the shards overlap")
            if weight_map.get(name) != shard:
                raise InputError(
                    f"tensor {name!r} is in {shard} but {index_name} places it in "
                    f"{weight_map.get(name, 'no shard')}; the index does not match the shards"
                )
            refs[name], where[name] = ref, shard
    missing = sorted(set(weight_map) - set(refs))
    if missing:
        raise InputError(
            f"{index_name} lists {len(missing)} tensor(s) that no shard holds, e.g. {missing[0]!r}; "
            "a shard is incomplete, re-download it"
        )
    return refs


def read_weights(folder: Path) -> dict[str, TensorRef]:
    """All source tensors of `folder`, in the order the reference converter reads them."""
    for single, index, shard_glob, reader in FORMATS:
        if (folder / index).is_file():
            return _read_sharded(folder, folder / index, reader)
        if (folder / single).is_file():
            return reader(folder / single)
        if any(folder.glob(shard_glob)):
            raise InputError(f"{folder} has {shard_glob} shards but no {index}; the index file is required")
    raise InputError(
        f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json"
    )

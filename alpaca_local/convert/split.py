"""llama.cpp's split GGUF format: file names, which tensors go in which part, reading a split model whole.

In:  the padded byte sizes of a file's tensors in file order and a limit (bytes or tensors
     per part); or the path of a split model's first part.
Out: the part each tensor goes in, the part names and `split.*` keys; or one `GGUFHeader`
     holding every part's tensors.

The format is `llama-gguf-split --split`'s (tools/gguf-split/gguf-split.cpp):

- part i of n is `<prefix>-<i+1:05d>-of-<n:05d>.gguf` (llama_split_path, src/llama.cpp:545);
- the first part holds all the metadata, then `split.no` (u16), `split.count` (u16) and
  `split.tensors.count` (i32, the whole model's count); the other parts hold only these three
  keys (split_strategy::new_ctx_out, gguf-split.cpp:231-244);
- each part is a complete GGUF file: its own tensor table, offsets from its own data section;
- tensors stay in file order; a new part starts when the next tensor's padded size would take
  the part's padded tensor bytes over the limit (metadata not counted), or every N tensors
  (split_strategy::should_split, gguf-split.cpp:283-294).

llama.cpp loads such a model from the first part's path (llama_model_loader, src/llama-model-loader.cpp:596-670:
it derives the other names, checks each `split.no` and the total tensor count), and
`llama-gguf-split --merge` turns the parts back into one file.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from gguf.constants import Keys

from alpaca_local.convert.gguf_read import GGUFHeader, printable, read_gguf_header
from alpaca_local.errors import InputError, UsageError

KEY_NO = Keys.Split.LLM_KV_SPLIT_NO  # "split.no"
KEY_COUNT = Keys.Split.LLM_KV_SPLIT_COUNT  # "split.count"
KEY_TENSORS = Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT  # "split.tensors.count"
MAX_PARTS = 0xFFFF  # split.count is a u16
_PART_RE = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class SplitRule:
    """At most `max_bytes` of (padded) tensor data, or at most `max_tensors` tensors, per part."""

    max_bytes: int = 0
    max_tensors: int = 0

    def __post_init__(self) -> None:
        if self.max_bytes and self.max_tensors:
            raise UsageError("give either --split-max-size or --split-max-tensors, not both (as llama-gguf-split)")
        if self.max_bytes < 0 or self.max_tensors < 0:
            raise UsageError("the split limit must be positive")

    def __bool__(self) -> bool:
        return bool(self.max_bytes or self.max_tensors)


def parse_size(text: str) -> int:
    """--split-max-size: a whole number of megabytes or gigabytes, `500M` or `45G` (decimal units,
    as llama-gguf-split's split_str_to_n_bytes: 1M = 1,000,000 bytes)."""
    m = re.fullmatch(r"\s*(\d{1,9})\s*([MG])B?\s*", text, re.IGNORECASE)
    if not m or int(m.group(1)) == 0:
        raise UsageError(f"--split-max-size {text!r} is not a size; give a whole number of M or G, e.g. 45G or 500M")
    return int(m.group(1)) * (1000**2 if m.group(2).upper() == "M" else 1000**3)


def part_of_each(padded_sizes: Sequence[int], names: Sequence[str], rule: SplitRule) -> list[int]:
    """The part index of each tensor (file order), by gguf-split's rule.

    Unlike llama-gguf-split, a tensor larger than the size limit is refused: the limit is
    usually a host's maximum file size, which such a part would break."""
    parts, part, used = [], 0, 0
    for i, (size, name) in enumerate(zip(padded_sizes, names)):
        if rule.max_bytes:
            if size > rule.max_bytes:
                raise UsageError(
                    f"tensor {name} takes {size / 1e6:,.1f} MB, more than --split-max-size "
                    f"({rule.max_bytes / 1e6:,.0f} MB); give a larger size")
            if used + size > rule.max_bytes:
                part, used = part + 1, 0
            used += size
        elif rule.max_tensors and i > 0 and i % rule.max_tensors == 0:
            part += 1
        parts.append(part)
    if parts and parts[-1] + 1 > MAX_PARTS:
        raise UsageError(f"that limit makes {parts[-1] + 1} parts; llama.cpp reads at most {MAX_PARTS}")
    return parts


def prefix_of(target: Path) -> Path:
    """`-o NAME.gguf` -> NAME: the prefix llama_split_path extends."""
    return target.with_name(target.name.removesuffix(".gguf"))


def part_path(prefix: Path, no: int, count: int) -> Path:
    """llama_split_path: part `no` (0-based) of `count`, e.g. NAME-00001-of-00003.gguf."""
    return prefix.with_name(f"{prefix.name}-{no + 1:05d}-of-{count:05d}.gguf")


def part_paths(target: Path, count: int) -> list[Path]:
    """Every part's file name for `-o target`; a single part keeps the name itself."""
    if count == 1:
        return [target]
    return [part_path(prefix_of(target), i, count) for i in range(count)]


def model_name(path: Path) -> str:
    """The model's name from its file: tiny.Q8_0.gguf and tiny.Q8_0-00001-of-00003.gguf are both tiny.Q8_0."""
    m = _PART_RE.match(path.name)
    return m.group("prefix") if m else path.name.removesuffix(".gguf")


def is_later_part(path: Path) -> bool:
    """Part 2 or later of a split model, by its name: listed with its first part, never alone."""
    m = _PART_RE.match(path.name)
    return m is not None and int(m.group("no")) > 1


def read_gguf_model(path: str | Path) -> GGUFHeader:
    """The header of a model file; for the first part of a split model, all parts' tensors in one header.

    Checked as llama.cpp's loader checks: the first part is given, every part exists and says
    which it is, no tensor appears twice, and the total is `split.tensors.count`."""
    first = read_gguf_header(path)
    count = first.kv.get(KEY_COUNT, 0)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise InputError(f"{first.path}: metadata {KEY_COUNT} = {printable(count)} is not a part count")
    if count <= 1:
        return first
    no = first.kv.get(KEY_NO)
    m = _PART_RE.match(first.path.name)
    if no != 0 or m is None or int(m.group("no")) != 1 or int(m.group("count")) != count:
        raise InputError(
            f"{first.path} is part of a split model; give its first part, named "
            f"NAME-00001-of-{count:05d}.gguf")
    prefix = first.path.with_name(m.group("prefix"))
    headers, seen = [first], {t.name for t in first.tensors}
    for i in range(1, count):
        part = part_path(prefix, i, count)
        if not part.exists():
            raise InputError(f"{part.name}, part {i + 1} of {count} of {first.path.name}, is missing")
        header = read_gguf_header(part)
        if header.kv.get(KEY_NO) != i:
            raise InputError(f"{part}: {KEY_NO} is {printable(header.kv.get(KEY_NO))}, expected {i}")
        for t in header.tensors:
            if t.name in seen:
                raise InputError(f"{part}: tensor {printable(t.name)} is also in an earlier part")
            seen.add(t.name)
        headers.append(header)
    expected = first.kv.get(KEY_TENSORS)
    if expected != len(seen):
        raise InputError(f"{first.path}: {KEY_TENSORS} is {printable(expected)} but the parts hold {len(seen)} tensors")
    tensors = tuple(replace(t, part=i) for i, h in enumerate(headers) for t in h.tensors)
    return replace(first, tensors=tensors, file_size=sum(h.file_size for h in headers),
                   parts=tuple((h.path, h.data_offset, h.file_size) for h in headers))

"""Known models as data: `models/catalog.json` name -> the config facts the planner needs.

In: a catalog name such as "alpaca-7b". Out: a checked `ModelConfig`, built by
the same `parse_config` that reads a real config.json, so a catalog entry and
the downloaded folder plan identically.
"""

from __future__ import annotations

import functools
from pathlib import Path

from alpaca_local.convert.architectures import SUPPORTED
from alpaca_local.source.config import ModelConfig, parse_config, read_json
from alpaca_local.errors import InputError, UsageError

CATALOG_PATH = Path(__file__).resolve().parents[2] / "models" / "catalog.json"
DEFAULT_MODEL = "alpaca-7b"


@functools.lru_cache(maxsize=4)
def _entries(path: Path = CATALOG_PATH) -> dict[str, dict]:
    data = read_json(path, "the model catalog")
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a JSON object of model entries")
    return {k: v for k, v in data.items() if not k.startswith("_")}


def names(path: Path = CATALOG_PATH) -> list[str]:
    return sorted(_entries(path))


def description(name: str, path: Path = CATALOG_PATH) -> str:
    return str(_entries(path).get(name, {}).get("description", name))


def load(name: str, path: Path = CATALOG_PATH) -> ModelConfig:
    """The ModelConfig of a catalog entry; UsageError naming the known entries if unknown."""
    entries = _entries(path)
    if name not in entries:
        raise UsageError(
            f"{name!r} is not a GGUF file, a model folder or a catalog name; known names: {', '.join(sorted(entries))}"
        )
    entry = entries[name]
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        raise InputError(f"{path}: entry {name!r} has no 'config' object")
    return parse_config(entry["config"], Path(f"{path}#{name}"), SUPPORTED)

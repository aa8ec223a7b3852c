"""The package tree shows the data flow, and imports point one way (issue 12).

Layers, lowest first: the shared leaves (`errors`, `template`), `source` (read a
Hugging Face folder), `convert` (the GGUF side), then `plan` and `run` side by side
(neither imports the other), `measure`, `publish` (the model card and the upload), and the
CLI on top. A module may import its
own package and the layers below; nothing imports upwards, and no two modules
import each other, directly or around a longer loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "alpaca_local"
RANK = {"errors": 0, "template": 0, "source": 1, "convert": 2, "plan": 3, "run": 3, "measure": 4, "publish": 5,
        "cli": 6, "__init__": 0, "__main__": 7}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every alpaca_local module `path` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("alpaca_local"):
            assert node.level == 0, f"{path}: relative import"
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists() else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("alpaca_local")}
    return found


MODULES = {_module_name(p): _imports(p) for p in sorted(PKG.rglob("*.py"))}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_tree_shows_the_pipeline() -> None:
    packages = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").exists())
    assert packages == ["cli", "convert", "measure", "plan", "publish", "run", "source"]
    flat = sorted(p.stem for p in PKG.glob("*.py"))
    assert flat == ["__init__", "__main__", "errors", "template"]
    for pkg in packages:
        doc = ast.get_docstring(ast.parse((PKG / pkg / "__init__.py").read_text()))
        assert doc and "May import" in doc, f"{pkg}/__init__.py must say what it holds and may import"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    here = _layer(module)
    for target in MODULES[module]:
        there = _layer(target)
        if there in (here, "__init__") or target == "alpaca_local":
            continue
        assert RANK[there] < RANK[here], f"{module} imports {target}: {there} is not below {here}"


def test_no_import_cycles() -> None:
    graph = {m: {t for t in deps if t in MODULES and t != m} for m, deps in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_one_definition_of_the_size_fields() -> None:
    from dataclasses import fields

    from alpaca_local.plan.shape import ModelShape
    from alpaca_local.source.config import ModelConfig, ModelDims

    assert issubclass(ModelConfig, ModelDims) and issubclass(ModelShape, ModelDims)
    own = {f.name for f in fields(ModelDims)}
    for cls in (ModelConfig, ModelShape):
        extra = {f.name for f in fields(cls)} - own
        assert not extra & {"vocab", "n_ctx_train", "tied_embeddings"}, "a size field under a second name"

"""Layers that point one way (issue 11 §4), read from the package's source with ``ast``: every ``import`` and
``from ... import`` statement, at module level or inside functions (a lazy import is still a dependency), except those
under ``if TYPE_CHECKING:`` (annotations only, never executed).

- ``export/``, ``eval/``, ``engine/`` and ``serve/`` never import ``nanochat.train``: what they need of a run's files
  lives below (``nanochat.checkpoint_format``, ``nanochat.runlog``);
- ``ops/`` never imports ``model/``: ops sit below the model;
- only ``ops/`` imports the extension ``nanochat._core`` (STYLE.md convention 2);
- the low-level modules (the checkpoint format, the run files, the model schema and config) import none of the
  layers above them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import nanochat

PACKAGE = Path(nanochat.__file__).parent

# (importer prefix, forbidden prefix) -> {importer module: why it is allowed for now}
# (empty: issue 11 §4 moved the last one, the Rust engine wrapper, from ops/ to engine/rust_engine.py)
KNOWN_EXCEPTIONS: dict[tuple[str, str], dict[str, str]] = {}
RULES: list[tuple[str, str]] = [
    *((f"nanochat.{layer}", "nanochat.train") for layer in ("export", "eval", "engine", "serve")),
    ("nanochat.ops", "nanochat.model"),
    *(
        (low, high)
        for low in ("nanochat.checkpoint_format", "nanochat.runlog", "nanochat.model.schema", "nanochat.model.config")
        for high in ("nanochat.train", "nanochat.eval", "nanochat.engine", "nanochat.serve")
    ),
    *((low, "nanochat.export") for low in ("nanochat.runlog", "nanochat.model.schema", "nanochat.model.config")),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module ``module``'s source imports (``from a import b`` counts as ``a`` and ``a.b``; relative imports
    resolved), skipping ``if TYPE_CHECKING:`` bodies."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def package_imports() -> dict[str, set[str]]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        out[name] = imports_of(path.read_text(), name, is_package=path.name == "__init__.py")
    return out


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(graph: dict[str, set[str]], importer: str, forbidden: str) -> dict[str, list[str]]:
    return {
        mod: sorted(i for i in imps if under(i, forbidden))
        for mod, imps in graph.items()
        if under(mod, importer) and any(under(i, forbidden) for i in imps)
    }


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    g = package_imports()
    assert len(g) > 50 and "nanochat.export.load" in g  # the walk found the package
    return g


def test_only_ops_imports_the_extension(graph):
    """``nanochat._core`` is imported by ``nanochat.ops`` and nothing else in the package (lazy imports included)."""
    found = {m: sorted(i for i in imps if under(i, "nanochat._core")) for m, imps in graph.items()}
    outside = {m: v for m, v in found.items() if v and not under(m, "nanochat.ops")}
    assert not outside, f"only nanochat.ops may import nanochat._core: {outside}"
    assert any(v for m, v in found.items() if under(m, "nanochat.ops")), "the walk should see ops import _core"


@pytest.mark.parametrize(("importer", "forbidden"), RULES, ids=[f"{a}-not-{b}" for a, b in RULES])
def test_layers_point_one_way(graph, importer, forbidden):
    known = KNOWN_EXCEPTIONS.get((importer, forbidden), {})
    found = violations(graph, importer, forbidden)
    unexpected = {m: v for m, v in found.items() if m not in known}
    assert not unexpected, f"{importer} must not import {forbidden}: {unexpected}"
    # a known exception that was fixed must leave the list, so the list stays true
    stale = sorted(set(known) - set(found))
    assert not stale, f"no longer an exception, remove it from KNOWN_EXCEPTIONS: {stale}"


def test_the_walk_sees_lazy_and_relative_imports_and_skips_type_checking_blocks():
    """The checker itself: a violation inside a function, a relative one, and an annotation-only one."""
    src = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from nanochat.train.loop import TrainConfig\n"
        "def f():\n"
        "    from ..train import checkpoint\n"
        "    import nanochat.model.gpt as g\n"
        "from . import gguf_io\n"
    )
    imps = imports_of(src, "nanochat.export.load")
    assert {"nanochat.train", "nanochat.train.checkpoint", "nanochat.model.gpt", "nanochat.export.gguf_io"} <= imps
    assert "nanochat.train.loop" not in imps
    graph = {"nanochat.export.load": imps, "nanochat.ops.x": {"nanochat.model"}}
    assert violations(graph, "nanochat.export", "nanochat.train") == {
        "nanochat.export.load": ["nanochat.train", "nanochat.train.checkpoint"]
    }
    assert violations(graph, "nanochat.ops", "nanochat.model") == {"nanochat.ops.x": ["nanochat.model"]}

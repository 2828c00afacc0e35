"""The checked-in ``_core.pyi`` stubs describe exactly what the extension exposes (checked in CI).

Names, and the signatures too: every stubbed function and method has the parameter names, order and default values
of the extension's own ``__text_signature__`` (pyo3 writes it from the Rust ``#[pyo3(signature = ...)]``), so a
changed default or a renamed argument in Rust fails here until the stub follows.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

import nanochat
from nanochat import _core

STUB = Path(nanochat.__file__).parent / "_core.pyi"


def test_stub_names_match_extension():
    stub = STUB.read_text()
    names = set(re.findall(r"^(?:def|class) (\w+)", stub, re.M)) | set(re.findall(r"^(\w+): ", stub, re.M))
    public = {n for n in dir(_core) if not n.startswith("_")}
    assert public - names == set(), "exposed but not stubbed"
    assert names - public == set(), "stubbed but not exposed"
    for cls in ("EngineModel", "EngineSession"):
        body = stub.split(f"class {cls}")[1].split("\nclass ")[0]
        stubbed = set(re.findall(r"def (\w+)", body)) - {"__init__"}
        exposed = {n for n in dir(getattr(_core, cls)) if not n.startswith("_")}
        assert stubbed == exposed, cls


def _stub_params(fn: ast.FunctionDef) -> list[tuple[str, Any]]:
    """``(name, default)`` per parameter of a stubbed def (``inspect.Parameter.empty`` when it has none)."""
    args = fn.args.posonlyargs + fn.args.args
    defaults = [inspect.Parameter.empty] * (len(args) - len(fn.args.defaults)) + [
        ast.literal_eval(d) for d in fn.args.defaults
    ]
    return [(a.arg, d) for a, d in zip(args, defaults) if a.arg != "self"]


def _real_params(obj: Any) -> list[tuple[str, Any]]:
    sig = inspect.signature(obj)
    return [(p.name, p.default) for p in sig.parameters.values() if p.name != "self"]


def _stub_defs() -> list[tuple[str, Any, ast.FunctionDef]]:
    """``(qualified name, extension object, stub def)`` for every function, method and constructor in the stub."""
    tree = ast.parse(STUB.read_text())
    out = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out.append((node.name, getattr(_core, node.name), node))
        elif isinstance(node, ast.ClassDef):
            cls = getattr(_core, node.name)
            for item in node.body:
                if not isinstance(item, ast.FunctionDef):
                    continue
                if any(isinstance(d, ast.Name) and d.id == "property" for d in item.decorator_list):
                    continue  # getters carry no signature
                target = cls if item.name == "__init__" else getattr(cls, item.name)
                out.append((f"{node.name}.{item.name}", target, item))
    return out


@pytest.mark.parametrize("qualname,obj,stub", _stub_defs(), ids=lambda v: v if isinstance(v, str) else "")
def test_stub_signatures_match_extension(qualname: str, obj: Any, stub: ast.FunctionDef):
    assert _stub_params(stub) == _real_params(obj), qualname


def test_the_signature_check_can_fail():
    """The comparison is not vacuous: a stub with a wrong default or a missing argument differs."""
    good = ast.parse("def sinkhorn_forward(logits, iters: int = 20, threads: int = 0): ...").body[0]
    bad_default = ast.parse("def sinkhorn_forward(logits, iters: int = 30, threads: int = 0): ...").body[0]
    missing = ast.parse("def sinkhorn_forward(logits, iters: int = 20): ...").body[0]
    assert isinstance(good, ast.FunctionDef)
    assert _stub_params(good) == _real_params(_core.sinkhorn_forward)
    for bad in (bad_default, missing):
        assert isinstance(bad, ast.FunctionDef)
        assert _stub_params(bad) != _real_params(_core.sinkhorn_forward)

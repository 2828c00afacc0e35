"""nanochat: train, evaluate, export and serve small ternary (BitNet b1.58) language models for code.

The compiled Rust core lives in ``nanochat._core``; only :mod:`nanochat.ops` imports it.
``nanochat.load(path)`` opens any model file we write (GGUF, run directory, safetensors).

Packages re-export their public names lazily (:func:`lazy_exports`, PEP 562): importing ``torch`` alone costs about a
second, so ``nanochat-sample`` on a GGUF (Rust engine: numpy + ``_core`` + tokenizers) and every ``--help`` import
only the modules they use.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

__version__ = "0.1.0"


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for a package whose public names live in submodules.

    ``exports`` maps each name to the submodule (relative, like ``"generate"``) that defines it. A name's submodule
    is imported on first access and the value cached in the package, so ``from nanochat.engine import Engine``
    works as before while ``import nanochat.engine.cli`` pulls in nothing heavy.

    A name may equal its submodule's (``nanochat.export.load``, the function, lives in ``nanochat/export/load.py``).
    The import system binds a submodule to its package's attribute of the same name whenever that submodule is
    first imported, from anywhere; the package's module class turns that binding into the exported value, as the
    eager ``from .load import load`` used to.
    """
    module = sys.modules[package]
    pkg_globals: dict[str, Any] = module.__dict__

    class _LazyPackage(types.ModuleType):
        def __setattr__(self, name: str, value: Any) -> None:
            if isinstance(value, types.ModuleType) and exports.get(name) == name and hasattr(value, name):
                value = getattr(value, name)
            super().__setattr__(name, value)

    module.__class__ = _LazyPackage

    def __getattr__(name: str) -> Any:
        sub = exports.get(name)
        if sub is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{sub}"), name)
        pkg_globals[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(pkg_globals) | set(exports))

    return __getattr__, __dir__, sorted(exports)


def __getattr__(name: str) -> Any:  # lazy: `import nanochat` stays light for CLIs
    if name == "load":
        from nanochat.export.load import load

        return load
    raise AttributeError(f"module 'nanochat' has no attribute {name!r}")

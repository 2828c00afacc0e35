"""The checked-in ``_core.pyi`` stubs name exactly what the extension exposes (checked in CI)."""

import re
from pathlib import Path

import nanochat
from nanochat import _core


def test_stub_names_match_extension():
    stub = (Path(nanochat.__file__).parent / "_core.pyi").read_text()
    names = set(re.findall(r"^(?:def|class) (\w+)", stub, re.M)) | set(re.findall(r"^(\w+): ", stub, re.M))
    public = {n for n in dir(_core) if not n.startswith("_")}
    assert public - names == set(), "exposed but not stubbed"
    assert names - public == set(), "stubbed but not exposed"
    for cls in ("EngineModel", "EngineSession"):
        body = stub.split(f"class {cls}")[1].split("\nclass ")[0]
        stubbed = set(re.findall(r"def (\w+)", body)) - {"__init__"}
        exposed = {n for n in dir(getattr(_core, cls)) if not n.startswith("_")}
        assert stubbed == exposed, cls

"""scripts/ablate.py's derived configs: a shipped config with [model] overrides, written as TOML the trainer loads."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from nanochat.model import load_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ablate.py"


def _ablate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ablate_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ablate_script"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_derived_config_overrides_only_the_named_model_keys(tmp_path: Path) -> None:
    ablate = _ablate()
    base_model, base_train = load_config("d20")
    path = ablate.derived_config("d20", ["mlp_hidden=512", "qk_norm=false", 'mlp="relu2"'], tmp_path / "v.toml")
    model, train = load_config(path)
    assert (model.mlp_hidden, model.qk_norm, model.mlp) == (512, False, "relu2")
    assert model.replace(mlp_hidden=base_model.mlp_hidden, qk_norm=base_model.qk_norm, mlp=base_model.mlp) == base_model
    assert train == base_train


def test_every_variant_names_known_flags_and_model_keys(tmp_path: Path) -> None:
    ablate = _ablate()
    for name, flags in ablate.VARIANTS.items():
        sets = [flags[i + 1] for i, f in enumerate(flags) if f == ablate.MODEL_SET]
        if sets:  # the derived TOML must load (an unknown [model] key is a ConfigError)
            load_config(ablate.derived_config("d20", sets, tmp_path / f"{name}.toml"))


def test_unknown_model_key_is_refused(tmp_path: Path) -> None:
    ablate = _ablate()
    from nanochat.model.config import ConfigError

    with pytest.raises(ConfigError):
        load_config(ablate.derived_config("d20", ["mlp_hiden=1024"], tmp_path / "bad.toml"))

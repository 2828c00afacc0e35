"""The nanochat model: config, BitLinear, mHC residual streams and the GPT decoder.

```python
from nanochat.model import GPT, GPTConfig, load_config

cfg, train_defaults = load_config("tiny_cpu")
model = GPT(cfg)
loss = model(idx, targets)
```
"""

from __future__ import annotations

from nanochat import lazy_exports

# lazy (nanochat.lazy_exports): the config is plain Python, and `--help` or a GGUF served by the Rust engine must not
# pay for importing torch
_EXPORTS = {
    **dict.fromkeys(["BitLinear", "fake_quant_acts", "fake_quant_weight", "torch_path_only"], "bitlinear"),
    **dict.fromkeys(["CONFIG_NAMES", "TRAIN_KEYS", "ConfigError", "GPTConfig", "config_path", "load_config"], "config"),
    **dict.fromkeys(["GPT", "MLP", "Attention", "Block", "RMSNorm", "apply_rope", "rope_cos_sin"], "gpt"),
    "StreamResidual": "mhc",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

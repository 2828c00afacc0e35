"""The nanochat model: config, BitLinear, mHC residual streams and the GPT decoder.

```python
from nanochat.model import GPT, GPTConfig, load_config

cfg, train_defaults = load_config("tiny_cpu")
model = GPT(cfg)
loss = model(idx, targets)
```
"""

from nanochat.model.bitlinear import BitLinear, fake_quant_acts, fake_quant_weight, torch_path_only
from nanochat.model.config import CONFIG_NAMES, TRAIN_KEYS, ConfigError, GPTConfig, config_path, load_config
from nanochat.model.gpt import GPT, MLP, Attention, Block, RMSNorm, apply_rope, rope_cos_sin
from nanochat.model.mhc import StreamResidual

__all__ = [
    "CONFIG_NAMES",
    "GPT",
    "MLP",
    "TRAIN_KEYS",
    "Attention",
    "BitLinear",
    "Block",
    "ConfigError",
    "GPTConfig",
    "RMSNorm",
    "StreamResidual",
    "apply_rope",
    "config_path",
    "fake_quant_acts",
    "fake_quant_weight",
    "load_config",
    "rope_cos_sin",
    "torch_path_only",
]

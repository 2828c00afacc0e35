"""``python -m nanochat.train`` (and ``torchrun ... -m nanochat.train``)."""

from nanochat.train.cli import entry

entry()

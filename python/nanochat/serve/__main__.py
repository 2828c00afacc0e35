"""``python -m nanochat.serve``: see :mod:`nanochat.serve.cli`."""

from nanochat.serve.cli import main

main()

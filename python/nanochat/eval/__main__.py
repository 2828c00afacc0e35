"""``python -m nanochat.eval``: the evaluation command line (see :mod:`nanochat.eval.cli`)."""

from .cli import app

app(prog_name="python -m nanochat.eval")

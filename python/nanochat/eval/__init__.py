"""Evaluation: HumanEval pass@k in a sandbox, result comparison (bits-per-byte lives beside it).

Submodules: :mod:`.sandbox` (run untrusted programs), :mod:`.passk` (unbiased pass@k), :mod:`.humaneval`
(problems, program assembly, evaluation, the generation-callback interface), :mod:`.compare` (tables and
charts across result files), :mod:`.cli` (the ``typer`` app). Import them directly; this package imports
nothing heavy.
"""

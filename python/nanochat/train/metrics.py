"""Training logs: per-step JSONL records, a rich progress bar, and the end-of-run summary + plot.

Reading the files back (``read_jsonl``, ``plot_losses``, strict JSON) lives in :mod:`nanochat.runlog`, which the run
report uses without importing the trainer."""

from __future__ import annotations

import errno
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from nanochat.runlog import finite_json, plot_losses, read_jsonl

__all__ = ["MetricsLog", "Throughput", "console", "make_progress", "plot_losses"]

console = Console(stderr=True)


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``; on resume, drops records past ``step``."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            kept = [r for r in self.read(path) if r.get("step", 0) <= resume_step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, path)
        self._f = open(path, "a")
        self._full = False

    def write(self, record: dict[str, Any]) -> None:
        """Append one record; a full disk warns once and stops the log rather than the run."""
        if self._full:
            return
        try:
            self._f.write(json.dumps(finite_json(record), allow_nan=False) + "\n")
            self._f.flush()
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self._full = True
            warnings.warn(f"{self.path}: the disk is full; metrics are no longer logged ({e})", RuntimeWarning, 2)

    def last_time(self) -> float:
        """The ``time`` of the last record kept (0 when none): where a resumed run's clock continues."""
        times = [r["time"] for r in self.read(self.path) if isinstance(r.get("time"), (int, float))]
        return float(times[-1]) if times else 0.0

    def close(self) -> None:
        try:
            self._f.close()
        except OSError as e:  # the last buffered bytes could not be written
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise

    read = staticmethod(read_jsonl)  # the records of a metrics.jsonl (nanochat.runlog, which the report uses too)


def make_progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tok_s]} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


class Throughput:
    """Tokens/s over the last step."""

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def tick(self, tokens: int) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return tokens / max(dt, 1e-9)

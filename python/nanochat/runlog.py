"""The files a training run leaves for others to read: strict JSON, ``metrics.jsonl`` records and the loss plot.

Below ``train/`` and ``eval/`` both: the trainer writes these files (``nanochat.train.metrics``,
``nanochat.train.checkpoint``), the run report reads them (``nanochat.eval.report``), and neither imports the other.
Plain Python (matplotlib only inside :func:`plot_losses`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) replaced by None: strict JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def write_json_atomic(path: Path, obj: Any) -> None:
    """Strict JSON (non-finite floats become null) via a temp file, fsync and rename; the temp never outlives us."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(finite_json(obj), f, indent=2, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file such as ``metrics.jsonl``, skipping a torn last line (a crash mid-write)."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a torn last line after a crash
    return out


def plot_losses(records: list[dict[str, Any]], out_png: Path, title: str) -> None:
    """Loss curve (train per step, validation points) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    va = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if tr:
        ax.plot(*zip(*tr), lw=1, alpha=0.8, label="train loss")
    if va:
        ax.plot(*zip(*va), "o-", lw=1.5, label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_png)

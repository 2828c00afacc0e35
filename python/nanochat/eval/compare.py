"""Compare evaluation results side by side: a rich table and a bar chart (PNG).

One row per results file. The keys read (each optional, so HumanEval, bits-per-byte and benchmark files mix):

- name: ``model.name``, else the stem of ``model.path``, else the file's stem
- params: ``model.params``, else top-level ``params``
- pass@k: every ``pass@K`` key in ``pass_at_k``; line-completion results (``benchmark: humaneval_lines``, see
  :mod:`nanochat.eval.lines`) name theirs after the variant, ``lines pass@1``, ``span+fim pass@1``..., so they never
  share a column with HumanEval's own pass@k
- bpb: top-level ``bpb`` (a number, or a dict with ``bpb``/``val_bpb``), else ``metrics.bpb``; a
  ``benchmark: humaneval_bpb`` result's ``bpb`` (or any top-level ``humaneval_bpb``) goes to the "HumanEval bpb"
  column instead, shown when some row has one
- tokens/s: ``timing.tokens_per_s``, else ``model.tokens_per_s``, else top-level ``tokens_per_s``

The chart is drawn with matplotlib's object API on an Agg canvas: no global backend switch, no display needed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

_MISSING = "—"


@dataclass
class Row:
    """The comparable numbers of one results file."""

    name: str
    path: str
    params: int | None = None
    pass_at_k: dict[str, float] = field(default_factory=dict)
    bpb: float | None = None
    tokens_per_s: float | None = None
    humaneval_bpb: float | None = None  # bits per byte of the HumanEval canonical solutions


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def row_from_result(result: Mapping[str, Any], path: str | os.PathLike[str] = "") -> Row:
    """Pick the comparable numbers out of one results document."""
    model: Mapping[str, Any] = result["model"] if isinstance(result.get("model"), Mapping) else {}
    name = model.get("name") or (Path(str(model["path"])).stem if model.get("path") else "") or Path(path).stem
    params = _number(model.get("params", result.get("params")))
    pass_at_k = {k: float(v) for k, v in (result.get("pass_at_k") or {}).items() if _number(v) is not None}
    if result.get("benchmark") == "humaneval_lines":
        from .lines import variant_label

        label = variant_label(result)
        pass_at_k = {f"{label} {k}": v for k, v in pass_at_k.items()}
    bpb_field = result.get("bpb")
    if isinstance(bpb_field, Mapping):
        bpb = _number(bpb_field.get("bpb", bpb_field.get("val_bpb")))
    else:
        bpb = _number(bpb_field)
    if bpb is None and isinstance(result.get("metrics"), Mapping):
        bpb = _number(result["metrics"].get("bpb"))
    he_bpb = _number(result.get("humaneval_bpb"))
    if result.get("benchmark") == "humaneval_bpb":
        he_bpb, bpb = bpb, None
    timing: Mapping[str, Any] = result["timing"] if isinstance(result.get("timing"), Mapping) else {}
    tps = _number(timing.get("tokens_per_s", model.get("tokens_per_s", result.get("tokens_per_s"))))
    return Row(str(name), str(path), int(params) if params is not None else None, pass_at_k, bpb, tps, he_bpb)


def load_rows(paths: Sequence[str | os.PathLike[str]]) -> list[Row]:
    """Rows for the given JSON files; names made unique by appending the file stem when they collide."""
    rows = []
    for p in paths:
        try:
            result = json.loads(Path(p).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read results file {p}: {e}") from e
        if not isinstance(result, Mapping):
            raise ValueError(f"results file {p} does not hold a JSON object")
        rows.append(row_from_result(result, p))
    names = [r.name for r in rows]
    for r in rows:
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({Path(r.path).stem})"
    return rows


def _k_order(key: str) -> tuple[str, int, str]:
    """HumanEval's ``pass@K`` first, then each line-completion variant's, by K within each."""
    m = re.fullmatch(r"(?:(.+) )?pass@(\d+)", key)
    return (m.group(1) or "", int(m.group(2)), "") if m else ("~", 1 << 30, key)


def _human(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def pass_keys(rows: Sequence[Row]) -> list[str]:
    return sorted({k for r in rows for k in r.pass_at_k}, key=_k_order)


def compare_table(rows: Sequence[Row]) -> Table:
    """Side-by-side table: model, params, pass@k..., bpb, tokens/s."""
    keys = pass_keys(rows)
    table = Table(title="nanochat evaluation", header_style="bold")
    table.add_column("model")
    table.add_column("params", justify="right")
    for k in keys:
        table.add_column(k, justify="right")
    table.add_column("bpb", justify="right")
    he = any(r.humaneval_bpb is not None for r in rows)
    if he:
        table.add_column("HumanEval bpb", justify="right")
    table.add_column("tokens/s", justify="right")
    for r in rows:
        he_cell = [f"{r.humaneval_bpb:.4f}" if r.humaneval_bpb is not None else _MISSING] if he else []
        table.add_row(
            r.name,
            _human(r.params) if r.params is not None else _MISSING,
            *[f"{100 * r.pass_at_k[k]:.2f}%" if k in r.pass_at_k else _MISSING for k in keys],
            f"{r.bpb:.4f}" if r.bpb is not None else _MISSING,
            *he_cell,
            f"{r.tokens_per_s:.1f}" if r.tokens_per_s is not None else _MISSING,
        )
    return table


def bar_chart(rows: Sequence[Row], png: str | os.PathLike[str]) -> Path:
    """Grouped bars of pass@k per model (left) and bits-per-byte per model (right), whichever exist."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with_pass = [r for r in rows if r.pass_at_k]
    keys = pass_keys(with_pass)
    with_bpb = [r for r in rows if r.bpb is not None or r.humaneval_bpb is not None]
    panels = int(bool(keys)) + int(bool(with_bpb))
    if panels == 0:
        raise ValueError("nothing to plot: no pass@k or bpb in the results")
    width = max(5.0, 1.2 * len(with_pass) * max(1, len(keys))) + max(3.0, 1.2 * len(with_bpb)) * (panels - 1)
    fig = Figure(figsize=(width, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    i = 0
    if keys:
        ax = axes[i]
        i += 1
        bar = 0.8 / len(keys)
        for j, k in enumerate(keys):
            xs = [m + (j - (len(keys) - 1) / 2) * bar for m in range(len(with_pass))]
            ax.bar(xs, [100 * r.pass_at_k.get(k, 0.0) for r in with_pass], bar, label=k)
        ax.set_xticks(range(len(with_pass)), [r.name for r in with_pass], rotation=20, ha="right")
        ax.set_ylabel("pass@k (%)")
        ax.set_ylim(0, 100)
        ax.set_title("HumanEval" if all(" " not in k for k in keys) else "HumanEval and line completion")
        ax.legend()
    if with_bpb:
        ax = axes[i]
        series = [
            (label, color, vals)
            for label, color, vals in (
                ("held-out", "tab:gray", [r.bpb for r in with_bpb]),
                ("HumanEval", "tab:olive", [r.humaneval_bpb for r in with_bpb]),
            )
            if any(v is not None for v in vals)
        ]
        bar = 0.6 / len(series)
        for j, (label, color, vals) in enumerate(series):
            xs = [m + (j - (len(series) - 1) / 2) * bar for m in range(len(with_bpb))]
            ax.bar(xs, [v if v is not None else 0.0 for v in vals], bar, color=color, label=label)
        if len(series) > 1:
            ax.legend()
        ax.set_xticks(range(len(with_bpb)), [r.name for r in with_bpb], rotation=20, ha="right")
        ax.set_ylabel("bits per byte (lower is better)")
        ax.set_title("bits per byte")
    fig.tight_layout()
    out = Path(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def compare(result_json_paths: Sequence[str | os.PathLike[str]], png: str | os.PathLike[str] | None = None) -> Table:
    """The comparison table of the given results files; also writes the bar chart when `png` is given."""
    rows = load_rows(result_json_paths)
    if png is not None:
        bar_chart(rows, png)
    return compare_table(rows)

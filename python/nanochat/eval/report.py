"""``nanochat-eval report RUN_DIR``: a Markdown report of a training run.

Collects what the run directory holds — config, parameter counts, the training curve (``loss.png``, redrawn from
``metrics.jsonl`` if missing), final loss/bpb, mHC diagnostics — plus HumanEval results (``humaneval*.json``),
line-completion results (``lines*.json``, one row per variant), bpb results (``bpb*.json``, HumanEval bpb from
``nanochat-eval bpb --humaneval`` included) and benchmark records (``bench*.json``) found in the run directory,
into ``RUN_DIR/report.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nanochat.runlog import plot_losses, read_jsonl


def _load_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _lines_section(run: Path) -> list[str]:
    """One table row per line-completion results file (``lines*.json``): variant, pass rate, pass@k, counts (overall
    and per kind of line)."""
    docs = [(f, d) for f in sorted(run.glob("lines*.json")) if isinstance(d := _load_json(f), dict)]
    docs = [(f, d) for f, d in docs if d.get("benchmark") == "humaneval_lines"]
    if not docs:
        return []
    from .lines import variant_label

    ks = sorted({k for _, d in docs for k in d.get("pass_at_k") or {} if k != "pass@1"}, key=lambda k: int(k[5:]))
    out = ["", "## Line completion (HumanEval lines)", ""]
    out.append(
        "| file | variant | pass rate | "
        + " | ".join(ks)
        + (" | " if ks else "")
        + "passed / samples | passed by kind of line | tasks | problems with a pass | tokens/s |"
    )
    out.append("|" + " --- |" * (8 + len(ks)))
    for f, d in docs:
        solved = sum(1 for e in (d.get("per_problem") or {}).values() if e.get("passed"))
        tps = (d.get("timing") or {}).get("tokens_per_s")
        cells = [
            f"`{f.name}`",
            variant_label(d)
            + (f", T={d['settings'].get('temperature')}" if d.get("settings", {}).get("temperature") else ""),
            f"{100 * float(d.get('pass_rate', 0.0)):.2f}%",
            *[f"{100 * d['pass_at_k'][k]:.2f}%" if k in (d.get("pass_at_k") or {}) else "—" for k in ks],
            f"{d.get('passed')} / {d.get('samples')}",
            " · ".join(f"{k} {e['passed']}/{e['samples']}" for k, e in (d.get("per_kind") or {}).items()) or "—",
            str(d.get("tasks")),
            f"{solved} / {len(d.get('per_problem') or {})}",
            _fmt(tps) if tps is not None else "—",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def build_report(run_dir: str | Path) -> Path:
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run}: not a run directory (config.json missing)")
    cfg = _load_json(run / "config.json") or {}
    summary = _load_json(run / "summary.json") or {}
    lines = [f"# Run report: `{run.name}`", ""]
    params = cfg.get("params") or summary.get("params") or {}
    model = cfg.get("model", {})
    lines += ["## Model", "", "| key | value |", "| --- | --- |"]
    for k in (
        "n_layer",
        "n_embd",
        "n_head",
        "n_kv_head",
        "mlp",
        "mlp_hidden",
        "residual",
        "n_streams",
        "quant",
        "vocab_size",
        "seq_len",
    ):
        if k in model:
            lines.append(f"| {k} | {_fmt(model[k])} |")
    for k, v in params.items():
        lines.append(f"| params.{k} | {v:,} |")
    lines += ["", "## Training", ""]
    if summary:
        lines += ["| key | value |", "| --- | --- |"]
        for k in (
            "steps",
            "planned_steps",
            "finished",
            "tokens",
            "first_loss",
            "final_loss",
            "final_val_loss",
            "final_val_bpb",
            "best_val_loss",
            "mean_tok_s",
            "elapsed_s",
            "world_size",
        ):
            if k in summary:
                lines.append(f"| {k} | {_fmt(summary[k])} |")
    else:
        lines.append("_No summary.json: the run has not finished._")
    metrics = run / "metrics.jsonl"
    if not (run / "loss.png").exists() and metrics.exists():
        plot_losses(read_jsonl(metrics), run / "loss.png", run.name)
    if (run / "loss.png").exists():
        lines += ["", "![training curve](loss.png)"]
    if metrics.exists():
        diag = [r for r in read_jsonl(metrics) if any(k.startswith("mhc_") for k in r)]
        if diag:
            last = diag[-1]
            lines += [
                "",
                f"mHC diagnostics at step {last['step']}: "
                + ", ".join(f"{k[4:]} = {_fmt(v)}" for k, v in last.items() if k.startswith("mhc_")),
            ]
    lines += _lines_section(run)
    for title, pattern in (
        ("Bits per byte", "bpb*.json"),
        ("HumanEval", "humaneval*.json"),
        ("Benchmarks", "bench*.json"),
    ):
        files = sorted(run.glob(pattern))
        if not files:
            continue
        lines += ["", f"## {title}", ""]
        for f in files:
            data = _load_json(f)
            lines.append(f"### `{f.name}`")
            if isinstance(data, dict) and "pass_at_k" in data:
                lines += ["", "| metric | value |", "| --- | --- |"]
                for k, v in (data.get("pass_at_k") or {}).items():
                    lines.append(f"| {k} | {_fmt(v)} |")
            elif isinstance(data, dict):
                lines += ["", "| key | value |", "| --- | --- |"]
                lines += [f"| {k} | {_fmt(v)} |" for k, v in data.items() if not isinstance(v, (dict, list))]
            elif isinstance(data, list) and data and isinstance(data[0], dict):
                keys = list(data[0].keys())
                lines += ["", "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
                lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in data[:50]]
            lines.append("")
    out = run / "report.md"
    tmp = out.with_name(".report.md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    return out

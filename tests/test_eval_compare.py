"""compare: rows picked from results files, the side-by-side table, the PNG chart, and the CLI command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from nanochat.eval import cli
from nanochat.eval.compare import bar_chart, compare, load_rows, row_from_result

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _render(table) -> str:  # type: ignore[no-untyped-def]
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


@pytest.fixture
def results(tmp_path: Path) -> list[Path]:
    a = {
        "benchmark": "humaneval",
        "model": {"name": "small", "params": 125_000_000},
        "pass_at_k": {"pass@1": 0.125, "pass@10": 0.3},
        "timing": {"tokens_per_s": 250.5},
    }
    b = {
        "benchmark": "humaneval",
        "model": {"path": "/models/big.gguf", "params": 1_200_000_000, "tokens_per_s": 80},
        "pass_at_k": {"pass@1": 0.25},
    }
    c = {"benchmark": "bpb", "model": {"name": "small"}, "bpb": {"bpb": 0.9876}}
    paths = []
    for name, doc in (("a", a), ("b", b), ("c", c)):
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(doc))
        paths.append(p)
    return paths


def test_rows_pick_the_right_keys(results: list[Path]) -> None:
    small, big, bpb = load_rows(results)
    assert (small.name, small.params, small.pass_at_k, small.bpb, small.tokens_per_s) == (
        "small (a)",
        125_000_000,
        {"pass@1": 0.125, "pass@10": 0.3},
        None,
        250.5,
    )
    assert (big.name, big.params, big.tokens_per_s, big.pass_at_k) == ("big", 1_200_000_000, 80.0, {"pass@1": 0.25})
    assert (bpb.name, bpb.bpb, bpb.pass_at_k) == ("small (c)", 0.9876, {})  # duplicate names get the file stem
    assert row_from_result({"bpb": 1.5, "params": 7}, "x.json").bpb == 1.5
    assert row_from_result({"metrics": {"bpb": 2.0}}, "y.json").name == "y"


def test_table_side_by_side(results: list[Path]) -> None:
    text = _render(compare(results))
    header = next(line for line in text.splitlines() if "model" in line)
    cols = [c.strip() for c in header.strip("┃│ ").replace("┃", "│").split("│")]
    assert cols == ["model", "params", "pass@1", "pass@10", "bpb", "tokens/s"]
    assert "12.50%" in text and "30.00%" in text and "25.00%" in text
    assert "125.0M" in text and "1.2B" in text and "0.9876" in text and "250.5" in text
    big_line = next(line for line in text.splitlines() if line.strip("│ ").startswith("big"))
    assert "—" in big_line  # pass@10 and bpb missing for that model


def test_png_chart(results: list[Path], tmp_path: Path) -> None:
    png = tmp_path / "charts" / "cmp.png"
    compare(results, png=png)
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > height > 100  # two panels side by side
    with pytest.raises(ValueError, match="nothing to plot"):
        bar_chart(load_rows([]), tmp_path / "empty.png")


def test_cli_compare(results: list[Path], tmp_path: Path) -> None:
    png = tmp_path / "out.png"
    r = CliRunner().invoke(cli.app, ["compare", *map(str, results), "--png", str(png)])
    assert r.exit_code == 0, r.output
    assert "pass@10" in r.output and png.read_bytes()[:8] == PNG_MAGIC
    r = CliRunner().invoke(cli.app, ["compare", str(tmp_path / "missing.json")])
    assert r.exit_code == 2 and "no such file" in r.output
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    r = CliRunner().invoke(cli.app, ["compare", str(bad)])
    assert r.exit_code == 2 and "JSON object" in r.output

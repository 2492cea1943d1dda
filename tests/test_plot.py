"""`mlxft plot`: two short demo runs drawn as a PNG (its size, and every curve's points equal
to metrics.jsonl), and as an HTML page that headless Chromium renders with the curves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mlxft.cli import main
from tests.conftest import REPO, STORIES, write_wikisql

pytest.importorskip("matplotlib", reason="mlxft[plot] (matplotlib) is not installed")


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """configs/demo.yaml, 10 steps on 64 of its examples, at two learning rates."""
    root = tmp_path_factory.mktemp("plot_runs")
    data = write_wikisql(root / "data", 64, 8)
    runs = []
    for lr in ("3e-3", "1e-3"):
        out = root / f"lr{lr}"
        result = cli(
            "lora",
            "--config",
            REPO / "configs" / "demo.yaml",
            "--model",
            STORIES,
            "--data",
            data,
            "--adapter-path",
            out,
            "--iters",
            "10",
            "--steps-per-report",
            "2",
            "--steps-per-eval",
            "5",
            "--val-batches",
            "1",
            "--max-seq-length",
            "96",
            "--learning-rate",
            lr,
            "--warmup",
            "2",
        )
        assert result.exit_code == 0, result.output
        runs.append(out)
    return runs


def rows(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def lines_by_label(fig) -> dict:
    """Each drawn line by its label, or by its gid when it has one (the best-step star)."""
    return {line.get_gid() or line.get_label(): line for ax in fig.axes for line in ax.get_lines()}


@pytest.mark.slow
def test_png_of_two_runs_has_their_curves(two_runs, tmp_path):
    import matplotlib.image

    from mlxft.plotting import plot

    png = tmp_path / "loss.png"
    fig, runs = plot(two_runs, png)
    assert [r.name for r in runs] == ["lr3e-3", "lr1e-3"]
    height, width, _ = matplotlib.image.imread(str(png)).shape
    assert (width, height) == (
        800,
        640,
    )  # 8 x 6.4 inches at 100 dpi: a loss panel and a learning-rate panel
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "learning_rate"]
    lines = lines_by_label(fig)
    for run in two_runs:
        train = [r for r in rows(run) if "train_loss" in r]
        val = [r for r in rows(run) if "val_loss" in r]
        assert len(train) == 5 and [r["step"] for r in val] == [0, 5, 10]
        for label, points, key in (
            (f"{run.name}: train_loss", train, "train_loss"),
            (f"{run.name}: val_loss", val, "val_loss"),
            (f"{run.name}: learning_rate", train, "learning_rate"),
        ):
            np.testing.assert_array_equal(
                lines[label].get_xdata(), [r["step"] for r in points], err_msg=label
            )
            np.testing.assert_array_equal(
                lines[label].get_ydata(), [r[key] for r in points], err_msg=label
            )
        assert lines[f"{run.name}: val_loss"].get_marker() == "o"
        best = min(val, key=lambda r: r["val_loss"])
        star = lines[f"{run.name}: best val_loss"]
        assert star.get_marker() == "*"
        assert (list(star.get_xdata()), list(star.get_ydata())) == (
            [best["step"]],
            [best["val_loss"]],
        )
    colours = {lines[f"{run.name}: train_loss"].get_color() for run in two_runs}
    assert len(colours) == 2  # each run its own colour


@pytest.mark.slow
def test_cli_metrics_option_and_formats(two_runs, tmp_path):
    result = cli(
        "plot",
        *two_runs,
        "--save-path",
        tmp_path / "tps.svg",
        "--metrics",
        "val_loss, tokens_per_second",
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"Wrote {tmp_path / 'tps.svg'} (2 runs: lr3e-3, lr1e-3)"
    assert (tmp_path / "tps.svg").read_text().lstrip().startswith("<?xml")
    result = cli("plot", two_runs[0] / "metrics.jsonl", "--save-path", tmp_path / "one.pdf")
    assert result.exit_code == 0 and (tmp_path / "one.pdf").read_bytes().startswith(b"%PDF")


def test_runs_of_one_name_and_a_line_cut_by_a_kill(tmp_path):
    from mlxft.plotting import load_runs

    for parent, loss in (("a", 2.0), ("b", 3.0)):
        run = tmp_path / parent / "run"
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(
            json.dumps({"step": 1, "train_loss": loss}) + '\n{"step": 2, "tra'
        )
    runs = load_runs([tmp_path / "a" / "run", tmp_path / "b" / "run"])
    assert [r.name for r in runs] == ["a/run", "b/run"]
    assert [r.rows for r in runs] == [
        [{"step": 1, "train_loss": 2.0}],
        [{"step": 1, "train_loss": 3.0}],
    ]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_html_page_renders_the_figure_in_chromium(two_runs, tmp_path):
    import matplotlib.image

    page = tmp_path / "runs.html"
    result = cli("plot", *two_runs, "--save-path", page)
    assert result.exit_code == 0, result.output
    text = page.read_text()
    assert "<svg" in text and "lr3e-3" in text and "lr1e-3" in text
    # self-contained: nothing to fetch (XML namespace names are names, not fetched)
    assert not re.search(
        r"""(src|href)\s*=\s*["']?(https?:|//)|url\(\s*["']?(https?:|//)|<link|<script|@import""",
        text,
    )
    browser = chromium()
    if browser is None:
        pytest.skip(
            "chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)"
        )
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1000,900",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert shot.is_file(), proc.stderr[-2000:]
    pixels = (matplotlib.image.imread(str(shot))[..., :3] * 255).round().astype(int)
    assert pixels.shape[:2] == (900, 1000)
    assert (pixels.sum(axis=2) < 700).mean() > 0.01, "the page is blank"

    def share(colour: str) -> float:  # pixels within a small distance of a matplotlib colour
        rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
        return (np.abs(pixels - rgb).sum(axis=2) < 40).mean()

    assert share("#1f77b4") > 0.001 and share("#ff7f0e") > 0.001, (
        "the two runs' curves (C0, C1) are not on the page"
    )

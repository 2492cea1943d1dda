"""Pictures of runs: curves from metrics.jsonl (`mlxft plot`), and the matplotlib set-up that
`mlxft bench --plot` shares.

A figure has one panel for the losses (`*_loss`: training as lines, validation as markers,
each run's lowest validation loss starred) and one panel per other metric, every run
overlaid in its own colour under its name.  A metric's points come from the training rows
when they carry it (a `learning_rate` of the evaluation row at the same step would double
it), else from every row that has it.  The figure is written as PNG, SVG or PDF by the path's
extension, or as a self-contained HTML page (the figure as inline SVG: no network, no script).
"""

from __future__ import annotations

import difflib
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

from mlxft.errors import UserError
from mlxft.fileio import atomic_file, write_text

DEFAULT_METRICS = ("train_loss", "val_loss", "learning_rate")
FORMATS = (".png", ".svg", ".pdf", ".html")


def pyplot():
    """matplotlib.pyplot drawing to files only (the Agg backend: no display, no GUI toolkit)."""
    try:
        import matplotlib
    except ImportError:
        raise UserError(
            "plotting needs matplotlib, which is not installed: pip install 'mlxft[plot]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass
class Run:
    name: str
    path: Path  # its metrics.jsonl
    rows: list

    def series(self, key: str) -> tuple:
        """(steps, values) of `key`: from the training rows when they carry it, else every row."""
        rows = [r for r in self.rows if "train_loss" in r and key in r] or [
            r for r in self.rows if key in r
        ]
        return [r["step"] for r in rows], [r[key] for r in rows]

    def keys(self) -> set:
        return {k for r in self.rows for k in r if k != "step"}


def read_metrics(path: Path) -> list:
    """The rows of a metrics.jsonl; a last line cut short (a run being written or killed) is
    left out, any other bad line is an error naming it."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(
            f"{path}: cannot read ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            if number == len(lines):
                break
            raise UserError(
                f"{path}:{number}: invalid JSON ({str(err).splitlines()[0]}); "
                "metrics.jsonl has one "
                "JSON object per line"
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise UserError(
                f"{path}:{number}: not a metrics row (a JSON object with an integer 'step')"
            )
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no metrics rows yet")
    return rows


def load_runs(paths) -> list:
    """Each RUN (an adapter_path directory or a metrics.jsonl file) named after its directory;
    two runs with one name get their parent's name too."""
    runs = []
    for raw in paths:
        path = Path(raw)
        metrics = path / "metrics.jsonl" if path.is_dir() else path
        if not metrics.is_file():
            what = "no metrics.jsonl in this directory" if path.is_dir() else "not found"
            raise UserError(
                f"{path}: {what}; pass an adapter_path directory of `mlxft lora` "
                "or its metrics.jsonl"
            )
        runs.append(Run(metrics.resolve().parent.name, metrics, read_metrics(metrics)))
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.path.resolve().parent.parent.name}/{run.name}"
    return runs


def check_metrics(runs: list, metrics) -> list:
    """The metrics at least one run has; an error naming a metric no run has."""
    have = set().union(*(r.keys() for r in runs))
    for key in metrics:
        if key not in have:
            hint = difflib.get_close_matches(key, sorted(have), n=1, cutoff=0.6)
            raise UserError(
                f"--metrics: no run has '{key}'"
                + (f"; did you mean '{hint[0]}'?" if hint else "")
                + f" (the runs have: {', '.join(sorted(have))})"
            )
    return list(metrics)


def figure(runs: list, metrics=DEFAULT_METRICS):
    """The matplotlib Figure: a loss panel (when a `*_loss` metric is asked for) and a panel for
    each other metric; lines are labelled `<run>: <metric>`, the best-step star has the gid
    `<run>: best val_loss`."""
    plt = pyplot()
    metrics = check_metrics(runs, metrics)
    losses = [m for m in metrics if m.endswith("_loss")]
    panels = ([losses] if losses else []) + [[m] for m in metrics if m not in losses]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(8, 1.2 + 2.6 * len(panels)), sharex=True, squeeze=False
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]
        for ax, keys in zip(axes[:, 0], panels):
            for key in keys:
                _draw(ax, run, key, colour)
    for ax, keys in zip(axes[:, 0], panels):
        ax.set_ylabel("loss" if keys is losses else keys[0])
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(", ".join(r.name for r in runs))
    fig.tight_layout()
    return fig


def _draw(ax, run: Run, key: str, colour: str) -> None:
    steps, values = run.series(key)
    if not steps:
        return
    label = f"{run.name}: {key}"
    if key == "train_loss" or not key.endswith("_loss"):
        ax.plot(steps, values, "-", color=colour, linewidth=1.5, label=label)
        return
    ax.plot(steps, values, "o", linestyle=":", color=colour, markersize=5, linewidth=1, label=label)
    best = min(range(len(values)), key=values.__getitem__)
    ax.plot(
        [steps[best]],
        [values[best]],
        "*",
        color=colour,
        markersize=15,
        markeredgecolor="black",
        label="_best",  # "_": not in the legend (the annotation says it)
        gid=f"{run.name}: best {key}",
    )
    right = steps[best] > (steps[0] + steps[-1]) / 2  # the label goes inwards, not off the axes
    ax.annotate(
        f"{values[best]:.3f} @ {steps[best]}",
        (steps[best], values[best]),
        textcoords="offset points",
        xytext=(-8 if right else 8, 8),
        ha="right" if right else "left",
        fontsize=8,
        color=colour,
    )


def check_save_path(path: Path) -> None:
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise UserError(
            f"--save-path {path}: unknown picture type '{path.suffix}'; "
            f"use one of {', '.join(FORMATS)}"
        )
    if path.is_dir():
        raise UserError(
            f"--save-path {path}: is a directory; name a file such as {path / 'loss.png'}"
        )


def save(fig, path: Path, runs: list) -> Path:
    """Write `fig` by the extension of `path` (atomically); .html: a page with the figure."""
    path = Path(path)
    check_save_path(path)
    suffix = path.suffix.lower()
    if suffix == ".html":
        write_text(path, page(fig, runs))
    else:
        with atomic_file(path) as handle:
            fig.savefig(handle, format=suffix[1:], dpi=100)
    return path


def page(fig, runs: list) -> str:
    """A self-contained HTML page: the figure as inline SVG and each run's best validation loss."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})  # the same runs give the same page
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]  # the XML prolog and DOCTYPE do not belong inside HTML
    rows = []
    for run in runs:
        steps, values = run.series("val_loss")
        best = f"{min(values):.4f} at step {steps[values.index(min(values))]}" if values else "—"
        last = run.series("train_loss")[1]
        rows.append(
            f"<tr><td>{html.escape(run.name)}</td><td>{html.escape(str(run.path))}</td>"
            f"<td>{f'{last[-1]:.4f}' if last else '—'}</td><td>{best}</td></tr>"
        )
    title = html.escape(", ".join(r.name for r in runs))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mlxft: {title}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} svg{{max-width:100%;height:auto}}
table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}</style>
</head><body><h1>{title}</h1>
{svg}
<table><tr><th>run</th><th>metrics</th><th>last train loss</th><th>best val loss</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""


def plot(paths, save_path: Path, metrics=DEFAULT_METRICS):
    """`mlxft plot`: read the runs, draw, write; returns (figure, runs)."""
    check_save_path(save_path)
    runs = load_runs(paths)
    fig = figure(runs, metrics)
    save(fig, save_path, runs)
    return fig, runs

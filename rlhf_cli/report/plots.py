"""PNG plots of every logged metric against step, one line per run.

Figures are drawn with matplotlib's object API, whose PNG output goes through the Agg canvas: no
pyplot state, no display needed. A run keeps its colour in every plot. Evaluation points (eval/*) are
sparse, so they are drawn as markers joined by a line; training metrics as plain lines.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from rlhf_cli.report.collect import ACCURACY, PAIR_ACCURACY_STAGES, ReportedRun, metric_order

# The small multiples of the overview, those that any run logged.
OVERVIEW_METRICS = ("loss", ACCURACY, "reward/mean", "kl")
OVERVIEW_FILE = "overview.png"
# Beyond this many runs a legend inside the axes hides the lines; it moves to the right of the figure.
LEGEND_INSIDE_MAX_RUNS = 4
DPI = 110


@dataclass
class Plot:
    file: str  # the PNG's name in the report directory
    metric: Optional[str]  # None for the overview


def write_plots(runs: list[ReportedRun], directory: Path) -> list[Plot]:
    """The overview and one PNG per metric, written into `directory`."""
    plots = []
    overview = overview_figure(runs)
    if overview is not None:
        overview.savefig(directory / OVERVIEW_FILE, dpi=DPI)
        plots.append(Plot(OVERVIEW_FILE, None))
    for metric in metric_names(runs):
        file = re.sub(r"[^A-Za-z0-9_.=-]+", "-", metric) + ".png"
        metric_figure(metric, runs).savefig(directory / file, dpi=DPI)
        plots.append(Plot(file, metric))
    return plots


def metric_names(runs: list[ReportedRun]) -> list[str]:
    """Every metric any run logged: training metrics (loss first), then eval/*, each alphabetically."""
    return sorted({name for run in runs for name in run.series}, key=metric_order)


def metric_figure(metric: str, runs: list[ReportedRun]) -> Figure:
    legend_outside = len(runs) > LEGEND_INSIDE_MAX_RUNS
    # The legend beside the axes widens the figure rather than narrowing the plot.
    width = 6.4 + (_legend_entry_width([run.label for run in runs]) if legend_outside else 0)
    figure = Figure(figsize=(width, 4.0), layout="constrained")
    axes = figure.add_subplot()
    _draw(axes, metric, runs, runs)
    axes.set_title(metric, fontsize=12, fontweight="bold")
    if legend_outside:
        figure.legend(loc="outside right upper", fontsize="small", frameon=False)
    elif len(runs) > 1:
        axes.legend(fontsize="small", framealpha=0.8)
    return figure


def overview_figure(runs: list[ReportedRun]) -> Optional[Figure]:
    """A grid of the key metrics (OVERVIEW_METRICS) that any run logged; None when none did."""
    shown = [metric for metric in OVERVIEW_METRICS if any(metric in run.series for run in runs)]
    if not shown:
        return None
    columns = min(len(shown), 2)
    rows = math.ceil(len(shown) / columns)
    figure = Figure(figsize=(5.2 * columns, 3.4 * rows), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    for axes, metric in zip(grid.flat, shown):
        drawn = [run for run in runs if metric != ACCURACY or run.stage not in PAIR_ACCURACY_STAGES]
        _draw(axes, metric, drawn, runs)
        axes.set_title(metric, fontsize=11, fontweight="bold")
    for unused in list(grid.flat)[len(shown):]:
        unused.remove()
    figure.suptitle("Key metrics", fontsize=13, fontweight="bold")
    if len(runs) > 1:
        # One entry per run drawn in any panel, as a plain line: panels differ in their markers.
        labels = [label for axes in figure.axes for label in axes.get_legend_handles_labels()[1]]
        drawn = [run for run in runs if run.label in labels]
        handles = [Line2D([], [], **_run_style(run, runs)) for run in drawn]
        labels = [run.label for run in drawn]
        columns = max(1, min(len(labels), int(figure.get_figwidth() // _legend_entry_width(labels))))
        figure.legend(handles, labels, loc="outside lower center", ncols=columns, frameon=False)
    return figure


def _draw(axes: Axes, metric: str, drawn: list[ReportedRun], runs: list[ReportedRun]) -> None:
    """The `drawn` runs' lines of `metric`, each in its colour among all the report's `runs`."""
    evaluation = metric.startswith("eval/")
    for run in drawn:
        series = run.series.get(metric)
        if series is None:
            continue
        # A lone training point would be invisible as a line.
        marker = "o" if evaluation or len(series.steps) == 1 else None
        axes.plot(series.steps, series.values, label=run.label, marker=marker, markersize=4, **_run_style(run, runs))
    axes.set_xlabel("step")
    axes.set_ylabel(metric)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.spines[["top", "right"]].set_visible(False)


def _run_style(run: ReportedRun, runs: list[ReportedRun]) -> dict[str, object]:
    """A run's colour, from its place in the report, so the same in every plot; past ten runs the
    colours repeat with another dash."""
    index = runs.index(run)
    return {"color": f"C{index % 10}", "linestyle": ("-", "--", ":")[index // 10 % 3], "linewidth": 1.6}


def _legend_entry_width(labels: list[str]) -> float:
    """Inches a legend entry takes at fontsize "small": the line sample and padding, then the text."""
    return 0.7 + 0.07 * max(len(label) for label in labels)

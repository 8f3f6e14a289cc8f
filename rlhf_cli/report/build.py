"""rlhf report: the plots, tables and sample generations of one or more runs, written as a page (HTML or
Markdown) with its PNGs beside it, and a short summary on the terminal."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table
from rich.text import Text

from rlhf_cli.errors import UserError
from rlhf_cli.metrics import format_metrics
from rlhf_cli.report.collect import ReportedRun, collect_evaluations, collect_runs
from rlhf_cli.report.document import PageFormat, page_name, render
from rlhf_cli.report.page import page_blocks
from rlhf_cli.report.plots import write_plots
from rlhf_cli.runs import publish_directory

REPORT_DIR = "report"  # the default output, inside the one RUN_DIR
# The final metrics the terminal summary shows, the first few of these a run has.
NOTE_METRICS = ("eval/accuracy", "eval/loss", "loss", "reward/mean", "kl", "accuracy")
NOTE_METRICS_SHOWN = 3
_STATUS_STYLE = {"completed": "green", "running": "yellow", "failed": "red"}


@dataclass
class Report:
    page: Path
    runs: list[ReportedRun]
    sample_notes: dict[str, str]  # run label -> why it has no sample generations


def write_report(run_dirs: list[Path], out: Optional[Path], samples: int, page_format: PageFormat) -> Report:
    # 1. The runs, and where their report goes.
    runs = collect_runs(run_dirs)
    target = _output_directory(run_dirs, out, runs)

    # 2. Everything is written into a temporary sibling and renamed into place once whole: a crash
    #    leaves the previous report (or none), never a half one.
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        plots = write_plots(runs, tmp)
        generations, sample_notes = _generations(runs, samples)
        title = "rlhf report: " + ", ".join(str(run_dir) for run_dir in run_dirs)
        page = render(page_format, title, page_blocks(runs, plots, generations, sample_notes, collect_evaluations(run_dirs)))
        (tmp / page_name(page_format)).write_text(page, encoding="utf-8")
        publish_directory(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Report(target / page_name(page_format), runs, sample_notes)


def _output_directory(run_dirs: list[Path], out: Optional[Path], runs: list[ReportedRun]) -> Path:
    """--out, or report/ inside the one RUN_DIR. An existing directory is replaced only when it is an
    earlier report (or empty): never a run, nor a directory holding one."""
    if out is None:
        if len(run_dirs) > 1:
            raise UserError("several RUN_DIRs: say where their report goes with --out DIR")
        out = run_dirs[0] / REPORT_DIR
    if not out.exists():
        return out
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    resolved = out.resolve()
    if any(resolved == run.path.resolve() or resolved in run.path.resolve().parents for run in runs):
        raise UserError(f"{out}: holds the runs being reported; choose another --out")
    if any(out.iterdir()) and not any((out / page_name(page_format)).is_file() for page_format in PageFormat):
        raise UserError(f"{out}: not an earlier report (no {' or '.join(page_name(f) for f in PageFormat)}); "
                        "choose another --out or empty it")
    return out


def _generations(runs: list[ReportedRun], count: int) -> tuple[dict, dict[str, str]]:
    """Each run's sample generations, and for the runs whose rows or model could not be loaded, why.
    Such a run is noted, not an error: its plots and tables are still worth the report."""
    if count == 0:
        return {}, {}
    from rlhf_cli.report.samples import sample_generations  # torch and transformers load only to sample

    generations, notes = {}, {}
    for run in runs:
        try:
            found = sample_generations(run, count)
        except UserError as exc:
            notes[run.label] = str(exc)
            continue
        if found:
            generations[run.label] = found
    return generations, notes


def print_summary(report: Report, console: Console) -> None:
    """One screen: each run's stage, status, steps and final metrics of note; the page's path last."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("run", overflow="fold")  # a long sweep job name wraps rather than losing its end
    for column in ("stage", "status", "steps", "final metrics"):
        table.add_column(column)
    for run in report.runs:
        noted = [key for key in NOTE_METRICS if run.final_metrics.get(key) is not None][:NOTE_METRICS_SHOWN]
        figures = format_metrics({key: run.final_metrics[key] for key in noted}) or "–"
        # Text cells: a sweep job's label may hold brackets that rich would read as markup.
        table.add_row(Text(run.label), run.stage, Text(run.status, style=_STATUS_STYLE.get(run.status, "")),
                      run.steps_done(), Text(figures))
    console.print(table)
    for label, note in report.sample_notes.items():
        console.print(f"{label}: no sample generations: {note}", style="yellow", markup=False, highlight=False)
    console.print(f"report: {report.page}", soft_wrap=True, markup=False, highlight=False)

"""What the report page shows, in order: the runs (stage, status, steps, what each started from), the
held-out accuracy after each stage, the final metrics, the plots, sample generations, and each run's
resolved config."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import yaml

from rlhf_cli.metrics import format_value
from rlhf_cli.report.collect import (
    ACCURACY,
    PAIR_ACCURACY_STAGES,
    ReportedRun,
    describe_parents,
    metric_order,
    parent_run,
)
from rlhf_cli.report.document import Block, Collapsible, Heading, Images, Paragraph, Table
from rlhf_cli.report.plots import Plot

if TYPE_CHECKING:
    from rlhf_cli.report.samples import Sample  # imports torch


def page_blocks(runs: list[ReportedRun], plots: list[Plot], samples: dict[str, list[Sample]],
                sample_notes: dict[str, str], evaluations: list[tuple[Path, dict[str, Any]]]) -> list[Block]:
    """`samples` and `sample_notes` are keyed by run label: the generations, or why there are none;
    `evaluations` are the eval.json files of `rlhf eval` found beside the runs."""
    blocks: list[Block] = [Heading("Runs"), runs_table(runs)]
    blocks += [Paragraph(f"{run.label} failed: {run.manifest['error']}") for run in runs if run.manifest.get("error")]
    accuracy = accuracy_table(runs)
    if accuracy is not None:
        blocks += [Heading("Held-out accuracy"),
                   Paragraph(f"{ACCURACY} after each run (greedy exact match on the evaluation rows with an answer), "
                             "and its change over the run it started from."), accuracy]
    metrics = final_metrics_table(runs)
    if metrics is not None:
        blocks += [Heading("Final metrics"), metrics]
    if evaluations:
        blocks += [Heading("Evaluations (rlhf eval)")] + [evaluation_table(path, result) for path, result in evaluations]
    blocks += _plot_blocks(plots)
    if samples or sample_notes:
        blocks.append(Heading("Sample generations"))
        for run in runs:
            if samples.get(run.label):
                blocks += [Heading(f"{run.label} ({run.stage})", 3), _samples_table(samples[run.label])]
            elif run.label in sample_notes:
                blocks += [Heading(f"{run.label} ({run.stage})", 3), Paragraph(f"No samples: {sample_notes[run.label]}")]
    blocks.append(Heading("Resolved configs"))
    blocks += [Collapsible(f"{run.label} ({run.stage}): {run.path}", yaml.safe_dump(run.config, sort_keys=False))
               for run in runs]
    return blocks


def runs_table(runs: list[ReportedRun]) -> Table:
    rows = [[run.label, run.stage, run.status, run.steps_done(), describe_parents(run, runs) or "–", str(run.path)]
            for run in runs]
    return Table(["run", "stage", "status", "steps", "started from", "directory"], rows)


def accuracy_table(runs: list[ReportedRun]) -> Optional[Table]:
    """eval/accuracy of each policy run, and its change over the run it started from when that run is
    in the report too (sft -> dpo / grpo / ppo for a chain). None when no run measured it."""
    rows = []
    for run in runs:
        accuracy = run.final_metrics.get(ACCURACY)
        if run.stage in PAIR_ACCURACY_STAGES or accuracy is None:
            continue
        parent = parent_run(run, runs)
        before = parent.final_metrics.get(ACCURACY) if parent is not None else None
        change = f"{accuracy - before:+.3f} over {parent.label}" if before is not None else "–"
        rows.append([run.label, run.stage, parent.label if parent is not None else "–", f"{accuracy:.3f}", change])
    return Table(["run", "stage", "from", ACCURACY, "change"], rows) if rows else None


def final_metrics_table(runs: list[ReportedRun]) -> Optional[Table]:
    """One row per metric, one column per run that finished ('steps' is in the runs table)."""
    finished = [run for run in runs if run.final_metrics]
    names = sorted({name for run in finished for name in run.final_metrics if name != "steps"}, key=metric_order)
    if not names:
        return None
    rows = [[name] + [_cell(name, run.final_metrics.get(name)) for run in finished] for name in names]
    return Table(["metric"] + [run.label for run in finished], rows)


def evaluation_table(path: Path, result: dict[str, Any]) -> Table:
    """One eval.json: each metric's value, or why it was skipped, under the model it evaluated."""
    model = (result.get("model") or {}).get("path", "?")
    rows = [[name, _cell(name, value), f"{model} ({path})"] for name, value in result.get("metrics", {}).items()]
    rows += [[name, "skipped", reason] for name, reason in result.get("skipped", {}).items()]
    return Table(["metric", "value", "model / reason"], rows)


def _cell(name: str, value: Any) -> str:
    return "–" if value is None else format_value(name, value)


def _plot_blocks(plots: list[Plot]) -> list[Block]:
    overview = [plot.file for plot in plots if plot.metric is None]
    training = [plot.file for plot in plots if plot.metric is not None and not plot.metric.startswith("eval/")]
    evaluation = [plot.file for plot in plots if plot.metric is not None and plot.metric.startswith("eval/")]
    blocks: list[Block] = [Heading("Plots")]
    if overview:
        blocks.append(Images(overview))
    for title, files in (("Training metrics", training), ("Evaluation metrics", evaluation)):
        if files:
            blocks += [Heading(title, 3), Images(files)]
    return blocks


def _samples_table(samples: list[Sample]) -> Table:
    return Table(["prompt", "expected", "completion", "match"],
                 [[s.prompt, s.expected, s.completion, "yes" if s.correct else "no"] for s in samples])

"""The runs a report covers: each RUN_DIR argument resolved to stage run directories, read with their
manifests and logged metrics.

A RUN_DIR is one stage run (it holds manifest.json) or a directory whose children are stage runs: the
stages of a chain (runs/default/{sft,rm,dpo,...}) or the jobs of a sweep (<output_dir>-sweep/<time>/).
Only direct children count, so a chain's report does not swallow a sweep kept inside it.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

from rlhf_cli.errors import UserError
from rlhf_cli.runs import EVAL_JSON, MANIFEST, RunDir

# Stages in the order a chain runs them; runs of one directory are listed in this order.
STAGE_ORDER = ("sft", "train-rm", "dpo", "grpo", "ppo")
ACCURACY = "eval/accuracy"
# A reward model's eval/accuracy is the share of preference pairs it ranks right; the policies' is
# greedy exact match of answers. Tables and the overview of answer accuracy leave these stages out.
PAIR_ACCURACY_STAGES = ("train-rm",)


@dataclass
class Series:
    """One metric of one run: its logged values in step order."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@dataclass
class ReportedRun:
    path: Path
    manifest: dict[str, Any]
    metrics: list[dict[str, Any]]  # the rows of metrics.jsonl
    label: str = ""  # how plots and tables name the run; set once every run of the report is known

    @property
    def stage(self) -> str:
        return self.manifest.get("stage", "?")

    @property
    def status(self) -> str:
        return self.manifest.get("status", "?")

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.get("config") or {}

    @property
    def final_metrics(self) -> dict[str, Any]:
        return self.manifest.get("final_metrics") or {}

    def steps_done(self) -> str:
        """'done/planned' optimizer steps ('done' alone when the plan is unknown): the last logged step,
        against the steps the run finished with or, while it runs, train.max_steps."""
        done = max((row["step"] for row in self.metrics), default=0)
        planned = self.final_metrics.get("steps") or (self.config.get("train") or {}).get("max_steps")
        return f"{done}/{planned}" if planned else str(done)

    @cached_property
    def series(self) -> dict[str, Series]:
        """Every numeric metric the run logged, by name (booleans and non-finite values left out)."""
        found: dict[str, Series] = {}
        for row in self.metrics:
            for key, value in row.items():
                if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    continue
                series = found.setdefault(key, Series())
                series.steps.append(row["step"])
                series.values.append(float(value))
        return found


def collect_runs(run_dirs: list[Path]) -> list[ReportedRun]:
    """The stage runs under the RUN_DIR arguments, in argument order, each directory's runs in chain
    order, labelled by their path below the directory the runs have in common."""
    runs: list[ReportedRun] = []
    seen: set[Path] = set()
    for run_dir in run_dirs:
        found = _runs_in(run_dir)
        if not any(run.metrics for run in found):
            where = "its runs have" if len(found) > 1 else "it has"
            raise UserError(f"{run_dir}: holds no metrics ({where} no metrics.jsonl with a logged step)")
        runs += [run for run in found if run.path.resolve() not in seen]
        seen.update(run.path.resolve() for run in found)
    _label(runs)
    return runs


def collect_evaluations(run_dirs: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """The eval.json files `rlhf eval` wrote in the RUN_DIRs or their direct subdirectories
    (its default output is `<from_run>/eval/`), with their paths."""
    found = []
    for run_dir in run_dirs:
        for path in sorted([run_dir / EVAL_JSON, *run_dir.glob(f"*/{EVAL_JSON}")]):
            if path.is_file():
                try:
                    found.append((path, json.loads(path.read_text(encoding="utf-8"))))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise UserError(f"{path}: not JSON") from None
    return found


def _runs_in(run_dir: Path) -> list[ReportedRun]:
    if not run_dir.exists():
        raise UserError(f"{run_dir}: no such directory")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory (a run directory holds {MANIFEST})")
    if (run_dir / MANIFEST).is_file():
        return [_read_run(run_dir)]
    found = [_read_run(child) for child in run_dir.iterdir() if (child / MANIFEST).is_file()]
    if not found:
        nested = sorted({manifest.parent.parent for manifest in run_dir.glob(f"*/*/{MANIFEST}")})
        hint = f"; the runs are a level down: pass one of {', '.join(map(str, nested))}" if nested else ""
        raise UserError(f"{run_dir}: not a run directory (no {MANIFEST} in it or in its direct subdirectories){hint}")
    return sorted(found, key=lambda run: (_stage_rank(run.stage), _natural_key(run.path.name)))


def _read_run(path: Path) -> ReportedRun:
    run_dir = RunDir(path)
    manifest = run_dir.read_manifest()
    if not isinstance(manifest, dict):
        raise UserError(f"{run_dir.manifest_path}: not a run manifest (a JSON object)")
    return ReportedRun(path=path, manifest=manifest, metrics=read_metrics(run_dir.metrics_path))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The logged rows of a metrics.jsonl; none when it is missing. A cut-off last line is left out:
    a run writing its next line, or killed while writing it, leaves one."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise UserError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise UserError(f"{path}:{number}: a metrics line needs an integer \"step\"")
        rows.append(row)
    return rows


def metric_order(name: str) -> tuple[bool, bool, str]:
    """Sort key listing training metrics before eval/*, loss first, the rest alphabetically."""
    return name.startswith("eval/"), name != "loss", name


def _stage_rank(stage: str) -> int:
    return STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)


def _natural_key(name: str) -> list[Any]:
    """Sort key in which sweep job 10_... comes after 9_..."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _label(runs: list[ReportedRun]) -> None:
    if len(runs) == 1:
        runs[0].label = runs[0].path.resolve().name
        return
    common = os.path.commonpath([run.path.resolve() for run in runs])
    for run in runs:
        run.label = str(run.path.resolve().relative_to(common))


def parent_run(run: ReportedRun, runs: list[ReportedRun]) -> Optional[ReportedRun]:
    """The reported run whose final/ this run started from (its `model` parent), if it is one of them."""
    return _reported_source((run.manifest.get("parents") or {}).get("model"), runs)


def describe_parents(run: ReportedRun, runs: list[ReportedRun]) -> str:
    """What the run started from, e.g. 'model, reference: sft; reward: rm': a reported run by its
    label, anything else by its path."""
    by_source: dict[str, list[str]] = {}
    for role, source in (run.manifest.get("parents") or {}).items():
        match = _reported_source(source, runs)
        name = match.label if match is not None else str((source or {}).get("path", "?"))
        by_source.setdefault(name, []).append(role)
    return "; ".join(f"{', '.join(roles)}: {name}" for name, roles in by_source.items())


def _reported_source(source: Optional[dict[str, Any]], runs: list[ReportedRun]) -> Optional[ReportedRun]:
    """The reported run a manifest's parent entry names, matched by run_id (paths there are relative to
    wherever that stage ran, and a rerun parent keeps its path but not its run_id)."""
    run_id = (source or {}).get("run_id")
    return next((run for run in runs if run_id and run.manifest.get("run_id") == run_id), None)

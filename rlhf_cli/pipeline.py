"""rlhf pipeline: several stages chained in one run directory, runs/NAME/{sft,rm,dpo,grpo,ppo}/.

Each stage runs exactly as `rlhf <stage>` would, with `from_run` and `output_dir` pointing into the
pipeline's directory, so everything a stage does (checks, resume, manifests) holds here too. Before a
stage starts, its directory decides how it runs:

  no run yet                                   start it (from its checkpoints, if a killed run left some)
  a run that stopped (failed, preempted, killed) continue from its own checkpoints (resume=auto)
  completed, same config, parents unchanged    skip it
  completed, another config or a parent
  trained again since                          train it again (resume=never)

so rerunning a finished pipeline does nothing, and rerunning an interrupted one finishes it with the
models an uninterrupted run would have made.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from rlhf_cli.errors import UserError
from rlhf_cli.runs import RunDir, redact
from rlhf_cli.runs.chain import STAGE_DIRS

log = logging.getLogger("rlhf")

DEFAULT_PRESET = "all"
DEFAULT_OUTPUT_DIR = "runs/default"
REPORT_SAMPLES = 5  # greedy generations of each model shown in the report


@dataclass
class StagePlan:
    stage: str
    overrides: list[str]  # everything but resume
    directory: Path


@dataclass
class Pipeline:
    name: str
    output_dir: Path
    stages: list[StagePlan] = field(default_factory=list)


def presets() -> dict[str, Any]:
    """conf/pipeline/<name>.yaml: the stages in order, and per-stage overrides the preset makes."""
    found = {}
    for entry in resources.files("rlhf_cli.conf").joinpath("pipeline").iterdir():
        if entry.name.endswith(".yaml"):
            found[entry.name[: -len(".yaml")]] = OmegaConf.create(entry.read_text(encoding="utf-8"))
    return found


def plan(args: list[str]) -> Pipeline:
    """The stages to run and each one's overrides: the preset's, then the ones for every stage
    (`deepspeed=zero2`), then the ones for that stage alone (`sft.train.lr=1e-4`)."""
    from rlhf_cli.config.compose import load_config, register_schemas
    from rlhf_cli.config.schema import STAGE_SCHEMAS

    register_schemas()
    choice, output_dir, common, per_stage = _split(args)
    available = presets()
    if choice not in available:
        raise UserError(f"pipeline: '{choice}' is not a preset (choose from {', '.join(sorted(available))})")
    preset = available[choice]
    stages = list(preset.stages)
    for stage in per_stage:
        if stage not in stages:
            raise UserError(f"{stage}.{per_stage[stage][0]}: stage {stage} is not in pipeline '{choice}' ({', '.join(stages)})")
    pipeline = Pipeline(choice, Path(output_dir))
    for stage in stages:
        directory = pipeline.output_dir / STAGE_DIRS[stage]
        chained = [f"from_run={output_dir}"] if "from_run" in {f.name for f in fields(STAGE_SCHEMAS[stage])} else []
        overrides = [*preset.get("overrides", {}).get(stage, []), *common, *per_stage.get(stage, []),
                     *chained, f"output_dir={directory}"]
        try:
            load_config(stage, overrides)  # every stage's keys and values are checked before the first runs
        except UserError as exc:
            raise UserError(f"pipeline stage {stage}: {exc}", exit_code=exc.exit_code) from None
        pipeline.stages.append(StagePlan(stage, overrides, directory))
    return pipeline


def _split(args: list[str]) -> tuple[str, str, list[str], dict[str, list[str]]]:
    choice, output_dir, common, per_stage = DEFAULT_PRESET, DEFAULT_OUTPUT_DIR, [], {}
    for arg in args:
        if arg.startswith("-"):
            raise UserError(f"pipeline: {arg} is not an option of the pipeline (sweeps and --cfg belong to single stages)")
        if "=" not in arg:
            raise UserError(f"pipeline: '{arg}' is not key=value")
        key, value = arg.split("=", 1)
        head, _, rest = key.lstrip("+~").partition(".")
        if key == "pipeline":
            choice = value
        elif key == "output_dir":
            output_dir = value
        elif head in STAGE_DIRS and rest:
            per_stage.setdefault(head, []).append(arg.replace(f"{head}.", "", 1))
        else:
            common.append(arg)
    return choice, output_dir, common, per_stage


def decide(step: StagePlan) -> tuple[str | None, str]:
    """(the resume value to run with, or None to skip; why)."""
    from rlhf_cli.config.compose import load_config
    from rlhf_cli.stages import completed_run_differs

    manifest = RunDir(step.directory).read_manifest()
    if manifest is None:
        return "auto", "not run yet"
    if manifest.get("status") != "completed":
        return "auto", f"{manifest.get('status')}: continues from its checkpoints"
    cfg = load_config(step.stage, step.overrides)
    config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    difference = completed_run_differs(manifest, redact(config))
    if difference is None:
        return None, "complete with this config: skipped"
    return "never", f"completed {difference}: trains again"


def run(args: list[str], run_stage) -> int:
    """Run the pipeline; `run_stage(stage, overrides)` runs one stage and returns its exit code."""
    pipeline = plan(args)
    log.info(f"pipeline {pipeline.name}: {' -> '.join(s.stage for s in pipeline.stages)} in {pipeline.output_dir}")
    ran = []
    for step in pipeline.stages:
        resume, why = decide(step)
        log.info(f"pipeline: {step.stage} ({step.directory}): {why}")
        if resume is None:
            continue
        code = run_stage(step.stage, [*step.overrides, f"resume={resume}"])
        if code:
            log.info(f"pipeline: {step.stage} stopped (exit {code}); rerun the same command to continue")
            return code
        ran.append(step.stage)
    if not ran:
        log.info(f"pipeline {pipeline.name}: every stage in {pipeline.output_dir} is already complete; nothing to do")
    _report(pipeline)
    return 0


def _report(pipeline: Pipeline) -> None:
    """The report of the whole run directory (rlhf report), and its summary on the terminal."""
    from rich.console import Console

    from rlhf_cli.report.build import print_summary, write_report
    from rlhf_cli.report.document import PageFormat

    print_summary(write_report([pipeline.output_dir], None, REPORT_SAMPLES, PageFormat.html), Console(stderr=True))

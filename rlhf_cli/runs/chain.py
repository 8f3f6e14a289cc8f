"""Stage chaining through manifests: a stage finds its parents' `final/` in `from_run`, never by
guessing names or times. `sft/final` starts train-rm (and is the policy and reference of the RL
stages); `rm/final` is PPO's reward model and the start of its critic."""

from __future__ import annotations

from pathlib import Path

from rlhf_cli.errors import UserError
from rlhf_cli.runs import RunDir

# The directory of each stage inside a run directory such as runs/default/.
STAGE_DIRS = {"sft": "sft", "train-rm": "rm", "ppo": "ppo", "dpo": "dpo", "grpo": "grpo"}


def chained_final(from_run: str, parent_stage: str, key: str) -> str:
    """The `final/` of the completed `parent_stage` run inside `from_run`, or an error saying what to run."""
    run = RunDir(Path(from_run) / STAGE_DIRS[parent_stage])
    manifest = run.read_manifest()
    if manifest is not None and manifest.get("stage") != parent_stage:
        raise UserError(f"{run.path}: holds a {manifest.get('stage')} run, not {parent_stage} (from_run={from_run})")
    if manifest is None or manifest.get("status") != "completed":
        state = "holds no run" if manifest is None else f"holds a {manifest.get('status')} run"
        raise UserError(
            f"{key} is null and {run.path} {state}: run `rlhf {parent_stage}` first "
            f"(or set {key}, or from_run to a run directory with a completed {parent_stage})"
        )
    if not run.final_path.is_dir():
        raise UserError(f"{run.final_path}: missing, though the manifest beside it says completed; run `rlhf {parent_stage}` again")
    from rlhf_cli.runs.checkpoint import unsealed_reason

    # Sizes only (a truncated file): this runs before every stage that chains from it, and hashing a
    # whole model each time would cost more than the rarer changed-in-place file it would add.
    reason = unsealed_reason(run.final_path, checksums=False)
    if reason is not None:
        raise UserError(f"{run.final_path}: not whole ({reason}); rerun `rlhf {parent_stage}` with resume=never")
    return str(run.final_path)

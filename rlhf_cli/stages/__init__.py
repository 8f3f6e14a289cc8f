"""What every stage does around its training loop: open the run directory, decide whether to
resume, skip or refuse, record the manifest, and mark the run failed when it stops early."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from omegaconf import OmegaConf

from rlhf_cli import distributed, preemption
from rlhf_cli.errors import UserError
from rlhf_cli.runs import MANIFEST, RunDir, redact

if TYPE_CHECKING:
    from rlhf_cli.data.sources import Row

log = logging.getLogger("rlhf")

# Keys that may differ between a completed run and a rerun that should count as the same run.
_NOT_IDENTITY = ("resume", "logger", "wandb", "output_dir")


class AlreadyComplete(Exception):
    """The run directory already holds this exact run, completed."""


@dataclass
class RunStart:
    run: RunDir
    checkpoint: Optional[Path]  # resume from here, or start fresh when None
    config: dict[str, Any]  # resolved, as recorded in the manifest
    config_yaml: str


def open_run(cfg: Any) -> RunStart:
    config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    config_yaml = OmegaConf.to_yaml(redact(config))
    run = RunDir(cfg.output_dir)
    if cfg.resume == "never":
        return RunStart(run, None, config, config_yaml)
    if cfg.resume != "auto":
        return RunStart(run, Path(cfg.resume), config, config_yaml)
    manifest = run.read_manifest()
    if manifest is None:
        return RunStart(run, run.latest_checkpoint(), config, config_yaml)
    if manifest.get("stage") != cfg.stage:
        raise UserError(
            f"output_dir={cfg.output_dir}: holds a {manifest.get('stage')} run, not {cfg.stage}; choose another output_dir"
        )
    if manifest.get("status") == "completed":
        difference = completed_run_differs(manifest, redact(config))
        if difference is None:
            raise AlreadyComplete(f"{cfg.output_dir} is already complete with this config; nothing to do")
        raise UserError(f"output_dir={cfg.output_dir}: holds a completed run {difference}; "
                        "resume=never trains again, or choose another output_dir")
    return RunStart(run, run.latest_checkpoint(), config, config_yaml)


def completed_run_differs(manifest: dict[str, Any], config: dict[str, Any]) -> Optional[str]:
    """Why a completed run is not this run (None when it is): another config, or a parent model
    (sft/final, rm/final, ...) trained again since it started from it."""
    changed = config_changes(manifest.get("config", {}), config)
    if changed:
        return f"with another config ({changed})"
    for name, parent in manifest.get("parents", {}).items():
        if parent.get("run_id") and describe_model_source(parent["path"]).get("run_id") != parent["run_id"]:
            return (f"whose {name} {parent['path']} was trained again since it started from it "
                    f"(as it was at {parent.get('finished_at')})")
    return None


def start_model_path(cfg: Any) -> str:
    """The model this stage starts from: model.path, or the chained sft/final of from_run."""
    if cfg.model.path is not None:
        return cfg.model.path
    from rlhf_cli.runs.chain import chained_final

    return chained_final(cfg.from_run, "sft", "model.path")


def config_changes(before: dict[str, Any], after: dict[str, Any]) -> str:
    """'key: old -> new' for the leaf keys that differ, identity keys only; empty when the same."""
    old, new = _leaves(before), _leaves(after)
    keys = sorted(k for k in set(old) | set(new) if k.split(".")[0] not in _NOT_IDENTITY and old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in keys[:3]) + (" ..." if len(keys) > 3 else "")


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def describe_model_source(path: str) -> dict[str, Any]:
    """Where a model came from, for the manifest: the run and stage when it is a run's final/."""
    source: dict[str, Any] = {"path": path}
    manifest = Path(path).parent / MANIFEST
    if Path(path).name == "final" and manifest.is_file():
        recorded = RunDir(Path(path).parent).read_manifest() or {}
        source.update(run=str(Path(path).parent), stage=recorded.get("stage"), run_id=recorded.get("run_id"),
                      finished_at=recorded.get("finished_at"))
    return source


def split_rows(data_cfg: Any) -> tuple[list[Row], list[Row]]:
    """Training and evaluation rows: data.eval when given, else data.eval_size rows carved from train."""
    import torch

    from rlhf_cli.data.sources import load_rows

    train = load_rows(data_cfg.train, subset=data_cfg.subset, split=data_cfg.train_split)
    if data_cfg.eval:
        return train, load_rows(data_cfg.eval, subset=data_cfg.subset, split=data_cfg.eval_split)
    if not data_cfg.eval_size:
        return train, []
    n_eval = int(data_cfg.eval_size if data_cfg.eval_size >= 1 else max(1, round(data_cfg.eval_size * len(train))))
    if not 0 < n_eval < len(train):
        raise UserError(f"data.eval_size: {data_cfg.eval_size} leaves no training or no eval rows out of {len(train)}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    held = set(order[:n_eval])
    return [r for i, r in enumerate(train) if i not in held], [r for i, r in enumerate(train) if i in held]


def plan_steps(train_cfg: Any, n_items: int, items_per_step: int) -> int:
    """Optimizer steps of the run: train.max_steps, else train.epochs passes over the items."""
    return train_cfg.max_steps or max(1, int(train_cfg.epochs * n_items / items_per_step))


def due(every: int, done: int, total: int) -> bool:
    """Whether a periodic action (eval, checkpoint) falls on step `done`; the last step has its own."""
    return bool(every) and done % every == 0 and done < total


def begin_training(cfg: Any, start: RunStart, model: Any, engine: Any, parents: dict[str, Any], overrides: list[str]) -> int:
    """Restore the checkpoint to resume from (or clear an earlier run for resume=never), record the
    manifest as running, and return the step training starts at."""
    from rlhf_cli.models import count_parameters
    from rlhf_cli.runs.checkpoint import load_training_state

    start_step = 0
    if start.checkpoint is not None:
        start_step = load_training_state(start.checkpoint, model, engine)["step"]
        log.info(f"resuming from {start.checkpoint} (step {start_step})")
    elif cfg.resume == "never" and distributed.is_main():
        start.run.start_fresh()
    distributed.barrier()  # every process has read what it resumes from before anything is replaced
    start.run.begin(
        cfg.stage, start.config, start.config_yaml, parents=parents,
        resumed_from=str(start.checkpoint) if start.checkpoint else None, overrides=overrides,
        parameters={"total": count_parameters(model), "trainable": count_parameters(model, trainable_only=True)},
    )
    return start_step


def checkpoint_if_due(cfg: Any, start: RunStart, done: int, total: int, model: Any, engine: Any) -> None:
    """Called after every optimizer step: saves the periodic checkpoint (train.save_every), and when
    a stop signal came (rlhf_cli.preemption), saves this step even with train.save_every=0 and raises
    Preempted. A signal during the last step lets the run finish: final/ is the state to keep."""
    checkpoint = save_checkpoint(cfg, start, done, model, engine) if due(cfg.train.save_every, done, total) else None
    signal_name = distributed.first_of(preemption.requested())  # every process stops at the same step
    if signal_name is None or done == total:
        return
    if checkpoint is None:
        checkpoint = save_checkpoint(cfg, start, done, model, engine)
    raise preemption.Preempted(signal_name, done, str(checkpoint))


def save_checkpoint(cfg: Any, start: RunStart, step: int, model: Any, engine: Any) -> Path:
    from rlhf_cli.runs.checkpoint import save_training_state

    return start.run.save_checkpoint(step, lambda d: save_training_state(d, model, engine, {"step": step}),
                                     keep=cfg.train.keep_checkpoints)


def finish(cfg: Any, start: RunStart, model: Any, tokenizer: Any, final_metrics: dict[str, Any], **extra: Any) -> None:
    """Write final/ (safetensors and the tokenizer) and mark the run completed. final/ holds full weights,
    LoRA adapters merged in, or with model.lora.merge=false the adapter alone; the manifest says which
    (`final_format`) and, for an adapter, which base it was trained on (`base_model`). Every process
    calls it (ZeRO-3 gathers the partitions for the save); process 0 writes."""
    from rlhf_cli.engine.zero import full_weights
    from rlhf_cli.models import base_model_reference, save_adapter, without_adapters

    adapter_only = cfg.model.lora.r > 0 and not cfg.model.lora.merge

    def write_final(directory: Path) -> None:
        with full_weights(model):
            if not distributed.is_main():
                return
            if adapter_only:
                save_adapter(model, directory, cfg.model)
            else:
                without_adapters(model).save_pretrained(directory, safe_serialization=True)
            tokenizer.save_pretrained(directory)

    start.run.save_final(write_final)
    if adapter_only:
        final_format = {"final_format": "adapter", "base_model": describe_model_source(base_model_reference(cfg.model.path))}
    else:
        final_format = {"final_format": "merged"}
    start.run.complete(final_metrics, **final_format, **extra)

"""Metric sinks and the console view of a run.

`metrics.jsonl` is always written (one object per logged step, with "step"). `logger=[...,wandb]`
and `tensorboard` add those sinks. On a terminal a progress bar shows loss, lr and tokens/s; when
stderr is not a terminal (a batch job, a pipe) the same figures are printed as plain lines.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from rlhf_cli.config.schema import Logger
from rlhf_cli.errors import UserError

log = logging.getLogger("rlhf")


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after `last_step`: a resumed run logs those steps again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def format_metrics(metrics: dict[str, Any]) -> str:
    return "  ".join(f"{key} {format_value(key, value)}" for key, value in metrics.items())


def format_value(key: str, value: Any) -> str:
    """One metric as the console and `rlhf report` show it: lr in scientific notation, big figures whole."""
    if isinstance(value, float):
        return f"{value:.3e}" if key == "lr" else f"{value:,.0f}" if value >= 1000 else f"{value:.4g}"
    return str(value)


def rss_mib() -> Optional[float]:
    """This process's resident memory now, in MiB (None where there is no /proc): a figure that keeps
    rising over a long run means something grows with the steps."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return None
    return round(resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


class Throughput:
    """Tokens per second since the last reading."""

    def __init__(self) -> None:
        self.tokens, self.since = 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.since, 1e-9)
        self.tokens, self.since = 0, now
        return rate


class MetricsLogger:
    """Process 0 of a run logs; on the others every method does nothing."""

    def __init__(self, run_path: Path, cfg: Any, total_steps: int, start_step: int):
        from rlhf_cli import distributed

        self.total_steps = total_steps
        self.path = run_path / "metrics.jsonl"
        self.active = distributed.is_main()
        if not self.active:
            return
        truncate_metrics(self.path, start_step)
        self._file = self.path.open("a", encoding="utf-8")
        self._wandb = _init_wandb(run_path, cfg) if Logger.wandb in cfg.logger else None
        self._tensorboard = _init_tensorboard(run_path) if Logger.tensorboard in cfg.logger else None
        self._progress = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn(f"[bold]{cfg.stage}[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._task = self._progress.add_task(cfg.stage, total=total_steps, completed=start_step, info="")
            self._progress.start()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        clean = {k: v for k, v in {**metrics, "rss_mib": rss_mib()}.items()
                 if v is not None and not (isinstance(v, float) and math.isnan(v))}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        if self._tensorboard is not None:
            for key, value in clean.items():
                self._tensorboard.add_scalar(key, value, step)
        shown = {k: v for k, v in clean.items() if k in ("loss", "lr", "tokens_per_s") or k.startswith("eval/")}
        if self._progress is None:
            log.info(f"step {step}/{self.total_steps}  {format_metrics(shown)}")
        elif any(k.startswith("eval/") for k in shown):
            self._progress.console.print(f"step {step}: {format_metrics(shown)}")
        if self._progress is not None:
            train_view = {k: v for k, v in shown.items() if not k.startswith("eval/")}
            if train_view:
                self._progress.update(self._task, info=format_metrics(train_view))

    def advance(self, step: int) -> None:
        if self.active and self._progress is not None:
            self._progress.update(self._task, completed=step)

    def close(self) -> None:
        if not self.active:
            return
        if self._progress is not None:
            self._progress.stop()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _init_wandb(run_path: Path, cfg: Any):
    try:
        import wandb
    except ImportError:
        raise UserError("logger: wandb is not installed (pip install 'rlhf-cli[wandb]')") from None
    from omegaconf import OmegaConf

    from rlhf_cli.runs import redact

    # One wandb run per run directory, kept across resumes.
    id_file = run_path / "wandb_id"
    run_id: Optional[str] = id_file.read_text().strip() if id_file.is_file() else None
    if run_id is None:
        run_id = uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
    # wandb records the command line; a credential in an override (an http reward's URL) must stay out.
    argv, sys.argv = sys.argv, redact(sys.argv)
    try:
        return wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            name=cfg.wandb.name or str(run_path),
            group=cfg.wandb.group,
            tags=list(cfg.wandb.tags),
            id=run_id,
            resume="allow",
            dir=str(run_path),
            config=redact(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)),
        )
    finally:
        sys.argv = argv


def _init_tensorboard(run_path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("logger: tensorboard is not installed (pip install 'rlhf-cli[tensorboard]')") from None
    return SummaryWriter(log_dir=str(run_path / "tensorboard"))

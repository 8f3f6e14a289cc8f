"""The run directory: manifest, resolved config, metrics, checkpoints and the final model.

```
<output_dir>/
  manifest.json     stage, status (running | completed | failed | preempted), times, resolved config, parents,
                    parameters (total, trainable), final metrics and format, library versions
  config.yaml       the resolved config
  metrics.jsonl     one JSON object per logged step
  checkpoints/step-N/   full training state for an exact resume
  final/            the trained model and tokenizer (safetensors)
```
Every directory that must appear whole (a checkpoint, `final/`) is written under a temporary name
and renamed into place, so it exists complete or not at all; its seal (`complete.json`, see
runs/checkpoint.py) lets a reader check that it is still whole. The manifest is replaced atomically.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from rlhf_cli.errors import EXIT_WRITE_FAILED, UserError

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
FINAL = "final"
CHECKPOINTS = "checkpoints"
REFERENCE_CACHE = "reference_logps.safetensors"  # dpo.precompute_ref
EVAL_JSON = "eval.json"  # what `rlhf eval` writes in its output_dir
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^\..+\.(tmp|old)-\d+$")  # what write_text_atomic, atomic_directory, publish_directory write first
_SECRET_KEY = re.compile(r"(^|_)(api_?key|token|secret|password|passwd)$", re.IGNORECASE)
# Secrets inside a value: a URL's user:password@, and query parameters such as ?api_key=... or &token=...
_URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s'\"]+@", re.IGNORECASE)
_SECRET_QUERY = re.compile(r"([?&][^=&#\s]*(?:api_?key|token|secret|password|passwd)=)[^&#\s'\",}\]]+", re.IGNORECASE)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, default=str) + "\n")


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `target`, sealed, only once the block finishes. Every
    process of a run enters it: each writes its part in between; process 0 makes the directory, then
    seals every process's files and publishes it."""
    from rlhf_cli import distributed

    tmp = target.with_name(f".{target.name}.tmp-{distributed.job_token()}")
    try:
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier()
        yield tmp
        distributed.barrier()
        if distributed.is_main():
            from rlhf_cli.runs.checkpoint import seal

            seal(tmp)
            publish_directory(tmp, target)
    except UserError:
        raise
    except Exception as exc:
        # A full disk, a quota, a filesystem gone read-only: torch and safetensors report them as their
        # own exceptions (RuntimeError, SafetensorError), not OSError, and torch's says nothing of the
        # disk; so any failure of the write is reported as one, with the space left beside it.
        lines = str(exc).strip().splitlines() or [repr(exc)]
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else lines[-1]
        free = shutil.disk_usage(target.parent).free / 1e9
        raise UserError(f"{target}: not written ({cause}; {free:.2f} GB free on its disk); nothing of it was kept",
                        exit_code=EXIT_WRITE_FAILED) from exc
    finally:
        distributed.barrier()
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_directory(tmp: Path, target: Path) -> None:
    """Put the finished directory `tmp` in place of `target` (replacing any older one) by renames."""
    _fsync_tree(tmp)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def check_writable(path: Path, bytes_needed: int = 0) -> None:
    """Before anything trains: `path` can be created and written, with about `bytes_needed` free on its
    disk; otherwise an error naming it, rather than a failure at the first checkpoint hours later.
    Nothing is created: the nearest existing directory is asked. A path that cannot be a directory
    is a bad value (exit 2); a directory the disk refuses, EX_IOERR."""
    existing = next(p for p in [path, *path.parents] if p.exists())
    if existing == path and not path.is_dir():
        raise UserError(f"output_dir={path}: exists and is not a directory")
    if not existing.is_dir():
        raise UserError(f"output_dir={path}: {existing.absolute()} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):  # also false on a read-only filesystem, even for root
        raise UserError(f"output_dir={path}: {existing.absolute()} is not writable", exit_code=EXIT_WRITE_FAILED)
    free = shutil.disk_usage(existing).free
    if free < bytes_needed:
        raise UserError(f"output_dir={path}: {free / 1e9:.2f} GB free on its disk, and a checkpoint needs about "
                        f"{bytes_needed / 1e9:.2f} GB", exit_code=EXIT_WRITE_FAILED)


def redact(value: Any) -> Any:
    """A copy of a config mapping (or list, or text) with secrets replaced: the values of secret-looking
    keys, and credentials inside URLs (an http reward's endpoint may carry them)."""
    if isinstance(value, dict):
        return {k: ("<redacted>" if _SECRET_KEY.search(str(k)) and v else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _SECRET_QUERY.sub(r"\1<redacted>", _URL_USERINFO.sub(r"\1<redacted>@", value))
    return value


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("rlhf-cli", "torch", "transformers", "datasets", "hydra-core", "deepspeed", "peft"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def final_path(self) -> Path:
        return self.path / FINAL

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    def read_manifest(self) -> Optional[dict[str, Any]]:
        if not self.manifest_path.is_file():
            return None
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{self.manifest_path}: corrupt manifest (not JSON)") from None

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first (a partial one keeps its temporary name)."""
        root = self.path / CHECKPOINTS
        if not root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(found)

    def remove_leftovers(self) -> None:
        """Delete the temporaries a killed run left behind (a checkpoint, final/ or manifest it was writing):
        never whole and never read, only taking space. Process 0, before anything of this run is written."""
        for parent in (self.path, self.path / CHECKPOINTS):
            for path in parent.iterdir() if parent.is_dir() else ():
                if _LEFTOVER.match(path.name) and path.is_dir():
                    shutil.rmtree(path)
                elif _LEFTOVER.match(path.name):
                    path.unlink()

    def start_fresh(self) -> None:
        """Remove what an earlier run left here (resume=never); the directory itself stays."""
        for name in (MANIFEST, CONFIG, METRICS, FINAL, CHECKPOINTS, REFERENCE_CACHE):
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    def begin(self, stage: str, config: dict[str, Any], config_yaml: str, parents: dict[str, Any],
              resumed_from: Optional[str], overrides: list[str], parameters: dict[str, int]) -> None:
        """Record the run as running (process 0 writes the manifest; the others only keep it)."""
        from rlhf_cli import distributed

        self.path.mkdir(parents=True, exist_ok=True)
        previous = self.read_manifest() or {}
        if distributed.is_main():
            write_text_atomic(self.path / CONFIG, config_yaml)
        self._manifest = {
            "stage": stage,
            # New for every fresh start, kept across resumes: what a later stage records as its parent.
            "run_id": previous.get("run_id") if resumed_from and previous.get("run_id") else uuid.uuid4().hex,
            "status": "running",
            "started_at": previous.get("started_at") or _now(),
            "updated_at": _now(),
            "finished_at": None,
            "config": redact(config),
            "overrides": redact(overrides),
            "parents": parents,
            "parameters": parameters,  # total and trainable (LoRA trains a few)
            "resumed_from": resumed_from,
            "final": None,
            "final_metrics": None,
            "versions": library_versions(),
        }
        self.update()

    def update(self, **fields: Any) -> None:
        from rlhf_cli import distributed

        self._manifest.update(fields, updated_at=_now())
        if distributed.is_main():
            write_json_atomic(self.manifest_path, self._manifest)

    def save_checkpoint(self, step: int, write: Any, keep: int) -> Path:
        """Every process of the run calls this; `write` writes that process's part."""
        from rlhf_cli import distributed

        target = self.path / CHECKPOINTS / f"step-{step}"
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_directory(target) as tmp:
            write(tmp)
        if distributed.is_main():
            for _, old in self.checkpoints()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return target

    def save_final(self, write: Any) -> Path:
        """Every process of the run calls this; `write` writes that process's part."""
        with atomic_directory(self.final_path) as tmp:
            write(tmp)
        return self.final_path

    def complete(self, final_metrics: dict[str, Any], **extra: Any) -> None:
        self.update(status="completed", finished_at=_now(), final=str(self.final_path), final_metrics=final_metrics, **extra)

    def preempt(self, signal_name: str, step: int, checkpoint: str) -> None:
        """Stopped on a signal after a checkpoint: a rerun with resume=auto continues from it."""
        self.update(status="preempted", finished_at=_now(), preempted={"signal": signal_name, "step": step, "checkpoint": checkpoint})

    def fail(self, reason: str) -> None:
        if getattr(self, "_manifest", None) is not None:
            self.update(status="failed", finished_at=_now(), error=redact(reason))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")

"""What a checkpoint holds, so that a resumed run continues exactly where the last one stopped:
model weights (safetensors) and engine state (optimizer, schedule, loss scaler) or, under DeepSpeed,
its sharded checkpoint of both; every process's RNGs; and the step reached (which fixes the data
position, see data/batches.py). Every process of a run writes its own part into the same directory.

Every checkpoint and `final/` is sealed: once all its files are written, `complete.json` lists each
one's size and sha256, written last. A directory is whole only when its seal matches its files: the
atomic rename (runs.atomic_directory) already keeps a killed write from taking a whole one's name,
and the seal also catches what happens to the files afterwards (a truncating copy, a full disk
during a sync, bit rot) before a resume or a later stage trusts them."""

from __future__ import annotations

import hashlib
import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from rlhf_cli import distributed
from rlhf_cli.errors import UserError

WEIGHTS = "model.safetensors"
ENGINE = "engine.pt"
RNG = "rng.pt"
STATE = "trainer_state.json"
SEAL = "complete.json"
_HASH_CHUNK = 1 << 20


def save_training_state(directory: Path, model: torch.nn.Module, engine: Any, state: dict[str, Any]) -> None:
    """Called by every process with the same directory."""
    if engine.owns_weights:
        engine.save(directory)
    elif distributed.is_main():
        save_model(model, str(directory / WEIGHTS))
        torch.save(engine.state_dict(), directory / ENGINE)
    torch.save(_rng_state(), directory / _rng_file())
    if distributed.is_main():
        (directory / STATE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def refuse_nonfinite(model: torch.nn.Module, target: str) -> None:
    """Raise, on every process, when any process holds a NaN or Inf weight: such weights are never saved.
    Each process checks what it holds (its ZeRO-3 partition, or the whole model)."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(getattr(p, "ds_tensor", p)).all()]
    if distributed.total(len(bad)):
        named = f" ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})" if bad else ""
        raise UserError(f"{target} not written: the weights hold NaN or Inf{named}; "
                        "an earlier checkpoint, if any, holds the last finite ones")


def load_training_state(directory: Path, model: torch.nn.Module, engine: Any) -> dict[str, Any]:
    expected = [STATE, _rng_file()] + ([] if engine.owns_weights else [WEIGHTS, ENGINE])
    missing = [name for name in expected if not (directory / name).is_file()]
    if missing:
        raise UserError(f"{directory}: not a complete checkpoint of this run (missing {', '.join(missing)}; "
                        "a checkpoint resumes with the deepspeed setting and process count it was written with)")
    if engine.owns_weights:
        engine.load(directory)
    else:
        try:
            load_model(model, str(directory / WEIGHTS))
        except RuntimeError as exc:
            raise UserError(f"{directory}: checkpoint weights do not fit this model: {str(exc).splitlines()[0]}") from None
        # On the CPU first: a checkpoint written on a GPU resumes on another device too.
        engine.load_state_dict(torch.load(directory / ENGINE, weights_only=True, map_location="cpu"))
    _set_rng_state(torch.load(directory / _rng_file(), weights_only=True))
    return json.loads((directory / STATE).read_text(encoding="utf-8"))


def _rng_file() -> str:
    """Process 0 keeps the single-process name, so a one-process checkpoint reads as before."""
    return RNG if distributed.rank() == 0 else f"rng-rank{distributed.rank()}.pt"


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():  # this process's GPU alone: a resume may see other GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seal(directory: Path) -> None:
    """Write the seal of a directory whose files are all written (process 0, once every process's part is in)."""
    paths = [path for path in sorted(directory.rglob("*")) if path.is_file() and path.name != SEAL]
    files = {str(path.relative_to(directory)): {"size": path.stat().st_size, "sha256": digest}
             for path, digest in zip(paths, _sha256_each(paths))}
    with (directory / SEAL).open("w", encoding="utf-8") as handle:
        handle.write(json.dumps({"files": files}, indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def unsealed_reason(directory: Path, checksums: bool = True) -> Optional[str]:
    """Why `directory` is not whole (no seal, a file missing, truncated or changed), or None when it is.
    Sizes are compared first: the cheap check finds a truncated file without reading the others.
    checksums=False stops there (a chained final/, checked before every stage that loads it)."""
    try:
        files = json.loads((directory / SEAL).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"no {SEAL}: it was never finished"
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return f"{SEAL} is unreadable"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['size']} when written"
    if checksums:
        for (name, expected), digest in zip(files.items(), _sha256_each([directory / name for name in files])):
            if digest != expected["sha256"]:
                return f"{name} does not match its sha256"
    return None


def _sha256_each(paths: list[Path]) -> list[str]:
    """One thread a file: hashlib lets go of the GIL, so the weights, the optimizer state and every
    process's DeepSpeed shard are hashed side by side (sha256 is about 0.5-2 GB/s on one core)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(_sha256, paths))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()

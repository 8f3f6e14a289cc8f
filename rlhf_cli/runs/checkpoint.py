"""What a checkpoint holds, so that a resumed run continues exactly where the last one stopped:
model weights (safetensors) and engine state (optimizer, schedule, loss scaler) or, under DeepSpeed,
its sharded checkpoint of both; every process's RNGs; and the step reached (which fixes the data
position, see data/batches.py). Every process of a run writes its own part into the same directory."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from rlhf_cli import distributed
from rlhf_cli.errors import UserError

WEIGHTS = "model.safetensors"
ENGINE = "engine.pt"
RNG = "rng.pt"
STATE = "trainer_state.json"


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
        engine.load_state_dict(torch.load(directory / ENGINE, weights_only=True))
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
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

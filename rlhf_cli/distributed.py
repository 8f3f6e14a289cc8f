"""The processes of one run: who they are, and the few collectives a stage needs.

A run is one process (the default) or several started by torchrun, the deepspeed launcher, srun or
submitit, which set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Every function here
works unchanged in a single process without a process group, so the stage loops call them
unconditionally: a sum across ranks of one process is the value itself.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
from typing import Any

_job_token: str | None = None


def _dist():
    import torch.distributed

    return torch.distributed


def launched_world_size() -> int:
    """Processes the launcher started (readable before any process group exists)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(backend_needed: bool) -> None:
    """Join the process group of a multi-process launch, or make one of a single process when the
    engine needs one (DeepSpeed always does). The group lives as long as the process: the jobs of a
    multirun in one process share it (DeepSpeed keeps its own references to it)."""
    if _dist().is_initialized() or not (backend_needed or launched_world_size() > 1):
        return
    if "SUBMITIT_EXECUTOR" in os.environ and "RANK" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import deepspeed

    # DeepSpeed's own log would warn of our (deliberate) torch AdamW on every process; errors still show.
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    deepspeed.init_distributed(verbose=False)
    atexit.register(_stop)


def _stop() -> None:
    if _dist().is_initialized():
        _dist().destroy_process_group()


def rank() -> int:
    return _dist().get_rank() if _dist().is_initialized() else 0


def world_size() -> int:
    return _dist().get_world_size() if _dist().is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        _dist().barrier()


def total(value: Any) -> Any:
    """The sum over ranks of a number or a tensor (same type back)."""
    if world_size() == 1:
        return value
    import torch

    if torch.is_tensor(value):
        tensor = value.detach().clone()
    else:  # NCCL reduces device tensors only
        device = "cuda" if _dist().get_backend() == "nccl" else "cpu"
        tensor = torch.tensor(float(value), dtype=torch.float64, device=device)
    _dist().all_reduce(tensor)
    if torch.is_tensor(value):
        return tensor
    return type(value)(tensor.item())


def mean(value: float) -> float:
    """The mean over ranks of a per-rank figure computed on equal shares of the step."""
    return total(float(value)) / world_size()


def gather(values: list) -> list:
    """Every rank's list, concatenated in rank order."""
    if world_size() == 1:
        return list(values)
    parts: list[list] = [[] for _ in range(world_size())]
    _dist().all_gather_object(parts, list(values))
    return [v for part in parts for v in part]


def first_of(value: str | None) -> str | None:
    """The first rank's non-None value, given to every rank (None when no rank has one); one cheap
    reduction when none has, as in almost every call."""
    if world_size() == 1 or not total(int(value is not None)):
        return value
    return next(v for v in gather([value]) if v is not None)


def job_token() -> str:
    """A name all ranks of this run share (rank 0's process id): temporary directories they write together."""
    global _job_token
    if _job_token is None:
        token = [str(os.getpid())]
        if world_size() > 1:
            _dist().broadcast_object_list(token, src=0)
        _job_token = token[0]
    return _job_token


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

"""Stop a stage cleanly when the cluster asks: checkpoint at the end of the current optimizer step,
then exit with code 75 (EX_TEMPFAIL, "checkpointed, requeue me").

The signals, and who sends them:
- SIGUSR1: SLURM's warning before the time limit (`#SBATCH --signal=B:USR1@N` in scripts/slurm/).
- SIGTERM: `scancel`, preemption, the time limit itself (SIGKILL follows KillWait seconds later).
- SIGUSR2: submitit's preemption and time-limit signal (`hydra/launcher=slurm`).

The handlers only record the signal. A signal lands in the middle of a forward pass or an optimizer
update; only the end of a step is a state that a checkpoint holds exactly, so the stage loop asks
`requested()` after each step (stages.checkpoint_if_due). Under submitit, the handler this module
replaced (submitit's, which requeues the job) runs after our checkpoint: `hand_over()`.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Any, Iterator, Optional

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)

_received: Optional[signal.Signals] = None
_replaced: dict[signal.Signals, Any] = {}


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint; rerunning it (resume=auto) continues."""

    def __init__(self, signal_name: str, step: int, checkpoint: str):
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {checkpoint}; "
                         "the same command continues from it")
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint


@contextmanager
def signals_recorded() -> Iterator[None]:
    """While the block runs, SIGUSR1, SIGUSR2 and SIGTERM are recorded instead of acted on."""
    global _received, _replaced
    _received = None
    _replaced = {sig: signal.signal(sig, _record) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, previous in _replaced.items():
            # None: the handler was installed by C code, which Python cannot reinstate; use the default.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)


def _record(signum: int, _frame: Any) -> None:
    global _received
    if _received is None:  # the first signal names the stop; a TERM after the USR1 warning changes nothing
        _received = signal.Signals(signum)


def requested() -> Optional[str]:
    """The name of the stop signal this process received ("SIGUSR1"), or None."""
    return _received.name if _received is not None else None


def hand_over() -> None:
    """Run the handler that the last `signals_recorded` block replaced (and reinstated) for the
    received signal, when it was a Python function: submitit's SIGUSR2 handler requeues the job and
    exits. Default and ignore dispositions are not actions to take here."""
    previous = _replaced.get(_received) if _received is not None else None
    if callable(previous):
        previous(_received, None)

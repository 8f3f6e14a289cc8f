"""A stage stopped by SIGUSR1 (SLURM's time-limit warning) or SIGTERM (scancel, preemption) checkpoints
the step it is in, exits 75, and a rerun ends with the weights of an uninterrupted run. Under submitit,
the SIGUSR2 handler the stage replaced runs after that checkpoint."""

import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from rlhf_cli import preemption
from rlhf_cli.cli import EXIT_PREEMPTED
from rlhf_cli.runs import RunDir
from tests.conftest import signal_after_first_step

# save_every=0: the checkpoint a signal leaves behind is the stop's own, not a periodic one.
ARGS = ["train.max_steps=30", "train.batch_size=4", "train.log_every=1", "train.save_every=0", "train.eval_every=0",
        "train.warmup_ratio=0.1", "eval.generate=0", "eval.max_samples=8"]

# Stands in for submitit: a SIGUSR2 handler installed before the stage starts, which records what it
# finds when it runs and exits the way submitit's does after requeueing the job.
SUBMITIT_LIKE = """
import json, pathlib, signal, sys
def requeue(signum, frame):
    run = pathlib.Path(sys.argv[-1].split("=", 1)[1])
    found = {"signal": signum, "status": json.loads((run / "manifest.json").read_text())["status"],
             "checkpoints": sorted(p.name for p in (run / "checkpoints").iterdir())}
    pathlib.Path("handed-over.json").write_text(json.dumps(found))
    sys.exit(-1)
signal.signal(signal.SIGUSR2, requeue)
sys.argv = ["rlhf", *sys.argv[1:]]
from rlhf_cli.cli import main
main()
"""


def _command(output_dir: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_cli", "sft", *ARGS, f"output_dir={output_dir}"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The final weights of the run without interruption."""
    cwd = tmp_path_factory.mktemp("straight")
    done = subprocess.run(_command("run"), cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return load_file(cwd / "run/final/model.safetensors")


@pytest.mark.parametrize("sig", [signal.SIGUSR1, pytest.param(signal.SIGTERM, marks=pytest.mark.faults)], ids=["SIGUSR1", "SIGTERM"])
def test_a_signal_checkpoints_exits_75_and_the_rerun_ends_with_the_same_weights(tmp_path, straight, sig):
    code, stderr = signal_after_first_step(_command("run"), tmp_path, sig)
    assert code == EXIT_PREEMPTED, stderr
    assert f"error: stopped by {sig.name} after step" in stderr
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert manifest["status"] == "preempted" and manifest["preempted"]["signal"] == sig.name
    step = manifest["preempted"]["step"]
    assert 1 <= step < 30
    assert [n for n, _ in RunDir(tmp_path / "run").checkpoints()] == [step]
    assert not (tmp_path / "run/final").exists()

    resumed = subprocess.run(_command("run"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {tmp_path / 'run/checkpoints'}/step-{step}" in resumed.stderr
    assert json.loads((tmp_path / "run/manifest.json").read_text())["status"] == "completed"
    again = load_file(tmp_path / "run/final/model.safetensors")
    for name in straight:
        torch.testing.assert_close(again[name], straight[name], atol=1e-6, rtol=0)


def test_the_replaced_sigusr2_handler_runs_after_the_checkpoint(tmp_path):
    command = [sys.executable, "-c", SUBMITIT_LIKE, "sft", *ARGS, f"output_dir={tmp_path / 'run'}"]
    code, stderr = signal_after_first_step(command, tmp_path, signal.SIGUSR2)
    assert code == 255, stderr  # the handler's sys.exit(-1), as submitit's after `scontrol requeue`
    found = json.loads((tmp_path / "handed-over.json").read_text())
    assert found["signal"] == signal.SIGUSR2
    assert found["status"] == "preempted" and len(found["checkpoints"]) == 1


# The hook itself, on a small model and the plain engine.
def _stage(tmp_path, save_every: int):
    from rlhf_cli.config.schema import SFTConfig
    from rlhf_cli.engine import TorchEngine

    cfg = SFTConfig(stage="sft")
    cfg.train.save_every, cfg.train.keep_checkpoints = save_every, 5
    model = torch.nn.Linear(2, 2)
    return cfg, SimpleNamespace(run=RunDir(tmp_path)), model, TorchEngine(model, cfg.train, 5, torch.float32)


def _signal_self(sig: signal.Signals) -> None:
    os.kill(os.getpid(), sig)
    assert preemption.requested() == sig.name  # Python runs the handler before the next bytecode


def test_without_a_signal_only_periodic_checkpoints_are_saved(tmp_path):
    from rlhf_cli.stages import checkpoint_if_due

    cfg, start, model, engine = _stage(tmp_path, save_every=2)
    with preemption.signals_recorded():
        for done in range(1, 6):
            checkpoint_if_due(cfg, start, done, 5, model, engine)
    assert [n for n, _ in start.run.checkpoints()] == [2, 4]


def test_a_signal_on_a_periodic_step_saves_once_and_stops(tmp_path, monkeypatch):
    import rlhf_cli.stages as stages

    cfg, start, model, engine = _stage(tmp_path, save_every=2)
    saved = []
    real_save = stages.save_checkpoint
    monkeypatch.setattr(stages, "save_checkpoint", lambda *a: saved.append(a[2]) or real_save(*a))
    with preemption.signals_recorded():
        stages.checkpoint_if_due(cfg, start, 1, 5, model, engine)
        _signal_self(signal.SIGTERM)
        with pytest.raises(preemption.Preempted) as stop:
            stages.checkpoint_if_due(cfg, start, 2, 5, model, engine)
    assert saved == [2]
    assert (stop.value.signal_name, stop.value.step) == ("SIGTERM", 2)


def test_a_signal_during_the_last_step_lets_the_run_finish(tmp_path):
    from rlhf_cli.stages import checkpoint_if_due

    cfg, start, model, engine = _stage(tmp_path, save_every=0)
    with preemption.signals_recorded():
        _signal_self(signal.SIGUSR1)
        checkpoint_if_due(cfg, start, 5, 5, model, engine)
    assert start.run.checkpoints() == []


def test_handlers_are_restored_and_the_flag_cleared_for_the_next_stage():
    before = {sig: signal.getsignal(sig) for sig in preemption.SIGNALS}
    with preemption.signals_recorded():
        _signal_self(signal.SIGUSR2)
    assert {sig: signal.getsignal(sig) for sig in preemption.SIGNALS} == before
    with preemption.signals_recorded():
        assert preemption.requested() is None


def _rank_processes(parent_pid: int) -> dict[int, int]:
    """RANK -> pid of the processes `launcher.nproc` started."""
    children = (open(f"/proc/{parent_pid}/task/{parent_pid}/children").read().split())
    ranks = {}
    for pid in map(int, children):
        environ = dict(item.split("=", 1) for item in open(f"/proc/{pid}/environ").read().split("\0") if "=" in item)
        ranks[int(environ["RANK"])] = pid
    return ranks


@pytest.mark.faults
def test_a_signal_to_one_process_stops_every_process_at_the_same_step(tmp_path):
    command = [sys.executable, "-m", "rlhf_cli", "sft", *ARGS, "train.max_steps=200", "train.batch_size=2",
               "launcher.nproc=2", "deepspeed=zero0", "output_dir=run"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        for line in process.stderr:
            if line.startswith("step 2/"):
                os.kill(_rank_processes(process.pid)[1], signal.SIGUSR1)  # the time-limit warning reached rank 1 only
                break
        _, rest = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == EXIT_PREEMPTED, rest
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert manifest["status"] == "preempted"
    (checkpoint,) = RunDir(tmp_path / "run").checkpoints()
    assert checkpoint[0] < 200 and {"rng.pt", "rng-rank1.pt", "trainer_state.json"} <= {p.name for p in checkpoint[1].iterdir()}

    resumed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert json.loads((tmp_path / "run/manifest.json").read_text())["status"] == "completed"

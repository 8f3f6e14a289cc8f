"""Fault injection: a stage (or a pipeline) SIGKILLed at chosen and at seeded random points (in a step,
while a checkpoint is written or sealed, while final/ is written, after final/ is in place but before
the manifest says so), then rerun with resume=auto, ends with the weights of an uninterrupted run
(1e-6), and no partial checkpoint is ever taken for a whole one. Also: a checkpoint damaged on disk
is passed over or refused, and an output_dir that cannot be written, or a disk that fills up, ends
the run with one `error:` line and nothing half-written that looks whole.

The kills come from a driver script that wraps one function of the package in the child process
(KILLER below): the package carries no test hook. `make test` runs dpo's kill; `make
test-faults` adds the other stages' kills, the random kills, the pipeline's and a real full disk (a tmpfs).
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rlhf_cli.runs import RunDir
from rlhf_cli.runs.checkpoint import SEAL, unsealed_reason
from tests.conftest import QUICK, signal_after_first_step

# Where a kill lands: (module:attribute wrapped in the child, kill before or after the real call).
KILL_POINTS = {
    "step": ("rlhf_cli.engine:TorchEngine.step", "before"),  # in an optimizer step, gradients computed
    "checkpoint-write": ("rlhf_cli.runs.checkpoint:save_model", "after"),  # weights written, optimizer state not
    "checkpoint-seal": ("rlhf_cli.runs.checkpoint:_sha256", "after"),  # files written, seal half done (also final/)
    "final-write": ("transformers:PreTrainedModel.save_pretrained", "after"),  # final/ weights, no tokenizer yet
    "final-published": ("rlhf_cli.runs:RunDir.complete", "before"),  # final/ in place, manifest still running
}

KILLER = """
import importlib, itertools, os, signal, sys
target, when, n = sys.argv.pop(1), sys.argv.pop(1), int(sys.argv.pop(1))
module, _, path = target.partition(":")
owner = importlib.import_module(module)
*parents, name = path.split(".")
for part in parents:
    owner = getattr(owner, part)
real, calls = getattr(owner, name), itertools.count(1)
def killing(*args, **kwargs):
    call = next(calls)  # one number per call, also when threads call at once (the seal hashes files in parallel)
    if call == n and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = real(*args, **kwargs)
    if call == n and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(owner, name, killing)
sys.argv = ["rlhf", *sys.argv[1:]]
from rlhf_cli.cli import main
main()
"""

STEPS = ["train.max_steps=6", "train.save_every=2", "train.batch_size=4", "train.log_every=1", "train.eval_every=0",
         "eval.max_samples=4"]
STAGE_ARGS = {
    "sft": ["eval.generate=0"],
    "train-rm": [],
    "dpo": ["eval.generate=0"],
    "grpo": ["eval.generate=0", "grpo.num_generations=2", "rollout.max_new_tokens=4", "grpo.beta=0.1",
             "grpo.rewards=[{name:model,path:runs/default/rm/final}]"],  # rewards that vary within a group
    "ppo": ["eval.generate=0", "rollout.max_new_tokens=4", "ppo.num_mini_batches=2", "ppo.critic_warmup_steps=0"],
}
PIPELINE = ["pipeline=dpo", *STEPS, "sft.eval.generate=0", "dpo.eval.generate=0"]


def _command(stage: str, output_dir: str, kill: tuple[str, int] | None = None) -> list[str]:
    args = [*STEPS, *STAGE_ARGS[stage]] if stage != "pipeline" else PIPELINE
    if kill is None:
        return [sys.executable, "-m", "rlhf_cli", stage, *args, f"output_dir={output_dir}"]
    point, n = kill
    return [sys.executable, "-c", KILLER, *KILL_POINTS[point], str(n), stage, *args, f"output_dir={output_dir}"]


def _run(cwd, stage: str, output_dir: str, kill: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_command(stage, output_dir, kill), cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """sft and train-rm runs in runs/default, which dpo, grpo and ppo chain from."""
    root = tmp_path_factory.mktemp("chain")
    for stage, directory in (("sft", "sft"), ("train-rm", "rm")):
        result = _run(root, stage, f"runs/default/{directory}")
        assert result.returncode == 0, result.stderr
    return root


@pytest.fixture(scope="module")
def straight(chain):
    """The final weights of each stage's run without interruption, made when first asked for."""
    made = {}

    def weights(stage: str) -> list[dict]:
        if stage not in made:
            result = _run(chain, stage, f"straight-{stage}")
            assert result.returncode == 0, result.stderr
            made[stage] = [_final_weights(d) for d in _pipeline_or_stage(chain / f"straight-{stage}", stage)]
        return made[stage]

    return weights


def _pipeline_or_stage(run, stage: str) -> list:
    return [run / "sft", run / "dpo"] if stage == "pipeline" else [run]


def _final_weights(run) -> dict:
    return load_file(run / "final/model.safetensors")


def _assert_nothing_partial_looks_whole(run) -> None:
    """Every checkpoint under its final name, and final/ when present, matches its seal."""
    for _, checkpoint in RunDir(run).checkpoints():
        assert unsealed_reason(checkpoint) is None, checkpoint
    if (run / "final").exists():
        assert unsealed_reason(run / "final") is None
    status = json.loads((run / "manifest.json").read_text())["status"] if (run / "manifest.json").exists() else None
    assert status != "completed" or (run / "final").is_dir()


def _kill_then_resume(cwd, stage: str, kills: list[tuple[str, int]]) -> int:
    """Run `stage` once per kill (each a rerun of the last), then to the end; the kills that landed."""
    landed = 0
    for kill in kills:
        result = _run(cwd, stage, "run", kill)
        if result.returncode == 0:  # the point was past what was left to do: the run finished
            break
        assert result.returncode == -signal.SIGKILL, result.stderr
        landed += 1
        for run in _pipeline_or_stage(cwd / "run", stage):
            if run.exists():
                _assert_nothing_partial_looks_whole(run)
    resumed = _run(cwd, stage, "run")
    assert resumed.returncode == 0, resumed.stderr
    return landed


def _assert_same_weights(cwd, stage: str, expected: list[dict]) -> None:
    for run, weights in zip(_pipeline_or_stage(cwd / "run", stage), expected):
        assert json.loads((run / "manifest.json").read_text())["status"] == "completed"
        _assert_nothing_partial_looks_whole(run)
        left = [p.name for p in [*run.iterdir(), *(run / "checkpoints").iterdir()] if p.name.startswith(".")]
        assert left == [], "temporaries of the killed runs were not removed"
        again = _final_weights(run)
        for name in weights:
            torch.testing.assert_close(again[name], weights[name], atol=1e-6, rtol=0)


# One kill per stage, each at another kind of point.
ONE_KILL = {
    "sft": ("checkpoint-write", 2),  # in the step-4 checkpoint: resumes from step-2
    "train-rm": ("checkpoint-seal", 5),  # in the step-4 checkpoint's seal (4 files a checkpoint)
    "dpo": ("final-write", 1),
    "grpo": ("step", 5),
    "ppo": ("final-published", 1),
}


# One of them in the default suite (in final/'s write); the rest under make test-faults, which CI runs.
IN_DEFAULT_SUITE = ("dpo",)


@pytest.mark.parametrize("stage", [s if s in IN_DEFAULT_SUITE else pytest.param(s, marks=pytest.mark.faults) for s in ONE_KILL])
def test_a_kill_then_resume_ends_with_the_weights_of_an_uninterrupted_run(chain, straight, stage):
    expected = straight(stage)
    cwd = chain / f"one-kill-{stage}"
    cwd.mkdir()
    (cwd / "runs").symlink_to(chain / "runs")
    assert _kill_then_resume(cwd, stage, [ONE_KILL[stage]]) == 1
    _assert_same_weights(cwd, stage, expected)


# How many times each wrapped function is called in a 6-step run (save_every=2): a kill draws its call.
CALLS = {"step": 6, "checkpoint-write": 2, "checkpoint-seal": 8, "final-write": 1, "final-published": 1}


def _random_kills(seed: int, count: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(point, rng.randint(1, CALLS[point])) for point in rng.choices(sorted(KILL_POINTS), k=count)]


@pytest.mark.faults
@pytest.mark.parametrize("stage", ["sft", "train-rm", "dpo", "grpo", "ppo", "pipeline"])
def test_seeded_random_kills_then_resume_end_with_the_weights_of_an_uninterrupted_run(chain, straight, stage):
    expected = straight(stage)
    cwd = chain / f"random-kills-{stage}"
    cwd.mkdir()
    (cwd / "runs").symlink_to(chain / "runs")
    kills = _random_kills(seed=list(STAGE_ARGS).index(stage) if stage in STAGE_ARGS else 99, count=4)
    landed = _kill_then_resume(cwd, stage, kills)
    print(f"{stage}: kills {kills}, {landed} landed")
    assert landed >= 1
    _assert_same_weights(cwd, stage, expected)


# A checkpoint damaged after it was written.
def _truncate(path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def test_a_damaged_checkpoint_is_passed_over_and_an_older_whole_one_resumed(chain, straight):
    expected = straight("sft")
    cwd = chain / "damaged"
    cwd.mkdir()
    killed = _run(cwd, "sft", "run", ("final-write", 1))  # checkpoints step-2 and step-4, no final
    assert killed.returncode == -signal.SIGKILL
    _truncate(cwd / "run/checkpoints/step-4/model.safetensors")

    resumed = _run(cwd, "sft", "run")
    assert resumed.returncode == 0, resumed.stderr
    assert f"warning: {cwd / 'run/checkpoints/step-4'}: not a whole checkpoint (model.safetensors has" in resumed.stderr
    assert f"resuming from {cwd / 'run/checkpoints/step-2'} (step 2)" in resumed.stderr
    _assert_same_weights(cwd, "sft", expected)


@pytest.mark.faults
def test_with_no_whole_checkpoint_resume_is_refused(chain):
    cwd = chain / "all-damaged"
    cwd.mkdir()
    assert _run(cwd, "sft", "run", ("final-write", 1)).returncode == -signal.SIGKILL
    (cwd / "run/checkpoints/step-2" / SEAL).unlink()
    with (cwd / "run/checkpoints/step-4/engine.pt").open("r+b") as handle:  # one byte changed, same size
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))

    resumed = _run(cwd, "sft", "run")
    assert resumed.returncode == 2
    assert "engine.pt does not match its sha256); passed over" in resumed.stderr
    assert f"no {SEAL}: it was never finished); passed over" in resumed.stderr
    assert resumed.stderr.strip().splitlines()[-1] == (
        f"error: output_dir={cwd / 'run'}: no whole checkpoint to resume from (2 failed their seal, see the warnings); "
        "resume=never starts over")
    explicit = subprocess.run([*_command("sft", "other"), f"resume={cwd / 'run/checkpoints/step-4'}"], cwd=cwd,
                              capture_output=True, text=True, timeout=600)
    assert explicit.returncode == 2 and "not a whole checkpoint (engine.pt does not match its sha256)" in explicit.stderr


def test_a_later_stage_refuses_a_truncated_final(rlhf, tmp_path):
    assert rlhf("sft", *QUICK).exit_code == 0
    _truncate(tmp_path / "runs/default/sft/final/model.safetensors")
    result = rlhf("dpo", *QUICK)
    assert result.exit_code == 2
    assert "runs/default/sft/final: not whole (model.safetensors has" in result.output
    assert "rerun `rlhf sft` with resume=never" in result.output


# The disk: an output_dir that cannot be written, and a write that fails part way.
def test_an_output_dir_that_cannot_be_made_is_an_error_before_anything_runs(rlhf, tmp_path):
    (tmp_path / "afile").write_text("")
    for output_dir, message in [("afile/run", f"{tmp_path / 'afile'} is a file, not a directory"),
                                ("afile", "exists and is not a directory")]:
        result = rlhf("sft", *QUICK, f"output_dir={output_dir}")
        assert result.exit_code == 2
        assert result.output.strip() == f"error: output_dir={output_dir}: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_full_disk_while_a_checkpoint_is_written_ends_the_run_and_keeps_the_whole_ones(rlhf, tmp_path, monkeypatch):
    import rlhf_cli.runs.checkpoint as checkpoint

    real, calls = checkpoint.save_model, []

    def disk_fills_on_the_second(model, filename):
        calls.append(filename)
        if len(calls) == 2:
            with open(filename, "wb") as handle:
                handle.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        real(model, filename)

    monkeypatch.setattr(checkpoint, "save_model", disk_fills_on_the_second)
    args = ["sft", *QUICK, "train.max_steps=4", "train.save_every=1", "data.eval_size=0"]
    full = rlhf(*args, "output_dir=run")
    assert full.exit_code == 74
    assert full.output.strip().splitlines()[-1].startswith(
        f"error: {tmp_path / 'run/checkpoints/step-2'}: not written (No space left on device; ")
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["step-1"]  # no temporary left behind
    assert unsealed_reason(tmp_path / "run/checkpoints/step-1") is None
    assert json.loads((tmp_path / "run/manifest.json").read_text())["status"] == "failed"

    monkeypatch.setattr(checkpoint, "save_model", real)  # space freed: the same command continues
    again = rlhf(*args, "output_dir=run")
    assert again.exit_code == 0, again.output
    assert f"resuming from {tmp_path / 'run/checkpoints/step-1'} (step 1)" in again.output


def test_a_full_disk_while_final_is_written_leaves_no_final_and_no_completed_run(rlhf, tmp_path, monkeypatch):
    import rlhf_cli.runs.checkpoint as checkpoint

    real_seal = checkpoint.seal

    def disk_fills_at_final(directory):
        if directory.name.startswith(".final"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / SEAL))
        real_seal(directory)

    monkeypatch.setattr(checkpoint, "seal", disk_fills_at_final)
    result = rlhf("sft", *QUICK, "output_dir=run")
    assert result.exit_code == 74 and f"error: {tmp_path / 'run/final'}: not written (No space left" in result.output
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml", "manifest.json", "metrics.jsonl"]
    assert json.loads((tmp_path / "run/manifest.json").read_text())["status"] == "failed"


def test_a_full_disk_anywhere_else_in_a_run_is_one_error_line_too(rlhf, tmp_path, monkeypatch):
    from rlhf_cli.metrics import MetricsLogger

    real_log = MetricsLogger.log

    def disk_fills_at_step_2(self, step, metrics):
        if step == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        real_log(self, step, metrics)

    monkeypatch.setattr(MetricsLogger, "log", disk_fills_at_step_2)
    result = rlhf("sft", *QUICK, "output_dir=run")
    assert result.exit_code == 74
    assert result.output.strip().splitlines()[-1] == f"error: {tmp_path / 'run/metrics.jsonl'}: No space left on device"


def test_too_little_free_space_for_a_checkpoint_is_an_error_before_training(rlhf, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    result = rlhf("sft", *QUICK, "output_dir=run")
    assert result.exit_code == 74
    assert f"error: output_dir={tmp_path / 'run'}: 0.00 GB free on its disk, and a checkpoint needs about 0.01 GB" in result.output
    assert not (tmp_path / "run/metrics.jsonl").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs: one checkpoint of the tiny model (13 MB) fits, a second beside it does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24M", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.faults
def test_a_real_full_disk_then_more_space_resumes_to_the_uninterrupted_weights(chain, straight, small_disk):
    expected = straight("sft")
    full = _run(small_disk, "sft", "run")
    assert full.returncode == 74, full.stderr
    assert full.stderr.strip().splitlines()[-1].startswith(f"error: {small_disk / 'run/checkpoints/step-4'}: not written (")
    assert sorted(p.name for p in (small_disk / "run/checkpoints").iterdir()) == ["step-2"]
    _assert_nothing_partial_looks_whole(small_disk / "run")

    subprocess.run(["mount", "-o", "remount,size=64M", str(small_disk)], check=True)
    resumed = _run(small_disk, "sft", "run")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_weights(small_disk, "sft", expected)

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    read_only = _run(small_disk, "sft", "another")
    assert read_only.returncode == 74
    assert f"error: output_dir=another: {small_disk} is not writable" in read_only.stderr


# SLURM's time-limit warning and preemption in every stage, under make test-faults (tests/test_preemption.py:
# sft in depth, in the default suite).
@pytest.mark.parametrize("stage, sig", [
    pytest.param("ppo", signal.SIGTERM, marks=pytest.mark.faults, id="ppo-SIGTERM"),
    pytest.param("train-rm", signal.SIGUSR1, marks=pytest.mark.faults, id="train-rm-SIGUSR1"),
    pytest.param("dpo", signal.SIGTERM, marks=pytest.mark.faults, id="dpo-SIGTERM"),
    pytest.param("grpo", signal.SIGUSR1, marks=pytest.mark.faults, id="grpo-SIGUSR1"),
    pytest.param("pipeline", signal.SIGUSR1, marks=pytest.mark.faults, id="pipeline-SIGUSR1"),
])
def test_a_stop_signal_in_any_stage_checkpoints_exits_75_and_the_rerun_ends_with_the_same_weights(chain, straight, stage, sig):
    from rlhf_cli.cli import EXIT_PREEMPTED

    expected = straight(stage)
    cwd = chain / f"signal-{stage}"
    cwd.mkdir()
    (cwd / "runs").symlink_to(chain / "runs")
    stopped = signal_after_first_step(_command(stage, "run"), cwd, sig)
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr
    assert f"error: stopped by {sig.name} after step " in stopped.stderr
    first = _pipeline_or_stage(cwd / "run", stage)[0]  # a pipeline's sft
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["status"] == "preempted" and manifest["preempted"]["step"] < 6
    assert manifest["preempted"]["step"] == RunDir(first).checkpoints()[-1][0]
    _assert_nothing_partial_looks_whole(first)

    resumed = _run(cwd, stage, "run")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_weights(cwd, stage, expected)

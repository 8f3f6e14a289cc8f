"""The SLURM templates (scripts/slurm/) and hydra/launcher=slurm.

Tests marked `slurm` submit real jobs: `make test-slurm` starts a one-node cluster on this machine
(scripts/slurm-local.sh) and runs them; without `sbatch` or a cluster answering `sinfo` they skip.
Every job has a time limit and every wait a deadline, so nothing hangs."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "scripts/slurm"
SINGLE_NODE = TEMPLATES / "single-node.sbatch"
MULTI_NODE = TEMPLATES / "multi-node.sbatch"

# Long enough to be signalled after its first logged step, short enough for a test. --time=10 keeps
# the templates' 300 s time-limit warning out of the way (it comes 4 to 5 minutes in).
# Enough steps that a run is still training a few polls (0.5 s each) after its first step is logged.
ARGS = ["train.max_steps=400", "train.batch_size=4", "train.log_every=1", "train.save_every=0", "train.eval_every=0",
        "train.warmup_ratio=0.1", "eval.generate=0", "eval.max_samples=8"]
JOB_MINUTES = "10"
DEADLINE_S = 300


# Without a cluster.
def test_templates_are_valid_bash_with_the_preemption_directives():
    for template in (SINGLE_NODE, MULTI_NODE):
        assert subprocess.run(["bash", "-n", str(template)]).returncode == 0
        text = template.read_text()
        for directive in ("--signal=B:USR1@", "--requeue", "--open-mode=append", "--time="):
            assert f"#SBATCH {directive}" in text, (template.name, directive)


def test_the_slurm_launcher_extends_submitit_slurm(rlhf):
    result = rlhf("sft", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra")
    assert result.exit_code == 0, result.output
    for line in ("_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
                 "signal_delay_s: 300", "max_num_timeout: 3", "timeout_min: 240", "partition: gpu"):
        assert line in result.output


# With a cluster.
@pytest.fixture(scope="module")
def cluster():
    if shutil.which("sbatch") is None:
        pytest.skip("no sbatch here (start a local cluster: scripts/slurm-local.sh start)")
    if subprocess.run(["sinfo"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("sinfo fails: no SLURM controller answers (scripts/slurm-local.sh start)")


def _sbatch(cwd: Path, template: Path, *args: str, options: tuple[str, ...] = (), env: dict | None = None) -> str:
    """Submit `template sft ARGS`; the job finds `rlhf` and `torchrun` of this Python environment."""
    env = dict(env or os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    submitted = subprocess.run(["sbatch", "--parsable", f"--time={JOB_MINUTES}", *options, str(template), "sft", *args],
                               cwd=cwd, capture_output=True, text=True, timeout=60, env=env)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def _wait_until(condition, what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def _queued(job: str) -> bool:
    return bool(subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip())


def _wait_for_job(job: str) -> None:
    try:
        _wait_until(lambda: not _queued(job), f"job {job} to leave the queue")
    except AssertionError:
        subprocess.run(["scancel", job])
        raise


def _log_shows(path: Path, pattern: str) -> bool:
    return path.is_file() and re.search(pattern, path.read_text(errors="replace"), re.MULTILINE) is not None


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _assert_same_weights(run: Path, reference: Path) -> None:
    expected = load_file(reference / "final/model.safetensors")
    got = load_file(run / "final/model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def straight(cluster, tmp_path_factory):
    """(a) single-node.sbatch runs `rlhf sft` to completion: the run every interrupted one must match."""
    cwd = tmp_path_factory.mktemp("straight")
    started = time.time()
    job = _sbatch(cwd, SINGLE_NODE, *ARGS, "output_dir=run")
    _wait_for_job(job)
    print(f"single-node job {job}: {time.time() - started:.1f} s from sbatch to the end")
    log = cwd / f"slurm-rlhf-{job}.out"
    assert _log_shows(log, r"rlhf exited with status 0$"), log.read_text()
    assert _manifest(cwd / "run")["status"] == "completed"
    assert (cwd / "run/final/model.safetensors").is_file()
    return cwd / "run"


@pytest.mark.slurm
def test_single_node_template_runs_a_stage_to_completion(straight):
    assert _manifest(straight)["resumed_from"] is None


@pytest.mark.slurm
def test_single_node_template_runs_one_process_per_task(cluster, tmp_path):
    """--ntasks-per-node=2: the template adds launcher.nproc=2, and the two processes finish the run."""
    job = _sbatch(tmp_path, SINGLE_NODE, *ARGS, "deepspeed=zero2", "output_dir=run", options=("--ntasks-per-node=2",))
    _wait_for_job(job)
    text = (tmp_path / f"slurm-rlhf-{job}.out").read_text()
    assert "launcher.nproc=2" in text and "rlhf exited with status 0" in text, text
    manifest = _manifest(tmp_path / "run")
    assert manifest["status"] == "completed" and manifest["config"]["launcher"]["nproc"] == 2


@pytest.mark.slurm
def test_time_limit_warning_checkpoints_requeues_and_ends_with_the_same_weights(straight, tmp_path):
    """(c) SIGUSR1 to the batch shell, as SLURM sends it before the time limit."""
    started = time.time()
    job = _sbatch(tmp_path, SINGLE_NODE, *ARGS, "output_dir=run")
    log = tmp_path / f"slurm-rlhf-{job}.out"
    _wait_until(lambda: _log_shows(log, r"^step 1/"), "the first step")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    _wait_for_job(job)
    print(f"USR1 job {job}: {time.time() - started:.1f} s from sbatch to the end, requeue included")
    text = log.read_text()
    assert re.search(r"error: stopped by SIGUSR1 after step \d+", text), text
    assert "rlhf exited with status 75" in text and f"job {job}, start 2," in text
    assert re.search(r"resuming from .*/run/checkpoints/step-\d+", text), text
    manifest = _manifest(tmp_path / "run")
    assert manifest["status"] == "completed" and manifest["resumed_from"]
    _assert_same_weights(tmp_path / "run", straight)


@pytest.mark.slurm
def test_scancel_stays_cancelled_and_a_requeue_by_slurm_resumes(straight, tmp_path):
    """SIGTERM checkpoints too, but the template requeues only after the time-limit warning: a
    scancelled job stays cancelled, and one that SLURM requeues itself (preemption with
    PreemptMode=REQUEUE; `scontrol requeue` here) resumes."""
    cancelled = _sbatch(tmp_path, SINGLE_NODE, *ARGS, "output_dir=cancelled")
    requeued = _sbatch(tmp_path, SINGLE_NODE, *ARGS, "output_dir=requeued")
    logs = {job: tmp_path / f"slurm-rlhf-{job}.out" for job in (cancelled, requeued)}
    _wait_until(lambda: _log_shows(logs[cancelled], r"^step 1/"), "the first step of the job to cancel")
    subprocess.run(["scancel", cancelled], check=True)
    _wait_until(lambda: _log_shows(logs[requeued], r"^step 1/"), "the first step of the job to requeue")
    subprocess.run(["scontrol", "requeue", requeued], check=True)
    _wait_for_job(cancelled)
    _wait_for_job(requeued)

    text = logs[cancelled].read_text()
    assert re.search(r"error: stopped by SIGTERM after step \d+", text) and "rlhf exited with status 75" in text, text
    assert f"job {cancelled}, start 2," not in text
    assert _manifest(tmp_path / "cancelled")["status"] == "preempted"

    text = logs[requeued].read_text()
    assert re.search(r"error: stopped by SIGTERM after step \d+", text) and f"job {requeued}, start 2," in text, text
    assert _manifest(tmp_path / "requeued")["resumed_from"]
    _assert_same_weights(tmp_path / "requeued", straight)


@pytest.mark.slurm
def test_multi_node_template_on_one_node_passes_the_signal_through_srun_and_torchrun(straight, tmp_path):
    """multi-node.sbatch with --nodes=1 and one process: srun, torchrun's static rendezvous, the
    signal reaching the stage through both, and the requeue on torchrun's exit status."""
    env = {**os.environ, "NPROC_PER_NODE": "1", "RDZV_PORT": str(_free_port())}
    started = time.time()
    job = _sbatch(tmp_path, MULTI_NODE, *ARGS, "output_dir=run", options=("--nodes=1",), env=env)
    log = tmp_path / f"slurm-rlhf-{job}.out"
    _wait_until(lambda: _log_shows(log, r"^step 1/"), "the first step")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    _wait_for_job(job)
    print(f"multi-node template job {job}: {time.time() - started:.1f} s, requeue included")
    text = log.read_text()
    assert re.search(r"error: stopped by SIGUSR1 after step \d+", text), text
    assert f"job {job}, start 2," in text and "the stage exited with status 0" in text
    assert _manifest(tmp_path / "run")["resumed_from"]
    _assert_same_weights(tmp_path / "run", straight)


@pytest.mark.slurm
def test_a_sweep_through_hydra_launcher_slurm_runs_every_job(cluster, tmp_path):
    """(b) Two sweep points, two SLURM jobs (one array)."""
    started = time.time()
    sweep = subprocess.run(
        [sys.executable, "-m", "rlhf_cli", "sft", "-m", "hydra/launcher=slurm", f"hydra.launcher.timeout_min={JOB_MINUTES}",
         "train.lr=1e-3,2e-3", *ARGS, "output_dir=run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=DEADLINE_S)
    assert sweep.returncode == 0, sweep.stderr
    print(f"two-job sweep: {time.time() - started:.1f} s")
    runs = sorted(p.parent for p in tmp_path.glob("run-sweep/*/*/manifest.json"))
    assert [r.name for r in runs] == ["0_train.lr=0.001", "1_train.lr=0.002"]
    for run in runs:
        manifest = _manifest(run)
        assert manifest["status"] == "completed" and (run / "final/model.safetensors").is_file()
    assert {_manifest(r)["config"]["train"]["lr"] for r in runs} == {1e-3, 2e-3}


@pytest.mark.slurm
def test_submitit_preemption_checkpoints_then_submitit_requeues_and_the_job_resumes(straight, tmp_path):
    """SIGUSR2 to a job of hydra/launcher=slurm: our checkpoint first, then submitit's own requeue."""
    started = time.time()
    sweep = subprocess.Popen(
        [sys.executable, "-m", "rlhf_cli", "sft", "-m", "hydra/launcher=slurm", f"hydra.launcher.timeout_min={JOB_MINUTES}",
         *ARGS, "output_dir=run"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        logs = lambda: list(tmp_path.glob("run-sweep/*/.submitit/*/*_log.err"))  # noqa: E731
        _wait_until(lambda: any(_log_shows(p, r"^step 1/") for p in logs()), "the first step")
        (job,) = {p.parent.name for p in logs()}
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        _, stderr = sweep.communicate(timeout=DEADLINE_S)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 0, stderr
    print(f"submitit USR2 job {job}: {time.time() - started:.1f} s, requeue included")
    (run,) = [p.parent for p in tmp_path.glob("run-sweep/*/*/manifest.json")]
    text = "".join(p.read_text(errors="replace") for p in logs()[0].parent.glob("*_log.*"))  # stderr and stdout
    assert re.search(r"error: stopped by SIGUSR2 after step \d+", text), text
    assert f"Requeued job {job.split('_')[0]}" in text, text
    manifest = _manifest(run)
    assert manifest["status"] == "completed" and manifest["resumed_from"]
    _assert_same_weights(run, straight)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

"""Kill a run after a checkpoint, resume it, and get the weights of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import read_jsonl

ARGS = ["train.max_steps=120", "train.save_every=10", "train.batch_size=16", "train.log_every=5",
        "train.eval_every=0", "eval.generate=0", "eval.max_samples=16", "train.warmup_ratio=0.1"]


def _rlhf(cwd, *args, wait=True):
    command = [sys.executable, "-m", "rlhf_cli", "sft", *ARGS, *args]
    if wait:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


# Under make test-faults (CI runs it): the default suite's kill-then-resume is test_faults.py's sft
# killed in a checkpoint write.
@pytest.mark.faults
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    # An uninterrupted run.
    done = _rlhf(tmp_path, "output_dir=straight")
    assert done.returncode == 0, done.stderr

    # The same run, SIGKILLed once its step-20 checkpoint is whole.
    process = _rlhf(tmp_path, "output_dir=killed", wait=False)
    checkpoint = tmp_path / "killed/checkpoints/step-20"
    deadline = time.time() + 240
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.exists()
    assert not (tmp_path / "killed/final").exists(), "the run finished before it could be killed"
    run_id = json.loads((tmp_path / "killed/manifest.json").read_text())["run_id"]

    resumed = _rlhf(tmp_path, "output_dir=killed", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert json.loads((tmp_path / "killed/manifest.json").read_text())["run_id"] == run_id  # the same run, continued

    straight = load_file(tmp_path / "straight/final/model.safetensors")
    again = load_file(tmp_path / "killed/final/model.safetensors")
    for name in straight:
        torch.testing.assert_close(again[name], straight[name], atol=1e-6, rtol=0)
    # Metrics are logged once per step: the lines after the checkpoint were replaced, not duplicated.
    steps = [m["step"] for m in read_jsonl(tmp_path / "killed/metrics.jsonl") if "loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 120
    losses = {m["step"]: m["loss"] for m in read_jsonl(tmp_path / "straight/metrics.jsonl") if "loss" in m}
    for m in read_jsonl(tmp_path / "killed/metrics.jsonl"):
        if "loss" in m:
            assert abs(m["loss"] - losses[m["step"]]) < 1e-5

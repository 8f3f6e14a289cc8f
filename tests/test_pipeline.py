"""`rlhf pipeline`: stages chained in one run directory, skipped when done, continued when killed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

SHORT = ["pipeline=dpo", "train.max_steps=3", "train.batch_size=4", "train.log_every=1", "eval.max_samples=4",
         "sft.eval.generate=0", "dpo.eval.generate=0"]


def _status(run):
    return json.loads((run / "manifest.json").read_text())["status"]


def test_runs_the_preset_then_skips_what_is_done_and_retrains_what_changed(rlhf, tmp_path):
    result = rlhf("pipeline", *SHORT)
    assert result.exit_code == 0, result.output
    runs = tmp_path / "runs/default"
    assert _status(runs / "sft") == _status(runs / "dpo") == "completed"
    dpo = json.loads((runs / "dpo/manifest.json").read_text())
    assert (runs / "report/index.html").is_file() and "report: runs/default/report/index.html" in result.output
    assert dpo["parents"]["model"]["run_id"] == json.loads((runs / "sft/manifest.json").read_text())["run_id"]

    again = rlhf("pipeline", *SHORT)
    assert again.exit_code == 0 and "already complete; nothing to do" in again.output
    assert json.loads((runs / "dpo/manifest.json").read_text())["run_id"] == dpo["run_id"]

    changed = rlhf("pipeline", *SHORT, "dpo.dpo.beta=0.2")
    assert changed.exit_code == 0, changed.output
    assert "sft (runs/default/sft): complete with this config: skipped" in changed.output
    assert "dpo.beta: 0.1 -> 0.2" in changed.output
    assert json.loads((runs / "dpo/manifest.json").read_text())["config"]["dpo"]["beta"] == 0.2

    upstream = rlhf("pipeline", *SHORT, "dpo.dpo.beta=0.2", "sft.train.lr=2e-3")
    assert upstream.exit_code == 0, upstream.output
    assert "sft/final was trained again since it started from it" in upstream.output  # dpo follows its parent


def test_bad_keys_and_stages_fail_before_anything_runs(rlhf, tmp_path):
    for args, message in [
        (["dpo.train.lrr=1"], "unknown key 'train.lrr'"),
        (["ppo.train.lr=1"], "ppo.train.lr=1: stage ppo is not in pipeline 'dpo' (sft, dpo)"),
        (["pipeline=nope"], "'nope' is not a preset (choose from all, dpo, grpo, rlhf)"),
        (["-m"], "sweeps and --cfg belong to single stages"),
    ]:
        result = rlhf("pipeline", *SHORT, *args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


LONG = ["pipeline=dpo", "train.batch_size=4", "train.log_every=5", "eval.max_samples=4", "sft.eval.generate=0",
        "dpo.eval.generate=0", "sft.train.max_steps=40", "dpo.train.max_steps=40", "train.save_every=10"]


def _pipeline(cwd, *args, wait=True):
    command = [sys.executable, "-m", "rlhf_cli", "pipeline", *LONG, *args]
    if wait:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    result = _pipeline(root, "output_dir=runs/straight")
    assert result.returncode == 0, result.stderr
    return root / "runs/straight"


# Under make test-faults (CI runs it); the default suite's pipeline test reruns a finished pipeline.
@pytest.mark.faults
@pytest.mark.parametrize("killed_in", ["sft", "dpo"])
def test_a_pipeline_killed_in_any_stage_finishes_with_the_same_models(tmp_path, uninterrupted, killed_in):
    process = _pipeline(tmp_path, "output_dir=runs/killed", wait=False)
    checkpoint = tmp_path / f"runs/killed/{killed_in}/checkpoints/step-10"
    deadline = time.time() + 300
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.exists() and not (tmp_path / f"runs/killed/{killed_in}/final").exists()

    resumed = _pipeline(tmp_path, "output_dir=runs/killed")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{killed_in} (runs/killed/{killed_in}): running: continues from its checkpoints" in resumed.stderr
    for stage in ("sft", "dpo"):
        straight = load_file(uninterrupted / stage / "final/model.safetensors")
        again = load_file(tmp_path / "runs/killed" / stage / "final/model.safetensors")
        for name in straight:
            torch.testing.assert_close(again[name], straight[name], atol=1e-6, rtol=0)

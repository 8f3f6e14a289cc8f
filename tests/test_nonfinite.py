"""A NaN or Inf loss or gradient: the update is skipped and counted, too many in a row stop the run
with one `error:` line, and non-finite weights are never written, on the plain engine and DeepSpeed."""

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rlhf_cli.errors import UserError
from tests.conftest import QUICK, read_jsonl

ARGS = [*QUICK, "train.max_steps=6", "train.save_every=1", "train.keep_checkpoints=10", "data.eval_size=0"]

# In a child process, the sft loss of the listed optimizer steps (1-based, one micro-batch each) made
# NaN ("loss"), or left finite with NaN gradients behind it ("gradient").
POISONED = """
import sys
import torch
import rlhf_cli.stages.sft as sft
what, steps = sys.argv.pop(1), {int(s) for s in sys.argv.pop(1).split(",")}
real, calls = sft.sft_loss, [0]
class NaNGradient(torch.autograd.Function):
    forward = staticmethod(lambda ctx, x: x.clone())
    backward = staticmethod(lambda ctx, grad: grad * float("nan"))
def poisoned(*args):
    calls[0] += 1
    loss = real(*args)
    if calls[0] not in steps:
        return loss
    return loss * float("nan") if what == "loss" else NaNGradient.apply(loss)
sft.sft_loss = poisoned
sys.argv = ["rlhf", *sys.argv[1:]]
from rlhf_cli.cli import main
main()
"""


def _poisoned_run(cwd, steps: str, *args: str, what: str = "loss") -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", POISONED, what, steps, "sft", *ARGS, "output_dir=run", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def _all_finite(path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(path).values())


@pytest.mark.parametrize("deepspeed, what", [
    ("none", "loss"), ("none", "gradient"),
    pytest.param("zero0", "gradient", marks=pytest.mark.faults),
    pytest.param("zero2", "loss", marks=pytest.mark.faults),
    pytest.param("zero2", "gradient", marks=pytest.mark.faults),
])
def test_a_nan_step_is_skipped_and_counted(tmp_path, deepspeed, what):
    result = _poisoned_run(tmp_path, "3", f"deepspeed={deepspeed}", what=what)
    assert result.returncode == 0, result.stderr
    counted = {m["step"]: m["nonfinite_steps"] for m in read_jsonl(tmp_path / "run/metrics.jsonl") if "nonfinite_steps" in m}
    assert counted == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 1}
    if deepspeed == "none":  # the skipped step changed nothing: its checkpoint holds step 2's weights
        before, skipped = (load_file(tmp_path / f"run/checkpoints/step-{n}/model.safetensors") for n in (2, 3))
        for name in before:
            assert torch.equal(skipped[name], before[name]), name
    assert _all_finite(tmp_path / "run/final/model.safetensors")


@pytest.mark.parametrize("deepspeed", ["none", pytest.param("zero3", marks=pytest.mark.faults)])
def test_nan_steps_in_a_row_stop_the_run_and_nothing_non_finite_is_saved(tmp_path, deepspeed):
    result = _poisoned_run(tmp_path, "3,4,5,6", "train.max_nonfinite_steps=2", f"deepspeed={deepspeed}")
    assert result.returncode == 2, result.stderr
    assert "error: non-finite loss or gradient norm (NaN or Inf) at step 5, 3 optimizer steps in a row " \
           "(train.max_nonfinite_steps=2)" in result.stderr
    assert "Traceback" not in result.stderr
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert manifest["status"] == "failed" and not (tmp_path / "run/final").exists()
    # Skipped updates: steps 3 and 4 saved step 2's weights (each save checks they are finite).
    saved = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert saved == ["step-1", "step-2", "step-3", "step-4"]
    if deepspeed == "none":
        assert all(_all_finite(tmp_path / f"run/checkpoints/{name}/model.safetensors") for name in saved)


def test_zero_tolerance_stops_at_the_first_nan_step(tmp_path):
    result = _poisoned_run(tmp_path, "2", "train.max_nonfinite_steps=0")
    assert result.returncode == 2 and "at step 2, 1 optimizer steps in a row" in result.stderr, result.stderr


def test_the_plain_engine_leaves_weights_moments_and_schedule_alone_on_a_nan_step():
    from rlhf_cli.config.schema import TrainConfig
    from rlhf_cli.engine import TorchEngine

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    engine = TorchEngine(model, TrainConfig(lr=0.1, warmup_ratio=0.5), 4, torch.float32)
    engine.backward(model(torch.ones(2, 3)).sum())
    engine.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before, lr_before = json.dumps(engine.state_dict()["optimizer"]["state"], default=str), engine.lr

    engine.backward(model(torch.ones(2, 3)).sum() * math.inf)
    assert engine.step() == math.inf
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert json.dumps(engine.state_dict()["optimizer"]["state"], default=str) == state_before and engine.lr == lr_before
    assert all(p.grad is None for p in model.parameters())  # the bad gradients are not carried into the next step
    assert (engine.nonfinite.total, engine.nonfinite.in_a_row) == (1, 1)

    engine.backward(model(torch.ones(2, 3)).sum())
    engine.step()
    assert (engine.nonfinite.total, engine.nonfinite.in_a_row) == (1, 0)
    assert engine.lr != lr_before
    assert engine.state_dict()["nonfinite"] == {"total": 1, "in_a_row": 0}  # a resume continues the count


def test_non_finite_weights_are_refused_before_anything_is_written(tmp_path):
    from types import SimpleNamespace

    from rlhf_cli.config.schema import SFTConfig
    from rlhf_cli.engine import TorchEngine
    from rlhf_cli.runs import RunDir
    from rlhf_cli.stages import save_checkpoint

    cfg = SFTConfig(stage="sft")
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.bias[1] = math.nan
    engine = TorchEngine(model, cfg.train, 5, torch.float32)
    with pytest.raises(UserError, match=r"checkpoint step-3 of .* not written: the weights hold NaN or Inf \(bias\)"):
        save_checkpoint(cfg, SimpleNamespace(run=RunDir(tmp_path)), 3, model, engine)
    assert list(tmp_path.iterdir()) == []


def test_max_nonfinite_steps_must_not_be_negative(rlhf):
    result = rlhf("sft", *QUICK, "train.max_nonfinite_steps=-1")
    assert result.exit_code == 2 and "train.max_nonfinite_steps" in result.output and "non-negative" in result.output

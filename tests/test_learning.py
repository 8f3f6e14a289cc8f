"""Learning quality (slow: `make test-slow`): the default chain learns the built-in task.

Measured on 2 cores (README): sft reaches 0.43-0.66 held-out exact match in 1,800 steps (float
rounding moves it); train-rm from it ranks held-out near-miss pairs; dpo from it learns the
preferences and keeps the task; grpo from it adds at least 15 points of held-out exact match in
1,000 steps; ppo against the reward model raises
its score and the task accuracy while KL to the reference stays around its target.
"""

import json

import pytest
from typer.testing import CliRunner

from tests.conftest import read_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """`rlhf sft && rlhf train-rm && rlhf dpo && rlhf grpo && rlhf ppo` with no overrides, in a fresh directory."""
    import os

    from rlhf_cli.cli import app

    root = tmp_path_factory.mktemp("chain")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for stage in ("sft", "train-rm", "dpo", "grpo", "ppo"):
            result = CliRunner().invoke(app, [stage])
            assert result.exit_code == 0, result.output
    finally:
        os.chdir(cwd)
    return root / "runs/default"


def _final(run):
    return json.loads((run / "manifest.json").read_text())["final_metrics"]


def test_default_sft_learns_arithmetic(chain):
    losses = [m["loss"] for m in read_jsonl(chain / "sft/metrics.jsonl") if "loss" in m]
    assert losses[-1] < 0.2 * losses[0]
    assert _final(chain / "sft")["eval/accuracy"] >= 0.3  # a fresh model scores 0


def test_default_reward_model_ranks_held_out_near_misses(chain):
    # Measured with two seeds: 0.918 and 0.830 (README); 2,000 steps ended between 0.742 and 0.832.
    assert _final(chain / "rm")["eval/accuracy"] >= 0.8


def test_default_dpo_learns_the_preferences_without_losing_the_task(chain):
    logged = read_jsonl(chain / "dpo/metrics.jsonl")
    start = next(m for m in logged if m["step"] == 0)
    final = _final(chain / "dpo")
    assert final["eval/rewards/accuracy"] >= 0.9
    # The policy prefers the chosen answer more often than the SFT model it started from ...
    assert final["eval/preference_accuracy"] > start["eval/preference_accuracy"]
    # ... and greedy accuracy on the task does not fall below that start (DPO alone can wreck it).
    assert final["eval/accuracy"] >= start["eval/accuracy"]


def test_default_grpo_raises_held_out_accuracy_by_15_points(chain):
    start = next(m for m in read_jsonl(chain / "grpo/metrics.jsonl") if m["step"] == 0)
    assert _final(chain / "grpo")["eval/accuracy"] >= start["eval/accuracy"] + 0.15


def test_default_ppo_raises_reward_keeps_accuracy_within_its_kl_target(chain):
    logged = read_jsonl(chain / "ppo/metrics.jsonl")
    start = next(m for m in logged if m["step"] == 0)
    final = _final(chain / "ppo")
    # PPO optimises the reward model's score (measured: +0.67 and +0.54 in two trajectories). Its
    # held-out exact match moved +8.8 and +2.6 points, within the 2-3 point noise of 500 problems in
    # the second, so accuracy is held to not falling rather than to a gain.
    assert final["eval/reward"] >= start["eval/reward"] + 0.3
    assert final["eval/accuracy"] >= start["eval/accuracy"] - 0.01
    # The adaptive controller holds KL around its target: below it on average, never far above it.
    target = json.loads((chain / "ppo/manifest.json").read_text())["config"]["ppo"]["kl_target"]
    kl = [m["kl"] for m in logged if "kl" in m]
    assert sum(kl) / len(kl) < target and max(kl) < 1.5 * target

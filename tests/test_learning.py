"""Learning quality (slow: `make test-slow`): the default chain learns the built-in task.

Measured on 2 cores: sft reaches 0.47 held-out exact match in 1,800 steps, and train-rm from it
0.92 pairwise accuracy on held-out pairs.
"""

import json

import pytest
from typer.testing import CliRunner

from tests.conftest import read_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """`rlhf sft && rlhf train-rm` with no overrides, in a fresh directory."""
    import os

    from rlhf_cli.cli import app

    root = tmp_path_factory.mktemp("chain")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for stage in ("sft", "train-rm"):
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


def test_default_reward_model_ranks_held_out_pairs(chain):
    assert _final(chain / "rm")["eval/accuracy"] >= 0.9

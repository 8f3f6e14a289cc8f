"""bench/vs_trl.py's own arithmetic (TRL, a benchmark-only extra, is not needed for these)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "vs_trl.py"


@pytest.fixture(scope="module")
def vs_trl():
    spec = importlib.util.spec_from_file_location("vs_trl", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flops_per_token_counts_key_and_value_projections_by_key_value_heads(vs_trl, tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=100)
    config.save_pretrained(tmp_path / "causal")
    # q and o: 64 x 4 heads x 16 each; k and v: 64 x 2 heads x 16 each; MLP 3 x 64 x 128; the head 64 x 100.
    matmul_parameters = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) + 64 * 100
    attention = 12 * 2 * 4 * 16 * 10
    assert vs_trl.flops_per_token(tmp_path, mean_length=10) == 6 * matmul_parameters + attention


def test_first_step_losses_agree_to_1e_4_in_float32_and_to_a_share_of_the_loss_in_bf16(vs_trl):
    assert vs_trl.losses_agree(5.0, 5.0 + 0.9e-4, "cpu")
    assert not vs_trl.losses_agree(5.0, 5.0 + 1.1e-4, "cpu")
    assert vs_trl.losses_agree(5.0, 5.02, "cuda")  # 0.4% of the loss
    assert not vs_trl.losses_agree(5.0, 5.03, "cuda")  # 0.6%


def test_an_unknown_model_is_refused_with_the_known_ones_named():
    done = subprocess.run([sys.executable, str(BENCH), "--models", "tiny,nope"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "--models: no model nope; there are tiny, llama27m, llama500m" in done.stderr

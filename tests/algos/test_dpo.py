"""Each DPO variant against its paper's formula on hand-computed inputs."""

import math

import pytest
import torch

from rlhf_cli.algos.dpo import VARIANTS, hinge_loss, ipo_loss, logratio_margin, robust_loss, sigmoid_loss, simpo_loss
from rlhf_cli.algos.losses import sequence_logprobs


def log_sigmoid(x):
    return -math.log(1 + math.exp(-x))


def test_logratio_margin():
    # (log pi_c - log ref_c) - (log pi_r - log ref_r) = (-1 + 2) - (-3 + 2.5) = 1.5
    h = logratio_margin(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]))
    assert torch.allclose(h, torch.tensor([1.5]))


def test_sigmoid_is_dpo_and_smoothing_is_conservative_dpo():
    h = torch.tensor([1.5, -0.5])
    beta = 0.2
    expected = [-log_sigmoid(0.3), -log_sigmoid(-0.1)]
    assert torch.allclose(sigmoid_loss(h, beta), torch.tensor(expected), atol=1e-6)
    # cDPO, e = 0.1: -0.9 log s(0.3) - 0.1 log s(-0.3)
    cdpo = -0.9 * log_sigmoid(0.3) - 0.1 * log_sigmoid(-0.3)
    assert math.isclose(float(sigmoid_loss(h[:1], beta, smoothing=0.1)), cdpo, rel_tol=1e-6)


def test_ipo_is_squared_distance_to_half_inverse_beta():
    # beta 0.25: target 1/(2 beta) = 2; h = 1.5 -> 0.25
    assert math.isclose(float(ipo_loss(torch.tensor([1.5]), 0.25)), 0.25, rel_tol=1e-6)


def test_hinge():
    # beta 0.5: max(0, 1 - 0.5 h); h = 1 -> 0.5, h = 3 -> 0
    assert torch.allclose(hinge_loss(torch.tensor([1.0, 3.0]), 0.5), torch.tensor([0.5, 0.0]))


def test_robust_dpo():
    # ((1-e)(-log s(bh)) + e log s(-bh)) / (1-2e), e=0.2, bh = 0.4
    expected = (0.8 * -log_sigmoid(0.4) + 0.2 * log_sigmoid(-0.4)) / 0.6
    assert math.isclose(float(robust_loss(torch.tensor([2.0]), 0.2, smoothing=0.2)), expected, rel_tol=1e-6)
    # without noise it is DPO
    assert torch.allclose(robust_loss(torch.tensor([2.0]), 0.2), sigmoid_loss(torch.tensor([2.0]), 0.2))


def test_simpo():
    # -log s(beta h - gamma), beta 2, gamma 0.5, h = 0.75 (per-token averaged policy log-probs) -> -log s(1)
    assert math.isclose(float(simpo_loss(torch.tensor([0.75]), 2.0, gamma=0.5)), -log_sigmoid(1.0), rel_tol=1e-6)
    assert not VARIANTS["simpo"].uses_reference and VARIANTS["simpo"].length_normalised
    assert VARIANTS["ipo"].length_normalised and not VARIANTS["sigmoid"].length_normalised


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge"])
def test_gradient_raises_chosen_and_lowers_rejected(name):
    # Near h = 0 every variant wants a larger margin: d loss / d log pi_c < 0 < d loss / d log pi_r.
    policy_chosen = torch.tensor([-2.0], requires_grad=True)
    policy_rejected = torch.tensor([-2.0], requires_grad=True)
    h = logratio_margin(policy_chosen, policy_rejected, torch.tensor([-2.0]), torch.tensor([-2.0]))
    VARIANTS[name].loss(h, 0.1).sum().backward()
    assert policy_chosen.grad.item() < 0 < policy_rejected.grad.item()


def test_sequence_logprobs_sums_only_response_tokens():
    # vocab 2; row: tokens [0, 1, 1]; response = the last two tokens
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [9.0, 9.0]]])
    sums, counts = sequence_logprobs(logits, torch.tensor([[0, 1, 1]]), torch.tensor([[False, True, True]]))
    # p(1 | pos 0) = 1/2; p(1 | pos 1) = 1/4
    assert torch.allclose(sums, torch.tensor([math.log(0.5) + math.log(0.25)]))
    assert counts.tolist() == [2]

import math

import torch

from rlhf_cli.algos.rewards import bradley_terry_loss, reward_centering_penalty


def test_bradley_terry_matches_the_closed_form():
    chosen = torch.tensor([1.0, 0.0, 2.0])
    rejected = torch.tensor([0.0, 0.0, 3.0])
    margins = torch.zeros(3)
    weights = torch.full((3,), 1 / 3)
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(0) = log 2; -log sigmoid(-1) = log(1 + e)
    expected = (math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.e)) / 3
    assert math.isclose(float(bradley_terry_loss(chosen, rejected, margins, weights)), expected, rel_tol=1e-6)


def test_margin_is_subtracted_from_the_reward_gap():
    chosen, rejected, weights = torch.tensor([2.0]), torch.tensor([0.0]), torch.ones(1)
    # gap 2, margin 2: the pair counts as a tie, -log sigmoid(0) = log 2
    assert math.isclose(float(bradley_terry_loss(chosen, rejected, torch.tensor([2.0]), weights)), math.log(2), rel_tol=1e-6)


def test_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([0.3], requires_grad=True)
    rejected = torch.tensor([0.5], requires_grad=True)
    bradley_terry_loss(chosen, rejected, torch.zeros(1), torch.ones(1)).backward()
    # d/dr_c = -(1 - sigmoid(gap)) = -sigmoid(-gap); gap = -0.2
    expected = -1 / (1 + math.exp(-0.2))
    assert math.isclose(float(chosen.grad), expected, rel_tol=1e-6)
    assert math.isclose(float(rejected.grad), -expected, rel_tol=1e-6)


def test_centering_penalty():
    chosen, rejected = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    # (1.5^2 + (-1)^2) / 2 = 1.625
    assert math.isclose(float(reward_centering_penalty(chosen, rejected, torch.full((2,), 0.5))), 1.625)

"""Advantages, KL estimators, the clipped surrogate and loss aggregation on hand-computed values."""

import math

import pytest
import torch

from rlhf_cli.algos.policy import (
    aggregate_loss,
    clipped_surrogate,
    dr_grpo_advantages,
    grpo_advantages,
    kl_k1,
    kl_k2,
    kl_k3,
    rloo_advantages,
)

# Two groups of G=3: rewards (1, 0, 0) and (1, 1, 1).
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])


def test_grpo_normalises_by_group_mean_and_unbiased_std():
    # group 1: mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    std = math.sqrt(1 / 3)
    expected = [(2 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4), 0, 0, 0]
    assert torch.allclose(grpo_advantages(REWARDS, 3), torch.tensor(expected), atol=1e-6)


def test_dr_grpo_only_centres():
    assert torch.allclose(dr_grpo_advantages(REWARDS, 3), torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0]))


def test_rloo_uses_the_mean_of_the_others():
    # 1 - (0 + 0)/2 = 1; 0 - (1 + 0)/2 = -0.5
    assert torch.allclose(rloo_advantages(REWARDS, 3), torch.tensor([1.0, -0.5, -0.5, 0, 0, 0]))


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # k1 = log 0.5 - log 0.25 = log 2; k2 = (log 2)^2 / 2; k3 with r = ref/pi = 0.5: 0.5 - 1 - log 0.5
    assert math.isclose(float(kl_k1(logp, ref)), math.log(2), rel_tol=1e-6)
    assert math.isclose(float(kl_k2(logp, ref)), math.log(2) ** 2 / 2, rel_tol=1e-6)
    assert math.isclose(float(kl_k3(logp, ref)), -0.5 + math.log(2), rel_tol=1e-6)
    assert float(kl_k3(ref, logp)) >= 0 and float(kl_k1(ref, logp)) < 0  # k3 never negative, k1 can be


def test_kl_k3_is_clamped():
    assert float(kl_k3(torch.tensor([0.0]), torch.tensor([100.0]))) == 10.0


def test_clipping_both_sides():
    old = torch.zeros(4)
    # ratios 1.5, 1.5, 0.5, 0.5 against advantages +1, -1, +1, -1; eps_low 0.2, eps_high 0.3
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = clipped_surrogate(logp, old, adv, 0.2, 0.3)
    # A>0, rho 1.5: min(1.5, 1.3) -> -1.3, clipped; A<0, rho 1.5: min(-1.5, -1.3) -> 1.5, not clipped
    # A>0, rho 0.5: min(0.5, 0.8) -> -0.5, not clipped; A<0, rho 0.5: min(-0.5, -0.8) -> 0.8, clipped
    assert torch.allclose(loss, torch.tensor([-1.3, 1.5, -0.5, 0.8]))
    assert clipped.tolist() == [True, False, False, True]


def test_without_clipping_the_gradient_is_the_policy_gradient():
    # With pi_old = pi (mu = 1) the ratio is 1 and the gradient is -A grad log pi, REINFORCE's.
    logits = torch.randn(2, 5, requires_grad=True)
    logp = torch.log_softmax(logits, -1)[:, 0]
    adv = torch.tensor([0.7, -1.2])
    loss, _ = clipped_surrogate(logp, logp.detach(), adv, 0.2, 0.2)
    (grad_ours,) = torch.autograd.grad(loss.sum(), logits, retain_graph=True)
    (grad_pg,) = torch.autograd.grad(-(adv * logp).sum(), logits)
    assert torch.allclose(grad_ours, grad_pg, atol=1e-6)


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
MASK = torch.tensor([[True, True, True], [True, False, False]])


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("seq_mean_token_mean", (2.0 + 4.0) / 2),  # per-sequence means 2 and 4, over 2 sequences
        ("token_mean", 10.0 / 4),  # 10 over 4 tokens
        ("seq_mean_token_sum_norm", 10.0 / (2 * 8)),  # 10 over 2 sequences x max length 8
    ],
)
def test_loss_aggregations(mode, expected):
    value = aggregate_loss(PER_TOKEN, MASK, mode, num_sequences=2, num_tokens=4, max_length=8)
    assert math.isclose(float(value), expected, rel_tol=1e-6)


def test_aggregations_add_up_over_micro_batches():
    for mode in ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"):
        whole = aggregate_loss(PER_TOKEN, MASK, mode, num_sequences=2, num_tokens=4, max_length=8)
        parts = sum(aggregate_loss(PER_TOKEN[i : i + 1], MASK[i : i + 1], mode, num_sequences=2, num_tokens=4, max_length=8)
                    for i in range(2))
        assert torch.isclose(whole, parts)

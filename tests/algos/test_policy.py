"""Advantages, KL estimators, the clipped surrogate and loss aggregation on hand-computed values."""

import math

import pytest
import torch

from rlhf_cli.algos.policy import (
    adaptive_kl_coef,
    aggregate_loss,
    clipped_surrogate,
    clipped_value_loss,
    dr_grpo_advantages,
    entropy_from_logits,
    explained_variance,
    gae,
    grpo_advantages,
    kl_k1,
    kl_k2,
    kl_k3,
    masked_mean,
    masked_whiten,
    rloo_advantages,
    token_rewards,
    update_moments,
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


def test_masked_whiten_uses_only_masked_entries():
    values = torch.tensor([[1.0, 2.0, 99.0], [3.0, 99.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # entries 1, 2, 3: mean 2, unbiased std 1
    assert torch.allclose(masked_whiten(values, mask), torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), atol=1e-6)
    assert math.isclose(float(masked_mean(values, mask)), 2.0)


def test_masked_whiten_across_processes_uses_the_whole_steps_statistics():
    # This process holds [1, 2], another [3, 6]. `total` adds the other's part to each reduction: its
    # (sum, count) = (9, 2), then its squared deviations from the shared mean 3: 0 + 9.
    others = [torch.tensor([9.0, 2.0]), torch.tensor(9.0)]
    whitened = masked_whiten(torch.tensor([[1.0, 2.0]]), torch.ones(1, 2), total=lambda x: x + others.pop(0))
    everything = masked_whiten(torch.tensor([[1.0, 2.0, 3.0, 6.0]]), torch.ones(1, 4))
    assert torch.allclose(whitened, everything[:, :2], atol=1e-6)


def test_token_rewards_put_the_score_on_the_last_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.7, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.1, -0.15 + 2.0], [-0.25, -0.35 - 1.0, 0.0]]))


def test_gae_on_hand_computed_trajectories_of_different_lengths():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, -1.0, 7.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.1, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second row ends after two tokens
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    # Row 1: d2 = 1 - 0.3 = 0.7; d1 = 0 + 0.9*0.3 - 0.4 = -0.13; d0 = 0 + 0.9*0.4 - 0.5 = -0.14
    #        A2 = 0.7; A1 = -0.13 + 0.72*0.7 = 0.374; A0 = -0.14 + 0.72*0.374 = 0.12928
    # Row 2: the third token is padding (its reward 7 and value 9 are ignored); V after the end is 0.
    #        d1 = -1 - 0.1 = -1.1; d0 = 0.5 + 0.9*0.1 - 0.2 = 0.39; A1 = -1.1; A0 = 0.39 + 0.72*(-1.1) = -0.402
    expected = torch.tensor([[0.12928, 0.374, 0.7], [-0.402, -1.1, 0.0]])
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert torch.allclose(returns, (expected + values) * mask, atol=1e-6)


def test_gae_with_lambda_1_and_gamma_1_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    assert torch.allclose(returns, torch.tensor([[6.0, 5.0, 3.0]]))
    assert torch.allclose(advantages, torch.tensor([[5.5, 4.5, 2.5]]))


def test_clipped_value_loss_takes_the_larger_error():
    old = torch.tensor([1.0, 1.0, 1.0])
    returns = torch.tensor([2.0, 0.0, 1.5])
    values = torch.tensor([1.5, 1.5, 1.1])
    loss = clipped_value_loss(values, old, returns, clip=0.2)
    # clipped values: 1.2, 1.2, 1.1
    # 1: max((1.5-2)^2, (1.2-2)^2) = 0.64; 2: max(2.25, 1.44) = 2.25; 3: max(0.16, 0.16) = 0.16
    assert torch.allclose(loss, 0.5 * torch.tensor([0.64, 2.25, 0.16]))


def test_entropy_from_logits():
    assert math.isclose(float(entropy_from_logits(torch.zeros(4))), math.log(4), rel_tol=1e-6)
    assert float(entropy_from_logits(torch.tensor([100.0, 0.0]))) < 1e-6


def test_adaptive_kl_controller():
    # kl 0.15 against target 0.1: error +0.5 clipped to +0.2; 10 steps over horizon 100 -> x1.02
    assert math.isclose(adaptive_kl_coef(0.1, 0.15, 0.1, 100, 10), 0.1 * 1.02)
    # kl 0.09: error -0.1 -> x(1 - 0.1 * 10 / 100) = x0.99
    assert math.isclose(adaptive_kl_coef(0.1, 0.09, 0.1, 100, 10), 0.1 * 0.99)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert math.isclose(explained_variance(returns.clone(), returns, mask), 1.0)
    assert math.isclose(explained_variance(torch.full_like(returns, 2.0), returns, mask), 0.0, abs_tol=1e-6)
    # residuals (1, 0, -1) around 0: variance 2/3 against 2/3 for the returns -> 0; shifted by a constant, same
    assert math.isclose(explained_variance(returns - 1 + torch.tensor([[0.0, 1.0, 2.0, 0.0]]), returns, mask), 0.0, abs_tol=1e-6)


def test_running_moments_match_the_whole_sample():
    values = torch.tensor([1.0, 4.0, 2.0, 8.0, 5.0, 7.0])
    count, mean, m2 = 0, 0.0, 0.0
    for chunk in (values[:1], values[1:4], values[4:]):
        count, mean, m2 = update_moments(count, mean, m2, chunk)
    assert count == 6
    assert math.isclose(mean, float(values.mean()), rel_tol=1e-6)
    assert math.isclose(math.sqrt(m2 / (count - 1)), float(values.std()), rel_tol=1e-6)

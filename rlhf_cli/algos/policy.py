"""Policy-gradient math for GRPO and PPO: advantages, KL estimators, the clipped surrogate and loss
aggregation. Tensors are (B, T) over completion tokens with `mask` True where a token counts, or
(N,) over sequences; every function is pure."""

from __future__ import annotations

from typing import Callable

import torch


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024, eq. 3 outcome supervision): (r - mean_group) / (std_group + eps), (N,)."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    return (centred / (grouped.std(dim=1, keepdim=True) + eps)).view(-1)


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): r - mean_group, no division by the group's std (its difficulty bias)."""
    grouped = rewards.view(-1, group_size)
    return (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): r_i - mean of the other G-1 rewards of the group = G/(G-1) (r_i - mean)."""
    grouped = rewards.view(-1, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).view(-1)


ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
}


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log pi - log ref: unbiased, per token it can be negative (Schulman, "Approximating KL")."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = 1/2 (log pi - log ref)^2: biased, low variance; its gradient is the right one as a loss."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = ref / pi: unbiased and never negative. The log-ratio is clamped to
    +-20 and the result to 10, for numerical safety."""
    log_ratio = torch.clamp(ref_logprobs - logprobs, -20, 20)
    return torch.clamp(torch.exp(log_ratio) - 1 - log_ratio, max=10)


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective as a per-token loss, -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A),
    with rho = pi / pi_old; asymmetric bounds are DAPO's clip-higher. Returns (loss, clipped) (B, T),
    `clipped` True where the clipped term was the smaller one (the token gives no gradient)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages
    return -torch.min(unclipped, clipped), (clipped < unclipped).detach()


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str, *, num_sequences: int,
                   num_tokens: int, max_length: int) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar whose normaliser is counted over the optimizer step.

    seq_mean_token_mean      original GRPO: mean over each sequence's tokens, summed / sequences in the step
    token_mean               DAPO: summed over every token / tokens in the step
    seq_mean_token_sum_norm  Dr. GRPO: summed over every token / (sequences in the step x max_length)
    """
    masked = per_token * mask
    if mode == "seq_mean_token_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / num_sequences
    if mode == "token_mean":
        return masked.sum() / max(num_tokens, 1)
    if mode == "seq_mean_token_sum_norm":
        return masked.sum() / (num_sequences * max_length)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, total=lambda x: x) -> torch.Tensor:
    """(x - mean) / std over the masked entries only (unbiased variance); masked-out entries become 0.
    `total` sums a tensor over the processes of a run, so that each whitens with the whole step's statistics."""
    sums = total(torch.stack([(values * mask).sum(), mask.sum()]))
    mean = sums[0] / sums[1].clamp(min=1)
    centred = (values - mean) * mask
    variance = total((centred**2).sum()) / (sums[1] - 1).clamp(min=1)
    return centred * torch.rsqrt(variance + eps)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """InstructGPT's per-token reward: -kl_coef * KL at every response token, plus the sequence's score
    at its last one. scores (B,), kl and mask (B, T) with each row's tokens first."""
    rewards = -kl_coef * kl * mask
    last = mask.sum(-1).long().clamp(min=1) - 1
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's masked tokens, which come
    first; the value after a row's last token is 0. Returns (advantages, returns), both (B, T), zero
    where masked: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, R_t = A_t + V_t."""
    mask = mask.to(values.dtype)
    follows = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)  # a token of the row comes next
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1) * follows
    deltas = rewards + gamma * next_values - values
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        running = (deltas[:, t] + gamma * lam * follows[:, t] * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float) -> torch.Tensor:
    """PPO's value loss per token: 1/2 max((V - R)^2, (clip(V, V_old +- clip) - R)^2)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dimension: logsumexp(z) - sum softmax(z) z."""
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: float, steps: int) -> float:
    """Ziegler et al. 2019's controller: coef * (1 + clip(kl / target - 1, -0.2, 0.2) * steps / horizon)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * steps / horizon)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, total=lambda x: x) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked entries: 1 is a perfect critic, 0 one
    that predicts the mean, negative one that is worse than that. `total` sums over processes."""
    residual = returns - values
    m = mask.double()
    r, e = returns.double(), residual.double()
    sums = total(torch.stack([(r * m).sum(), (r * r * m).sum(), (e * m).sum(), (e * e * m).sum(), m.sum()]))
    count = sums[4].clamp(min=1)
    variance = sums[1] / count - (sums[0] / count) ** 2
    residual_variance = sums[3] / count - (sums[2] / count) ** 2
    return float(1 - residual_variance / variance) if variance > 0 else 0.0


def update_moments(count: int, mean: float, m2: float, values: torch.Tensor) -> tuple[int, float, float]:
    """Running count, mean and sum of squared deviations after a batch of values (Chan et al.'s
    parallel update); the running std is sqrt(m2 / (count - 1))."""
    n = values.numel()
    batch_mean = float(values.mean())
    batch_m2 = float(((values - batch_mean) ** 2).sum())
    total = count + n
    delta = batch_mean - mean
    return total, mean + delta * n / total, m2 + batch_m2 + delta**2 * count * n / total

"""Reward-model losses (Bradley-Terry) on scalar rewards of preferred and dispreferred responses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margins: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """sum_i w_i * -log sigmoid(r_chosen_i - r_rejected_i - margin_i), all tensors (P,) over pairs.

    Bradley-Terry preference likelihood (InstructGPT eq. 1), with Llama 2's margin: a pair is only
    fully satisfied once the reward gap exceeds its margin. The weights carry the normaliser (e.g.
    1 / (pairs of the prompt x prompts of the optimizer step)), so that micro-batches add up.
    """
    return (weights * -F.logsigmoid(chosen_rewards - rejected_rewards - margins)).sum()


def reward_centering_penalty(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i * (r_chosen_i + r_rejected_i)^2: keeps rewards centred on zero (Eisenstein et al. 2023)."""
    return (weights * (chosen_rewards + rejected_rewards) ** 2).sum()

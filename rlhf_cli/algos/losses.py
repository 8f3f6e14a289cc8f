"""Losses. Each takes its normaliser as an argument so that micro-batching, gradient accumulation
and data parallelism give the same gradient as one large batch (the denominator is counted once
over the whole optimizer step, never per micro-batch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def scoring_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) True at the positions whose logits score a label: position t scores token t+1.

    loss_mask (B, T) marks the tokens that are labels; position 0 can never be one.
    """
    return F.pad(loss_mask[:, 1:], (0, 1), value=False)


def labels(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """(K,) the labelled tokens of (B, T) rows, in row-major order: the order of their scoring positions."""
    return input_ids[:, 1:][loss_mask[:, 1:]]


def label_nll_sum(label_logits: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the labelled tokens, from the logits at their scoring
    positions alone: label_logits (K, V), one row per label of label_ids (K,)."""
    return F.cross_entropy(label_logits.float(), label_ids, reduction="sum")


def token_nll_sum(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """label_nll_sum from the logits (B, T, V) of every position."""
    return label_nll_sum(logits[scoring_positions(loss_mask)], labels(input_ids, loss_mask))


def sft_loss(label_logits: torch.Tensor, label_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Mean NLL per labelled token of the optimizer step: this micro-batch's sum over the step's token count."""
    return label_nll_sum(label_logits, label_ids) / max(num_tokens, 1)


def count_label_tokens(loss_mask: torch.Tensor) -> int:
    """Tokens that sft_loss counts in a (B, T) loss mask."""
    return int(loss_mask[:, 1:].sum())


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T-1) log-probability of each next token: position t scores input_ids[:, t+1].

    log p(token) = logit(token) - logsumexp(logits): the (B, T, V) log-softmax is never materialised.
    """
    shifted = logits[:, :-1].float()
    return shifted.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(shifted, dim=-1)


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of the labelled tokens' log-probabilities, and their count; both (B,)."""
    mask = loss_mask[:, 1:]
    return (token_logprobs(logits, input_ids) * mask).sum(-1), mask.sum(-1)

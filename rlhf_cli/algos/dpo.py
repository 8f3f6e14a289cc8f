"""Direct preference optimisation and its variants, each a function of sequence log-probabilities.

Every loss has the signature (h, beta, smoothing, gamma) and returns one value per pair, (B,); the stage divides the sum by the pairs of the whole
optimizer step. Inputs are the policy's and the reference's log-probabilities of the chosen and
rejected responses, summed over response tokens, or averaged per token for the variants marked
`length_normalised` (IPO, SimPO). h = (pi_c - ref_c) - (pi_r - ref_r) is the log-ratio margin.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


def sigmoid_loss(h: torch.Tensor, beta: float, smoothing: float = 0.0, gamma: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta h).

    With smoothing e > 0, conservative DPO (Mitchell 2023): labels flipped with probability e,
    -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h).
    """
    return -(1 - smoothing) * F.logsigmoid(beta * h) - smoothing * F.logsigmoid(-beta * h)


def ipo_loss(h: torch.Tensor, beta: float, smoothing: float = 0.0, gamma: float = 0.0) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17): (h - 1/(2 beta))^2, on per-token averaged log-probabilities."""
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(h: torch.Tensor, beta: float, smoothing: float = 0.0, gamma: float = 0.0) -> torch.Tensor:
    """SLiC (Zhao et al. 2023) hinge on the log-ratio margin: max(0, 1 - beta h)."""
    return torch.relu(1 - beta * h)


def robust_loss(h: torch.Tensor, beta: float, smoothing: float = 0.0, gamma: float = 0.0) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, eq. 9): unbiased under labels flipped with probability e,
    ((1 - e)(-log sigmoid(beta h)) + e log sigmoid(-beta h)) / (1 - 2e)."""
    return ((1 - smoothing) * -F.logsigmoid(beta * h) + smoothing * F.logsigmoid(-beta * h)) / (1 - 2 * smoothing)


def simpo_loss(h: torch.Tensor, beta: float, smoothing: float = 0.0, gamma: float = 0.0) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta h - gamma), with h the difference of the
    policy's per-token averaged log-probabilities (no reference)."""
    return -F.logsigmoid(beta * h - gamma)


class Variant(NamedTuple):
    loss: Callable[..., torch.Tensor]  # (h, beta, smoothing, gamma) -> (B,)
    length_normalised: bool  # uses per-token averaged log-probabilities
    uses_reference: bool


VARIANTS = {
    "sigmoid": Variant(sigmoid_loss, length_normalised=False, uses_reference=True),
    "ipo": Variant(ipo_loss, length_normalised=True, uses_reference=True),
    "hinge": Variant(hinge_loss, length_normalised=False, uses_reference=True),
    "robust": Variant(robust_loss, length_normalised=False, uses_reference=True),
    "simpo": Variant(simpo_loss, length_normalised=True, uses_reference=False),
}


def logratio_margin(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> torch.Tensor:
    """h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)), (B,)."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)

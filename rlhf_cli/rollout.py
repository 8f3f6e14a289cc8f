"""Generation behind one small interface: token-id prompts in, token-id completions out.

The default engine is transformers' `generate` with KV cache, left-padded prompts and stopping at
any stop token. Completions are cut after their first stop token (kept, since it was generated)
and carry no padding (a sequence only pads after it stopped).

The RL stages sample through a `Sampler` made by `make_sampler` from the `rollout` keys. The `hf`
engine samples from the training module itself; an engine with its own copy of the weights (vLLM)
plugs in here and must take the policy's weights before each rollout.

Sampling draws each row's tokens from that row's own seeded generator (`RowSampler`), so a prompt's
completion depends on its seed alone, not on which other prompts share its batch: the same step
samples the same completions whether it runs in one process or several, or with another batch size.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import torch

from rlhf_cli.data.batches import left_pad


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    stop_ids: set[int],
    batch_size: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seeds: Optional[list[int]] = None,
) -> list[list[int]]:
    """Completions for `prompts`: greedy when temperature is 0, else sampled, row i from `seeds[i]`.
    Under ZeRO-3 the weights are gathered once for the whole call, not once per generated token."""
    from transformers import LogitsProcessorList

    from rlhf_cli.engine.zero import full_weights

    sampling = temperature > 0
    if sampling and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("sampling needs one seed per prompt")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    completions: list[list[int]] = []
    try:
        with full_weights(model):
            for start in range(0, len(prompts), batch_size):
                input_ids, attention_mask = left_pad(prompts[start : start + batch_size], pad_id)
                processors = LogitsProcessorList()
                if sampling:
                    processors.append(RowSampler(seeds[start : start + batch_size], temperature, top_p))
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,  # the RowSampler has already picked each row's token; greedy takes it
                    logits_processor=processors,
                    eos_token_id=sorted(stop_ids),
                    pad_token_id=pad_id,
                )
                for row in output[:, input_ids.size(1) :].tolist():
                    completions.append(_cut_at_stop(row, stop_ids))
    finally:
        model.train(was_training)
    return completions


class RowSampler:
    """A logits processor that samples every row from temperature- and top-p-shaped probabilities with
    the row's own generator, and leaves only the drawn token possible. One uniform draw per row and
    step (inverse CDF), so row i's k-th token depends on seeds[i] and its own logits alone."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = top_p_probabilities(scores.float() / self.temperature, self.top_p).cpu()
        cumulative = probs.cumsum(-1)
        uniforms = torch.stack([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators]).float()
        tokens = torch.searchsorted(cumulative, uniforms * cumulative[:, -1:]).clamp(max=probs.size(-1) - 1)
        tokens = torch.where(probs.gather(1, tokens) > 0, tokens, probs.argmax(-1, keepdim=True))  # never a cut-off token
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(1, tokens.to(scores.device), 0.0)


def top_p_probabilities(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """softmax(logits) restricted to the smallest set of most likely tokens whose mass reaches top_p
    (the most likely token always stays), renormalised."""
    probs = torch.softmax(logits, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


def _cut_at_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: i + 1]
    return tokens


def row_seeds(seed: int, step: int, first_row: int, count: int) -> list[int]:
    """The seeds of rows first_row .. first_row + count - 1 of a step's rollouts (rows numbered over
    the whole step, every process together): the same row of the same step always draws the same."""
    return [hash((seed, step, row)) & 0x7FFF_FFFF_FFFF_FFFF for row in range(first_row, first_row + count)]


class Sampler(Protocol):
    def __call__(self, prompts: list[list[int]], seeds: list[int]) -> list[list[int]]:
        """One sampled completion per prompt (repeat a prompt for a group), each drawn from its seed."""


def make_sampler(rollout_cfg: Any, model: torch.nn.Module, pad_id: int, stop_ids: set[int]) -> Sampler:
    """The sampler of `rollout.engine`, with the rollout's temperature, top-p and length."""
    return ENGINES[rollout_cfg.engine.value](rollout_cfg, model, pad_id, stop_ids)


def _hf_sampler(rollout_cfg: Any, model: torch.nn.Module, pad_id: int, stop_ids: set[int]) -> Sampler:
    def sample(prompts: list[list[int]], seeds: list[int]) -> list[list[int]]:
        return generate(model, prompts, max_new_tokens=rollout_cfg.max_new_tokens, pad_id=pad_id, stop_ids=stop_ids,
                        batch_size=len(prompts), temperature=rollout_cfg.temperature, top_p=rollout_cfg.top_p, seeds=seeds)

    return sample


ENGINES = {"hf": _hf_sampler}

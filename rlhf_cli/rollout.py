"""Generation behind one small interface: token-id prompts in, token-id completions out.

The default engine is transformers' `generate` with KV cache, left-padded prompts and stopping at
any stop token. Completions are cut after their first stop token (kept, since it was generated)
and carry no padding (a sequence only pads after it stopped).

The RL stages sample through a `Sampler` made by `make_sampler` from the `rollout` keys. The `hf`
engine samples from the training module itself; an engine with its own copy of the weights (vLLM)
plugs in here and must take the policy's weights before each rollout.
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
    generator_seed: Optional[int] = None,
) -> list[list[int]]:
    """Completions for `prompts`; greedy when temperature is 0. Under ZeRO-3 the weights are gathered
    once for the whole call, not once per generated token."""
    from rlhf_cli.engine.zero import full_weights

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    completions: list[list[int]] = []
    sampling = temperature > 0
    try:
        with full_weights(model):
            for start in range(0, len(prompts), batch_size):
                input_ids, attention_mask = left_pad(prompts[start : start + batch_size], pad_id)
                if sampling and generator_seed is not None:
                    torch.manual_seed(generator_seed + start)
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=sampling,
                    temperature=temperature if sampling else None,
                    top_p=top_p if sampling else None,
                    top_k=0 if sampling else None,
                    eos_token_id=sorted(stop_ids),
                    pad_token_id=pad_id,
                )
                for row in output[:, input_ids.size(1) :].tolist():
                    completions.append(_cut_at_stop(row, stop_ids))
    finally:
        model.train(was_training)
    return completions


def _cut_at_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: i + 1]
    return tokens


class Sampler(Protocol):
    def __call__(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        """One sampled completion per prompt (repeat a prompt for a group); `seed` fixes the draw."""


def make_sampler(rollout_cfg: Any, model: torch.nn.Module, pad_id: int, stop_ids: set[int]) -> Sampler:
    """The sampler of `rollout.engine`, with the rollout's temperature, top-p and length."""
    return ENGINES[rollout_cfg.engine.value](rollout_cfg, model, pad_id, stop_ids)


def _hf_sampler(rollout_cfg: Any, model: torch.nn.Module, pad_id: int, stop_ids: set[int]) -> Sampler:
    def sample(prompts: list[list[int]], seed: int) -> list[list[int]]:
        return generate(model, prompts, max_new_tokens=rollout_cfg.max_new_tokens, pad_id=pad_id, stop_ids=stop_ids,
                        batch_size=len(prompts), temperature=rollout_cfg.temperature, top_p=rollout_cfg.top_p,
                        generator_seed=seed)

    return sample


ENGINES = {"hf": _hf_sampler}

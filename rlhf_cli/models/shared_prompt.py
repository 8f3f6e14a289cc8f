"""One forward for many responses to the same prompt.

DPO scores a chosen and a rejected response to each prompt, a reward model ranks two or more, and
GRPO trains on a group of completions of each prompt. Rows of prompt + response run every prompt
through the model once per response. Here each distinct prompt runs once, and its keys and values
(a KV cache that stays in the autograd graph) are shared by its responses, which run as a second
forward attending to them. Each response token attends to exactly the tokens it would in the
concatenated row, at the same positions, so log-probabilities and scores equal the concatenated
forward's up to float rounding, and gradients reach the prompt's tokens as before.

Gradient checkpointing drops the cache inside each layer, so a forward with gradients through a
checkpointed model falls back to concatenated rows.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from rlhf_cli.data.batches import collate
from rlhf_cli.data.tokenize import TokenizedSample


@dataclass
class PromptResponses:
    """Distinct prompts and the responses that follow them, collated once.

    prompt_ids, prompt_mask: (P, Tp), right-padded. owners: (R,), the prompt of each response.
    input_ids: (R, 1 + Tr): column 0 holds the last token of the response's prompt, then the response,
    right-padded; response_mask marks the response tokens, loss_mask those a loss counts (a caller may
    narrow it, e.g. to drop a row).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    owners: torch.Tensor
    input_ids: torch.Tensor
    response_mask: torch.Tensor
    loss_mask: torch.Tensor
    pad_id: int

    @property
    def num_tokens(self) -> int:
        """Tokens of the prompt + response rows this batch stands for."""
        return int(self.prompt_mask.sum(-1)[self.owners].sum() + self.response_mask.sum())

    def to(self, device: Any) -> "PromptResponses":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return PromptResponses(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


def collate_responses(prompts: list[list[int]], responses: list[list[int]], owners: list[int], pad_id: int) -> PromptResponses:
    """Responses[i] follows prompts[owners[i]]; every prompt and every response has at least one token."""
    prompt_ids, prompt_mask = right_padded(prompts, pad_id)
    width = 1 + max(len(r) for r in responses)
    input_ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), width), dtype=torch.bool)
    for row, (response, owner) in enumerate(zip(responses, owners)):
        input_ids[row, 0] = prompts[owner][-1]
        input_ids[row, 1 : 1 + len(response)] = torch.tensor(response)
        response_mask[row, 1 : 1 + len(response)] = True
    owner_index = torch.tensor(owners, dtype=torch.long)
    return PromptResponses(prompt_ids, prompt_mask, owner_index, input_ids, response_mask, response_mask.clone(), pad_id)


def right_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, T) ids and attention mask of token lists, padded on the right."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt)
        mask[row, : len(prompt)] = 1
    return ids, mask


def response_logits(model, batch: PromptResponses) -> torch.Tensor:
    """Logits (R, 1 + Tr, V) in `batch`'s layout: position t scores batch.input_ids[:, t + 1], so that
    `token_logprobs(logits, batch.input_ids)` gives every response token's log-probability."""
    if _can_share(model):
        prompt_out, out = _shared_forward(model, batch)
        prompt_lengths = batch.prompt_mask.sum(-1)
        last_prompt_logits = prompt_out.logits[torch.arange(len(prompt_lengths), device=prompt_lengths.device), prompt_lengths - 1]
        return torch.cat([last_prompt_logits[batch.owners, None], out.logits], dim=1)
    input_ids, attention_mask = _concatenated(batch)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    # Row r's response starts after its prompt: the logits that score it start one position earlier.
    starts = batch.prompt_mask.sum(-1)[batch.owners] - 1
    positions = (starts[:, None] + torch.arange(batch.input_ids.size(1), device=starts.device)).clamp(max=logits.size(1) - 1)
    return logits.gather(1, positions[:, :, None].expand(-1, -1, logits.size(-1)))


def response_scores(model, batch: PromptResponses) -> torch.Tensor:
    """(R,) scalar output of a sequence-classification model, read at each response's last token."""
    if _can_share(model):
        return _shared_forward(model, batch)[1].logits[:, 0]
    input_ids, attention_mask = _concatenated(batch)
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0]


def _shared_forward(model, batch: PromptResponses):
    """Each prompt once, keeping its keys and values; then every response attending to its prompt's."""
    prompt_out = model(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask, use_cache=True)
    cache_name, cache = kv_cache(prompt_out)
    cache.batch_select_indices(batch.owners)
    response_ids = batch.input_ids[:, 1:]
    response_mask = batch.response_mask[:, 1:].long()
    positions = batch.prompt_mask.sum(-1)[batch.owners, None] + torch.arange(response_ids.size(1), device=response_ids.device)
    out = model(
        input_ids=response_ids,
        attention_mask=torch.cat([batch.prompt_mask[batch.owners], response_mask], dim=1),
        position_ids=positions,
        use_cache=True,
        **{cache_name: cache},
    )
    return prompt_out, out


def kv_cache(output) -> tuple[str, Any]:
    """The key/value cache of a forward's output and the keyword that passes it back: transformers
    renamed `past_key_values` to `cache` in 5.x (the old name goes in 5.40)."""
    name = "cache" if "cache" in output else "past_key_values"
    return name, output[name]


def _concatenated(batch: PromptResponses) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of the same responses as right-padded prompt + response rows."""
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(batch.prompt_ids, batch.prompt_mask)]
    rows = [TokenizedSample(prompts[owner] + ids[1:][mask[1:]].tolist(), [False] * (len(prompts[owner]) + int(mask.sum())), "")
            for owner, ids, mask in zip(batch.owners.tolist(), batch.input_ids, batch.response_mask)]
    collated = collate(rows, batch.pad_id)
    return collated["input_ids"].to(batch.input_ids.device), collated["attention_mask"].to(batch.input_ids.device)


def _can_share(model) -> bool:
    """False for a forward with gradients through a model with activation checkpointing on."""
    return not (torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()))

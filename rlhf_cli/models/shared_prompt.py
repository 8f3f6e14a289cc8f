"""One forward for many responses to the same prompt.

DPO scores a chosen and a rejected response to each prompt, a reward model ranks two or more, and
GRPO trains on a group of completions of each prompt. Rows of prompt + response run every prompt
through the model once per response, padded to the longest row. Here the forward is one row with no
padding: every distinct prompt once, then every response (`_one_row`). Segment attention
(rlhf_cli/models/padding_free.py) lets each response token attend to exactly the tokens it would
in its concatenated row, at the same positions, so log-probabilities and scores equal the rows'
up to float rounding, and gradients reach the prompt's tokens as before. No KV cache is involved,
so activation checkpointing works unchanged.

Models that cannot take segment attention (model.padding_free=false, attention other than sdpa,
sliding windows) run the concatenated rows, returned in the same layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from rlhf_cli.data.batches import collate
from rlhf_cli.data.tokenize import TokenizedSample
from rlhf_cli.models import KeptForward, backbone, kept_hidden_states, kept_outputs, plan_kept, score_head
from rlhf_cli.models.padding_free import has_segment_attention, prefixed_segments


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
    # The same prompts and responses on the CPU, where padding-free forwards are planned (not loss_mask,
    # which a caller may narrow after the move), and those plans, made once for every forward. They stay
    # on the host: a step's batches would otherwise hold their attention masks on the device between forwards.
    host: Optional["PromptResponses"] = field(default=None, repr=False, compare=False)
    plans: dict[str, KeptForward] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        """Tokens of the prompt + response rows this batch stands for."""
        batch = self.on_host()
        return int(batch.prompt_mask.sum(-1)[batch.owners].sum() + batch.response_mask.sum())

    def rows(self, selected: torch.Tensor) -> "PromptResponses":
        """The responses `selected` (indices) and only the prompts they follow."""
        prompts, owners = torch.unique(self.owners[selected], return_inverse=True)
        return PromptResponses(self.prompt_ids[prompts], self.prompt_mask[prompts], owners, self.input_ids[selected],
                               self.response_mask[selected], self.loss_mask[selected], self.pad_id,
                               host=None if self.host is None else self.host.rows(selected.cpu()))

    def to(self, device: Any) -> "PromptResponses":
        """The batch on `device`, keeping this one (or its host copy) to plan on, and its plans."""
        tensors = (self.prompt_ids, self.prompt_mask, self.owners, self.input_ids, self.response_mask, self.loss_mask)
        host = self if self.host is None and self.input_ids.device.type == "cpu" else self.host
        # Non-blocking: a copy from the host needs no wait for the device's queued kernels.
        return PromptResponses(*(t.to(device, non_blocking=True) for t in tensors), self.pad_id, host=host, plans=self.plans)

    def on_host(self) -> "PromptResponses":
        """This batch on the CPU: itself, the batch it was moved from, or (made on a device) a copy read back once."""
        if self.input_ids.device.type == "cpu":
            return self
        if self.host is None:
            self.host = self.to("cpu")
        return self.host

    def planned(self, reading: str) -> KeptForward:
        """The padding-free forward of this batch that reads "responses" (the positions that score each
        response token: (R, 1 + Tr) in input_ids' layout) or "ends" (each response's last token: (R,)),
        planned on the host once, however many forwards read it, and copied to this batch's device."""
        if reading not in self.plans:
            self.plans[reading] = _PLANS[reading](self.on_host())
        return self.plans[reading].to(self.input_ids.device)


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
    return response_outputs(model, batch)[0]


def response_outputs(model, batch: PromptResponses, hidden_states: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """response_logits, and with `hidden_states` the (R, 1 + Tr, H) last hidden states at the same
    positions from the same forward (a value head's input: the state before each response token)."""
    if has_segment_attention(model):
        return kept_outputs(model, batch.planned("responses"), hidden_states)
    input_ids, attention_mask = _concatenated(batch)
    output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=hidden_states)
    positions = _response_positions(batch, output.logits.size(1))
    return _gathered(output.logits, positions), _gathered(output.hidden_states[-1], positions) if hidden_states else None


def response_values(critic, batch: PromptResponses) -> torch.Tensor:
    """(R, Tr) a sequence-classification model's scalar head on its hidden state before each response
    token (PPO's critic: the value of the state that token is chosen in), in batch.input_ids[:, 1:]'s layout."""
    body, head = backbone(critic), score_head(critic, "critic")
    if has_segment_attention(critic):
        hidden = kept_hidden_states(body, batch.planned("responses"))
    else:
        input_ids, attention_mask = _concatenated(batch)
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        hidden = _gathered(hidden, _response_positions(batch, hidden.size(1)))
    return head(hidden[:, :-1]).squeeze(-1).float()


def _reading_responses(batch: PromptResponses) -> KeptForward:
    """The row's forward at the positions that score a response token: not at a prompt's earlier
    tokens, and not at a response's last token, which then does not run at all. Its outputs come in
    batch.input_ids' (R, 1 + Tr) layout."""
    row = _one_row(batch)
    return _reading(row, row.layout[:, :-1][batch.response_mask[:, 1:]], at=row.layout)


def _reading_ends(batch: PromptResponses) -> KeptForward:
    """The row's forward at each response's last token, its outputs in response order (R,)."""
    row = _one_row(batch)
    last = row.layout.gather(1, batch.response_mask.sum(-1, keepdim=True))[:, 0]
    return _reading(row, last, at=last)


def _reading(row: "_Row", positions: torch.Tensor, at: torch.Tensor) -> KeptForward:
    """The row's forward that computes its outputs at `positions` alone and gives them back at `at`
    (row positions, any shape; a position not computed, which scores padding, takes a neighbour's)."""
    keep = torch.zeros_like(row.inputs["input_ids"], dtype=torch.bool)
    keep[0, positions] = True
    plan = plan_kept(row.inputs, keep)
    in_kept = (keep[0].cumsum(0)[at] - 1).clamp(min=0)
    return dataclasses.replace(plan, order=in_kept if plan.order is None else plan.order[in_kept])


_PLANS = {"responses": _reading_responses, "ends": _reading_ends}


def _response_positions(batch: PromptResponses, width: int) -> torch.Tensor:
    """(R, 1 + Tr) the positions of batch's layout in its concatenated rows: row r's response starts
    after its prompt, so the outputs that score it start one position earlier."""
    starts = batch.prompt_mask.sum(-1)[batch.owners] - 1
    return (starts[:, None] + torch.arange(batch.input_ids.size(1), device=starts.device)).clamp(max=width - 1)


def _gathered(per_position: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return per_position.gather(1, positions[:, :, None].expand(-1, -1, per_position.size(-1)))


def response_scores(model, batch: PromptResponses) -> torch.Tensor:
    """(R,) scalar output of a sequence-classification model, read at each response's last token."""
    if has_segment_attention(model):
        return score_head(model)(kept_hidden_states(backbone(model), batch.planned("ends")))[:, 0]
    input_ids, attention_mask = _concatenated(batch)
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0]


@dataclass
class _Row:
    inputs: dict  # the model's keyword arguments for the one (1, N) row
    layout: torch.Tensor  # (R, 1 + Tr) the row position of each of batch.input_ids' tokens (0 at padding)


def _one_row(batch: PromptResponses) -> _Row:
    """Every distinct prompt once, then every response, in one row without padding; each response
    attends to its prompt and to itself at the positions it would have after its prompt."""
    device = batch.input_ids.device
    prompt_valid = batch.prompt_mask.bool()
    response_valid = batch.response_mask[:, 1:]
    prompt_lengths, response_lengths = prompt_valid.sum(-1), response_valid.sum(-1)
    prompt_starts = prompt_lengths.cumsum(0) - prompt_lengths
    response_starts = prompt_lengths.sum() + response_lengths.cumsum(0) - response_lengths
    input_ids = torch.cat([batch.prompt_ids[prompt_valid], batch.input_ids[:, 1:][response_valid]])[None]
    prompt_positions = torch.arange(batch.prompt_ids.size(1), device=device).expand_as(batch.prompt_ids)
    response_positions = prompt_lengths[batch.owners, None] + torch.arange(response_valid.size(1), device=device)
    position_ids = torch.cat([prompt_positions[prompt_valid], response_positions[response_valid]])[None]
    segments = prefixed_segments(prompt_starts, prompt_lengths, response_starts, response_lengths, batch.owners)
    last_prompt_token = (prompt_starts + prompt_lengths - 1)[batch.owners, None]
    response_tokens = response_starts[:, None] + torch.arange(response_valid.size(1), device=device)
    layout = torch.cat([last_prompt_token, torch.where(response_valid, response_tokens, 0)], dim=1)
    # All ones: SDPA's mask is then skipped, and segment_attention keeps each sample to itself.
    inputs = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": torch.ones_like(input_ids),
              "segments": segments, "use_cache": False}
    return _Row(inputs, layout)


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

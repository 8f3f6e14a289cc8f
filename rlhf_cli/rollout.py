"""Generation behind one small interface: token-id prompts in, token-id completions out.

The default engine decodes with the model's KV cache: each distinct prompt runs once (a GRPO group
repeats its prompt G times), and so does each distinct continuation of it, until the rows that
share it draw different tokens; rows decode together until every one has produced a stop token or
max_new_tokens (while rows share, a row that stopped runs no further). Completions are cut after
their first stop token (kept, since it was generated) and carry no padding.

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
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from rlhf_cli.models import selected_logits
from rlhf_cli.models.shared_prompt import kv_cache, right_padded


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
    from rlhf_cli.engine.zero import full_weights

    sampling = temperature > 0
    if sampling and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("sampling needs one seed per prompt")
    was_training = model.training
    model.eval()
    completions: list[list[int]] = []
    try:
        with full_weights(model):
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                pick = RowSampler(seeds[start : start + batch_size], temperature, top_p, max_new_tokens) if sampling else _greedy
                completions.extend(_decode(model, chunk, max_new_tokens, pad_id, stop_ids, pick))
    finally:
        model.train(was_training)
    return completions


# Inference mode, not only no_grad: no autograd bookkeeping on any of decoding's many small operations.
# Inside full_weights, not around it: ZeRO-3's gathered weights must stay ordinary tensors.
@torch.inference_mode()
def _decode(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int, stop_ids: set[int], pick) -> list[list[int]]:
    """One batch of rows decoded together; `pick` turns each step's (rows, vocab) logits into token ids.

    The model runs each distinct history once: rows that continue the same prompt with the same tokens
    so far read the same keys, values and logits (a GRPO group starts as one, and a trained policy's
    group often agrees on much of its completions). Each row still draws its own token from those
    logits; a history splits where its rows' draws differ, and while rows share, one that stops
    leaves the batch."""
    device = next(model.parameters()).device
    distinct: dict[tuple[int, ...], int] = {}
    history = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in prompts], device=device)
    prompt_ids, attention = (t.to(device) for t in right_padded([list(p) for p in distinct], pad_id))
    lengths = attention.sum(-1)
    # The LM head runs at each prompt's last token alone: with a real vocabulary, logits at every
    # prompt token would be a large share of the prefill's work and most of its memory.
    last_token = F.one_hot(lengths - 1, prompt_ids.size(1)).bool()
    out = model(input_ids=prompt_ids, attention_mask=attention, use_cache=True, logits_to_keep=last_token)
    cache_name, cache = kv_cache(out)
    preallocate(cache, room=max_new_tokens - 1)
    logits = selected_logits(out.logits, last_token)
    if len(distinct) == len(prompts):
        history = None  # row i is entry i of the cache and of the logits
    vocab = logits.size(-1)
    stops = torch.tensor(sorted(stop_ids), device=device)
    stopped = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    tokens = []
    for step in range(max_new_tokens):
        next_ids = pick(logits if history is None else logits[history]).masked_fill(stopped, pad_id)
        tokens.append(next_ids)
        stopped |= torch.isin(next_ids, stops)
        if step + 1 == max_new_tokens or bool(stopped.all()):
            break
        continued = next_ids
        # Histories never merge: once every row has its own, they go on as they are, a stopped row
        # running on as padding (leaving it out would copy the cache, which costs more than its row).
        if history is not None:
            running = ~stopped
            keys, history = torch.unique(history[running] * vocab + next_ids[running], return_inverse=True)
            if len(keys) == len(prompts):  # every row running and alone: the cache in row order from here on
                keys, history = keys[history], None
            parents, continued = keys // vocab, keys % vocab
            if len(parents) != len(lengths) or not torch.equal(parents, torch.arange(len(lengths), device=device)):
                cache.batch_select_indices(parents)
                attention, lengths = attention[parents], lengths[parents]
            if history is not None:
                history = torch.zeros_like(next_ids).masked_scatter(running, history)
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        out = model(input_ids=continued[:, None], attention_mask=attention, position_ids=(lengths + step)[:, None],
                    use_cache=True, **{cache_name: cache})
        logits = out.logits[:, -1]
    return [_cut_at_stop(row, stop_ids) for row in torch.stack(tokens, dim=1).tolist()]


class FilledInPlace(DynamicLayer):
    """A KV cache layer that writes each step's keys and values into buffers with room for the whole
    completion. transformers' DynamicLayer concatenates at every step, copying the whole cache each
    time: quadratic in the completion's length, a share of each decode step that grows with it.
    Attention reads the filled part, a view of the buffers."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.filled = keys.size(-2)
        self.key_buffer, self.value_buffer = (torch.cat([t, t.new_empty(*t.shape[:-2], room, t.size(-1))], dim=-2)
                                              for t in (keys, values))
        self._show_filled()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.filled + key_states.size(-2)
        self.key_buffer[..., self.filled : end, :] = key_states
        self.value_buffer[..., self.filled : end, :] = value_states
        self.filled = end
        return self._show_filled()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.key_buffer, self.value_buffer = (self._filled_rows(b, indices) for b in (self.key_buffer, self.value_buffer))
        self._show_filled()

    def _filled_rows(self, buffer: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Rows `indices` of a buffer, copying only its filled positions: histories split mostly in a
        completion's first tokens, when most of the buffer is room. index_select, not buffer[indices]:
        advanced indexing's general kernel is many times slower on a CPU."""
        rows = buffer.new_empty(len(indices), *buffer.shape[1:])
        torch.index_select(buffer[..., : self.filled, :], 0, indices, out=rows[..., : self.filled, :])
        return rows

    def _show_filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys, self.values = self.key_buffer[..., : self.filled, :], self.value_buffer[..., : self.filled, :]
        return self.keys, self.values


def preallocate(cache, room: int) -> None:
    """Give a prefilled cache's full-attention layers `room` more positions, filled in place
    (`FilledInPlace`). Other layers (sliding windows, linear attention) stay as the model made them."""
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel():
            cache.layers[i] = FilledInPlace(layer.keys, layer.values, room)


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


class RowSampler:
    """Draws every row's next token from temperature- and top-p-shaped probabilities with the row's own
    generator: one uniform draw per row and step (inverse CDF), so row i's k-th token depends on
    seeds[i] and its own logits alone. A row's `steps` draws are taken at once: a CPU generator gives
    the same float64 sequence in one call as in one call per step, at an eighth of the calls for 8 steps."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, steps: int):
        self.uniforms = torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
                                     for seed in seeds]).float()
        self.step = 0
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        probs = top_p_probabilities(logits.float() / self.temperature, self.top_p).cpu()
        cumulative = probs.cumsum(-1)
        uniforms = self.uniforms[:, self.step : self.step + 1]
        self.step += 1
        tokens = torch.searchsorted(cumulative, uniforms * cumulative[:, -1:]).clamp(max=probs.size(-1) - 1)
        tokens = torch.where(probs.gather(1, tokens) > 0, tokens, probs.argmax(-1, keepdim=True))  # never a cut-off token
        return tokens[:, 0].to(logits.device)


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

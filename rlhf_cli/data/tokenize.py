"""Tokenisation and the one place where label masks are made.

A conversation is rendered with the tokenizer's chat template. The tokens of each trained
(assistant) turn are found by rendering the conversation up to that turn twice, once ending in the
generation prompt and once including the turn: the difference is exactly what the model must
produce, end-of-turn token included. The template must be prefix-preserving (rendering more turns
only appends tokens); when it is not, the row is refused rather than masked wrongly.

Plain-text rows are `tokens(prompt) + tokens(completion) + [EOS]`, with the completion and EOS trained.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from rlhf_cli.config.schema import Truncation
from rlhf_cli.data.formats import Message, PromptExample, SFTExample, to_prompt_examples
from rlhf_cli.errors import UserError

log = logging.getLogger("rlhf")


@dataclass
class TokenizedSample:
    input_ids: list[int]
    loss_mask: list[bool]  # True where the token is a label the loss counts
    where: str
    position_ids: Optional[list[int]] = None  # set for packed rows: restarts at 0 per sample


@dataclass
class TruncationReport:
    total: int = 0
    truncated: int = 0
    dropped: list[str] = field(default_factory=list)

    def summary(self, name: str, max_length: int) -> Optional[str]:
        if not self.truncated and not self.dropped:
            return None
        parts = []
        if self.truncated:
            parts.append(f"{self.truncated} of {self.total} samples longer than data.max_length={max_length} were truncated")
        if self.dropped:
            parts.append(f"{len(self.dropped)} dropped (first: {self.dropped[0]})")
        return f"{name}: " + "; ".join(parts)


def stop_token_ids(tokenizer, generation_config=None) -> set[int]:
    """Every token that ends a response: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    return {i for i in ids if i is not None}


def render(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, example: SFTExample) -> list[int]:
    """The tokens a model is given at generation time for this example."""
    return encode_text_prompt(tokenizer, example.prompt_messages if example.messages is not None else example.prompt)


def encode_text_prompt(tokenizer, prompt) -> list[int]:
    """A plain-text prompt as is, or messages rendered with the generation prompt."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return render(tokenizer, prompt, add_generation_prompt=True)


def tokenize_sft(tokenizer, examples: Sequence[SFTExample], stop_ids: set[int]) -> list[TokenizedSample]:
    """Token ids and label masks of SFT examples (plain-text rows are encoded in one batched call)."""
    plain = [e for e in examples if e.messages is None]
    prompts = tokenizer([e.prompt for e in plain])["input_ids"] if plain else []
    completions = tokenizer([e.completion for e in plain], add_special_tokens=False)["input_ids"] if plain else []
    encoded = iter(zip(prompts, completions))
    samples = []
    for example in examples:
        if example.messages is not None:
            samples.append(_tokenize_conversation(tokenizer, example, stop_ids))
            continue
        prompt_ids, completion_ids = next(encoded)
        ids = prompt_ids + completion_ids + [tokenizer.eos_token_id]
        samples.append(TokenizedSample(ids, [False] * len(prompt_ids) + [True] * (len(ids) - len(prompt_ids)), example.where))
    return samples


def _tokenize_conversation(tokenizer, example: SFTExample, stop_ids: set[int]) -> TokenizedSample:
    messages = example.messages
    ids = render(tokenizer, messages)
    mask = [False] * len(ids)
    for turn, message in enumerate(messages):
        if not message.train:
            continue
        before = render(tokenizer, messages[:turn], add_generation_prompt=True)
        after = render(tokenizer, messages[: turn + 1])
        if after[: len(before)] != before or ids[: len(after)] != after:
            raise UserError(
                f"{example.where}: the chat template is not prefix-preserving at turn {turn} "
                "(rendering later turns changes earlier tokens), so the assistant tokens cannot be masked exactly"
            )
        end = len(after)
        stops = [i for i in range(len(before), end) if after[i] in stop_ids]
        if stops:
            end = stops[-1] + 1  # text the template adds after the end-of-turn token is not the model's
        mask[len(before) : end] = [True] * (end - len(before))
    if not any(ids[i] in stop_ids for i in range(len(ids)) if mask[i]):
        # The template closes no assistant turn with an end token: add EOS so the model learns to stop.
        ids, mask = ids + [tokenizer.eos_token_id], mask + [True]
    return TokenizedSample(ids, mask, example.where)


def apply_max_length(
    samples: list[TokenizedSample], max_length: int, policy: Truncation, report: TruncationReport
) -> list[TokenizedSample]:
    kept = []
    for sample in samples:
        report.total += 1
        if len(sample.input_ids) <= max_length:
            kept.append(sample)
            continue
        if policy == Truncation.error:
            raise UserError(
                f"{sample.where}: {len(sample.input_ids)} tokens, over data.max_length={max_length} "
                "(raise it, or set data.truncation=truncate or drop)"
            )
        if policy == Truncation.drop:
            report.dropped.append(sample.where)
            continue
        report.truncated += 1
        cut = TokenizedSample(sample.input_ids[:max_length], sample.loss_mask[:max_length], sample.where)
        if any(cut.loss_mask[1:]):
            kept.append(cut)
        else:
            report.dropped.append(sample.where)
    return kept


def fit_prompt(prompt_ids: list[int], room: int, policy: Truncation, where: str, report: TruncationReport) -> Optional[list[int]]:
    """A prompt cut to `room` tokens for generation: its end is kept (the part the completion follows);
    None when dropped."""
    report.total += 1
    if len(prompt_ids) <= room:
        return prompt_ids
    if policy == Truncation.error:
        raise UserError(
            f"{where}: prompt of {len(prompt_ids)} tokens leaves no room for rollout.max_new_tokens within "
            f"data.max_length (at most {room} prompt tokens; raise data.max_length, or set data.truncation=truncate or drop)"
        )
    if policy == Truncation.drop:
        report.dropped.append(where)
        return None
    report.truncated += 1
    return prompt_ids[len(prompt_ids) - room :]


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt of the RL stages: its tokens, and the example (row, answer) it came from."""

    ids: list[int]
    example: PromptExample


def encode_prompts(tokenizer, rows: Sequence, data_cfg: Any, max_new_tokens: int, name: str = "data.train") -> list[EncodedPrompt]:
    """Every prompt's tokens, fitted so that prompt and completion stay within data.max_length; `name` is
    the key of the rows, for messages."""
    room = data_cfg.max_length - max_new_tokens
    report = TruncationReport()
    prompts = []
    for example in to_prompt_examples(rows):
        ids = fit_prompt(encode_text_prompt(tokenizer, example.prompt), room, data_cfg.truncation, example.where, report)
        if ids is not None:
            prompts.append(EncodedPrompt(ids, example))
    summary = report.summary(name, data_cfg.max_length)
    if summary:
        log.warning(summary)
    if not prompts:
        raise UserError(f"{name}: no prompt fits data.max_length={data_cfg.max_length}")
    return prompts


def pack(samples: list[TokenizedSample], max_length: int) -> list[TokenizedSample]:
    """Best-fit-decreasing packing into rows of at most max_length tokens.

    Each packed row carries position ids that restart at 0 for every sample: transformers reads
    them to keep attention inside each sample (no sample sees another).
    """
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i].input_ids), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        length = len(samples[i].input_ids)
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            room, b = free.pop(slot)
            bins[b].append(i)
            bisect.insort(free, (room - length, b))
        else:
            bins.append([i])
            bisect.insort(free, (max_length - length, len(bins) - 1))
    packed = []
    for members in bins:
        ids, mask, positions = [], [], []
        for i in members:
            ids += samples[i].input_ids
            # The first token of each sample has no label in the packed row: it would be predicted
            # from the previous sample.
            mask += [False] + samples[i].loss_mask[1:]
            positions += list(range(len(samples[i].input_ids)))
        packed.append(TokenizedSample(ids, mask, samples[members[0]].where, positions))
    return packed


def encode_prompt_response(tokenizer, prompt, response, stop_ids: set[int], where: str) -> tuple[list[int], list[int]]:
    """Token ids of a prompt and of one response to it; the response ends with its end token.

    Conversations: the prompt is rendered with the generation prompt, and the response is what
    rendering the whole conversation adds to it (the template must be prefix-preserving).
    Plain text: `tokens(prompt)` and `tokens(response) + [EOS]`.
    """
    if isinstance(prompt, str):
        prompt_ids = tokenizer(prompt)["input_ids"]
        return prompt_ids, tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_ids = render(tokenizer, prompt, add_generation_prompt=True)
    full = render(tokenizer, tuple(prompt) + tuple(response))
    if full[: len(prompt_ids)] != prompt_ids:
        raise UserError(
            f"{where}: the chat template is not prefix-preserving (the prompt's tokens change once a response "
            "follows), so the response tokens cannot be found exactly"
        )
    response_ids = full[len(prompt_ids) :]
    stops = [i for i, token in enumerate(response_ids) if token in stop_ids]
    if stops:
        response_ids = response_ids[: stops[-1] + 1]
    else:
        response_ids = response_ids + [tokenizer.eos_token_id]
    return prompt_ids, response_ids

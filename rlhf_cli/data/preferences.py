"""Preference data: pairwise and ranked rows, normalised into `PreferenceGroup`s.

A group is one prompt with K >= 2 responses and the pairs (better, worse, margin) among them. A
pairwise row is a group of two responses and one pair; a ranked row of K responses yields all
K(K-1)/2 pairs, kept together so that each response is encoded once and the prompt's pairs share
one batch (InstructGPT, Ouyang et al. 2022, section 3.5).

Row forms, detected from the keys (`data.format=preference` or `ranked` forces one):

| form | keys |
| --- | --- |
| explicit prompt | `prompt`, `chosen`, `rejected` as strings |
| conversational explicit prompt (TRL) | `prompt` as messages, `chosen`/`rejected` as the assistant messages only |
| message lists (UltraFeedback, minimind) | `chosen`/`rejected` as whole conversations; the prompt is their common prefix |
| transcripts (Anthropic HH-RLHF) | `chosen`/`rejected` as text with the prompt inside; the prompt ends at the last `\\n\\nAssistant:` they share |
| ranked | `prompt` and `responses` ordered best first, or with `scores` (higher is better) |

An optional `margin` (pairwise rows) is the minimum reward gap the pair should have (Llama 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlhf_cli.config.schema import DataFormat
from rlhf_cli.data.formats import ROLES, Message, Text
from rlhf_cli.data.sources import Row
from rlhf_cli.errors import UserError

HH_ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class PreferenceGroup:
    where: str
    prompt: Text
    responses: tuple[Text, ...]
    pairs: tuple[tuple[int, int, float], ...]  # (better index, worse index, margin)


def detect_preference_format(row: Row) -> DataFormat:
    keys = set(row.data)
    if "responses" in keys:
        return DataFormat.ranked
    if {"chosen", "rejected"} <= keys:
        return DataFormat.preference
    if "chosen" in keys or "rejected" in keys:
        missing = "rejected" if "chosen" in keys else "chosen"
        raise UserError(f"{row.where}: missing field '{missing}'")
    if "prompt" in keys or "messages" in keys or "question" in keys:
        raise UserError(
            f"{row.where}: this row has no chosen/rejected responses (prompt-only or SFT data); "
            "preference data needs chosen and rejected, or ranked responses"
        )
    shown = ", ".join(sorted(keys)) or "none"
    raise UserError(f"{row.where}: cannot tell the format from the keys ({shown}); expected chosen+rejected or prompt+responses")


def to_preference_groups(rows: list[Row], data_format: DataFormat, use_margin: bool) -> list[PreferenceGroup]:
    fmt = detect_preference_format(rows[0]) if data_format == DataFormat.auto else data_format
    if fmt not in (DataFormat.preference, DataFormat.ranked):
        raise UserError(f"data.format: '{fmt.value}' is not a preference format (use auto, preference or ranked)")
    convert = _from_ranked if fmt == DataFormat.ranked else _from_pair
    return [convert(row, use_margin) for row in rows]


def _from_pair(row: Row, use_margin: bool) -> PreferenceGroup:
    for key in ("chosen", "rejected"):
        if row.data.get(key) is None:
            raise UserError(f"{row.where}: missing field '{key}'")
    chosen, rejected, prompt = row.data["chosen"], row.data["rejected"], row.data.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is not None and not isinstance(prompt, str):
            raise UserError(f"{row.where}: field 'prompt' must be a string when chosen/rejected are strings")
        if prompt is None:
            prompt, chosen, rejected = _split_transcripts(row, chosen, rejected)
        group_prompt: Text = prompt
        responses: tuple[Text, ...] = (chosen, rejected)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        chosen_msgs = _parse_messages(row, "chosen", chosen)
        rejected_msgs = _parse_messages(row, "rejected", rejected)
        if isinstance(prompt, list):
            group_prompt = _parse_messages(row, "prompt", prompt)
            responses = (chosen_msgs, rejected_msgs)
        else:
            group_prompt, responses = _split_conversations(row, chosen_msgs, rejected_msgs)
    else:
        raise UserError(f"{row.where}: 'chosen' and 'rejected' must both be strings or both be message lists")
    if responses[0] == responses[1]:
        raise UserError(f"{row.where}: chosen and rejected are the same response")
    for key, response in zip(("chosen", "rejected"), responses):
        if not response:
            raise UserError(f"{row.where}: field '{key}' is empty")
    return PreferenceGroup(row.where, group_prompt, responses, ((0, 1, _margin(row, use_margin)),))


def _from_ranked(row: Row, use_margin: bool) -> PreferenceGroup:
    prompt = row.data.get("prompt")
    if prompt is None:
        raise UserError(f"{row.where}: missing field 'prompt'")
    responses = row.data.get("responses")
    if not isinstance(responses, list):
        raise UserError(f"{row.where}: field 'responses' must be a list")
    if len(responses) < 2:
        raise UserError(f"{row.where}: a ranked row needs at least 2 responses, found {len(responses)}")
    conversational = isinstance(prompt, list)
    group_prompt: Text = _parse_messages(row, "prompt", prompt) if conversational else _string(row, "prompt", prompt)
    parsed = tuple(
        _parse_messages(row, f"responses[{i}]", r) if conversational else _string(row, f"responses[{i}]", r)
        for i, r in enumerate(responses)
    )
    if len(set(parsed)) != len(parsed):
        raise UserError(f"{row.where}: field 'responses' holds the same response twice")
    scores = row.data.get("scores")
    if scores is None:
        order = list(range(len(parsed)))  # best first
        score_of = None
    else:
        if not (isinstance(scores, list) and len(scores) == len(parsed) and all(isinstance(s, (int, float)) for s in scores)):
            raise UserError(f"{row.where}: field 'scores' must be a list of {len(parsed)} numbers, one per response")
        order = sorted(range(len(parsed)), key=lambda i: -scores[i])
        score_of = scores
    pairs = []
    for a in range(len(order)):
        for b in range(a + 1, len(order)):
            better, worse = order[a], order[b]
            if score_of is not None and score_of[better] == score_of[worse]:
                continue  # a tie ranks nothing
            margin = float(score_of[better] - score_of[worse]) if use_margin and score_of is not None else 0.0
            pairs.append((better, worse, margin))
    if not pairs:
        raise UserError(f"{row.where}: all scores are equal, so the row ranks nothing")
    return PreferenceGroup(row.where, group_prompt, parsed, tuple(pairs))


def _margin(row: Row, use_margin: bool) -> float:
    value = row.data.get("margin")
    if not use_margin or value is None:
        return 0.0
    if not isinstance(value, (int, float)):
        raise UserError(f"{row.where}: field 'margin' must be a number, found {type(value).__name__}")
    return float(value)


def _string(row: Row, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise UserError(f"{row.where}: field '{key}' must be a string, found {type(value).__name__}")
    return value


def _parse_messages(row: Row, key: str, items: Any) -> tuple[Message, ...]:
    if not isinstance(items, list):
        raise UserError(f"{row.where}: field '{key}' must be a list of messages, found {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or item.get("role") not in ROLES or not isinstance(item.get("content"), str):
            raise UserError(f"{row.where}: {key}[{i}] must be an object with a role ({', '.join(ROLES)}) and string content")
        out.append(Message(item["role"], item["content"], train=item["role"] == "assistant"))
    return tuple(out)


def _split_transcripts(row: Row, chosen: str, rejected: str) -> tuple[str, str, str]:
    """HH-RLHF style: the prompt is the shared text up to and including the last shared `\\n\\nAssistant:`."""
    if chosen == rejected:
        raise UserError(f"{row.where}: chosen and rejected are the same response")
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    marker = chosen[:common].rfind(HH_ASSISTANT)
    cut = marker + len(HH_ASSISTANT) if marker >= 0 else common
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _split_conversations(
    row: Row, chosen: tuple[Message, ...], rejected: tuple[Message, ...]
) -> tuple[tuple[Message, ...], tuple[tuple[Message, ...], tuple[Message, ...]]]:
    """The shared leading messages are the prompt; what follows must start with an assistant turn."""
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    if common == 0:
        raise UserError(f"{row.where}: chosen and rejected share no prompt messages")
    chosen_tail, rejected_tail = chosen[common:], rejected[common:]
    for key, tail in (("chosen", chosen_tail), ("rejected", rejected_tail)):
        if not tail or tail[0].role != "assistant":
            raise UserError(f"{row.where}: after the shared prompt, '{key}' must continue with an assistant turn")
    return chosen[:common], (chosen_tail, rejected_tail)

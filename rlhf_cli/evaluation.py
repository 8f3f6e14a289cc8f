"""Evaluation shared by the stages: task accuracy by greedy decoding."""

from __future__ import annotations

from typing import Sequence

from rlhf_cli.data.formats import SFTExample
from rlhf_cli.data.tokenize import encode_prompt
from rlhf_cli.rollout import generate


def answer_accuracy(model, tokenizer, examples: Sequence[SFTExample], stop_ids: set[int], *,
                    max_new_tokens: int, batch_size: int) -> float:
    """Fraction of examples whose greedy completion, stripped, equals their `answer`."""
    completions = generate(
        model, [encode_prompt(tokenizer, e) for e in examples],
        max_new_tokens=max_new_tokens, pad_id=tokenizer.pad_token_id, stop_ids=stop_ids, batch_size=batch_size,
    )
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return sum(text.strip() == e.answer.strip() for text, e in zip(texts, examples)) / len(examples)

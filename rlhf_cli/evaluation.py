"""Evaluation shared by the stages: task accuracy by greedy decoding."""

from __future__ import annotations

from typing import Any, Sequence

from rlhf_cli.config.schema import DataFormat
from rlhf_cli.data.formats import SFTExample, to_sft_examples
from rlhf_cli.data.sources import load_rows
from rlhf_cli.data.tokenize import encode_prompt
from rlhf_cli.errors import UserError
from rlhf_cli.rollout import generate


def load_answer_examples(eval_cfg: Any) -> list[SFTExample]:
    """The first `eval.generate` rows of `eval.accuracy_data` that carry an `answer` (none when either is unset)."""
    if not (eval_cfg.accuracy_data and eval_cfg.generate):
        return []
    examples = [e for e in to_sft_examples(load_rows(eval_cfg.accuracy_data), DataFormat.auto) if e.answer is not None]
    if not examples:
        raise UserError(f"eval.accuracy_data: {eval_cfg.accuracy_data} has no rows with an `answer` field")
    return examples[: eval_cfg.generate]


def greedy_texts(model, tokenizer, examples: Sequence[SFTExample], stop_ids: set[int], *,
                 max_new_tokens: int, batch_size: int) -> list[str]:
    """Each example's greedy completion, decoded without special tokens."""
    completions = generate(
        model, [encode_prompt(tokenizer, e) for e in examples],
        max_new_tokens=max_new_tokens, pad_id=tokenizer.pad_token_id, stop_ids=stop_ids, batch_size=batch_size,
    )
    return tokenizer.batch_decode(completions, skip_special_tokens=True)


def exact_match_rate(texts: Sequence[str], examples: Sequence[SFTExample]) -> float:
    return sum(text.strip() == e.answer.strip() for text, e in zip(texts, examples)) / len(examples)


def answer_accuracy(model, tokenizer, examples: Sequence[SFTExample], stop_ids: set[int], *,
                    max_new_tokens: int, batch_size: int) -> float:
    """Fraction of examples whose greedy completion, stripped, equals their `answer`."""
    texts = greedy_texts(model, tokenizer, examples, stop_ids, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return exact_match_rate(texts, examples)

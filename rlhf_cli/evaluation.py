"""Evaluation shared by the stages and `rlhf eval`: task accuracy by greedy decoding, win rates."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from rlhf_cli.config.schema import DataFormat
from rlhf_cli.data.formats import SFTExample, to_sft_examples
from rlhf_cli.data.sources import load_rows
from rlhf_cli.data.tokenize import encode_prompt
from rlhf_cli.errors import UserError
from rlhf_cli.rollout import generate


def load_answer_examples(eval_cfg: Any, *, subset: Optional[str] = None, split: str = "train") -> list[SFTExample]:
    """The first `eval.generate` rows of `eval.accuracy_data` that carry an `answer` (none when either is unset);
    `subset` and `split` choose the part of a hub dataset."""
    if not (eval_cfg.accuracy_data and eval_cfg.generate):
        return []
    rows = load_rows(eval_cfg.accuracy_data, subset=subset, split=split)
    examples = [e for e in to_sft_examples(rows, DataFormat.auto) if e.answer is not None]
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


def win_rate(scores: Sequence[float], reference_scores: Sequence[float], same_text: Sequence[bool]) -> dict[str, float]:
    """How often a completion beats the reference's completion to the same prompt, as a reward model judges:
    (wins + ties / 2) / prompts. A tie is an equal score, or the same text (scored in other batches, the
    same text can differ in the last bits)."""
    ties = sum(same or score == reference for score, reference, same in zip(scores, reference_scores, same_text))
    wins = sum(not same and score > reference for score, reference, same in zip(scores, reference_scores, same_text))
    return {"value": (wins + ties / 2) / len(scores), "wins": wins, "ties": ties, "losses": len(scores) - wins - ties}

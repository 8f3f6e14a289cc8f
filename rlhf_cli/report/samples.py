"""Sample generations for a report: a run's final/ model answers the first prompts of the rows its
eval/accuracy was measured on, decoded greedily as the stage decodes them.

Those rows are `eval.accuracy_data` for dpo, grpo and ppo, and `data.eval` for sft. A reward model
(train-rm) generates nothing, and a run without a final/ (still running, or failed) has no model yet.
This module imports torch; the report loads it only when it samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlhf_cli.config.schema import AccuracyEvalConfig, DataFormat, ModelConfig
from rlhf_cli.data.formats import SFTExample, to_sft_examples
from rlhf_cli.data.sources import load_rows
from rlhf_cli.data.tokenize import stop_token_ids
from rlhf_cli.evaluation import greedy_texts, load_answer_examples
from rlhf_cli.models import default_device, load_causal_lm, load_tokenizer
from rlhf_cli.report.collect import ReportedRun
from rlhf_cli.runs import FINAL


@dataclass
class Sample:
    prompt: str
    expected: str
    completion: str

    @property
    def correct(self) -> bool:
        """Exact match after stripping, the rule of eval/accuracy."""
        return self.completion.strip() == self.expected.strip()


def sample_generations(run: ReportedRun, count: int) -> list[Sample]:
    """Greedy completions of the run's first `count` evaluation prompts that have an answer; none when
    the run has no causal LM in final/ or names no such rows. Raises UserError when the rows or the
    model cannot be loaded."""
    final = run.path / FINAL
    if count == 0 or run.stage == "train-rm" or not final.is_dir():
        return []
    examples = _answer_examples(run.stage, run.config, count)
    if not examples:
        return []
    recorded = run.config.get("model") or {}
    model_cfg = ModelConfig(path=str(final), attn_implementation=recorded.get("attn_implementation", "sdpa"),
                            trust_remote_code=recorded.get("trust_remote_code", False))
    tokenizer = load_tokenizer(model_cfg)
    model = load_causal_lm(model_cfg, tokenizer, seed=0).to(default_device())
    eval_cfg = run.config.get("eval") or {}
    texts = greedy_texts(model, tokenizer, examples, stop_token_ids(tokenizer, model.generation_config),
                         max_new_tokens=eval_cfg.get("max_new_tokens", 32), batch_size=eval_cfg.get("batch_size", 64))
    return [Sample(_prompt_text(example), example.answer, text) for example, text in zip(examples, texts)]


def _answer_examples(stage: str, config: dict[str, Any], count: int) -> list[SFTExample]:
    """The stage's own eval/accuracy rows, read as the stage reads them: sft's data.eval, the others'
    eval.accuracy_data; at most `count`, only those with an answer."""
    if stage != "sft":
        accuracy_data = (config.get("eval") or {}).get("accuracy_data")
        return load_answer_examples(AccuracyEvalConfig(accuracy_data=accuracy_data, generate=count))
    data = config.get("data") or {}
    if not data.get("eval"):
        return []
    rows = load_rows(data["eval"], subset=data.get("subset"), split=data.get("eval_split", "test"))
    examples = to_sft_examples(rows, DataFormat(data.get("format", "auto")))
    return [example for example in examples if example.answer is not None][:count]


def _prompt_text(example: SFTExample) -> str:
    if example.messages is None:
        return example.prompt or ""
    return "\n".join(message.content for message in example.prompt_messages)

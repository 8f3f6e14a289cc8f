"""Reward functions for the RL stages, combined with weights.

Each function scores a batch: `fn(prompts, completions, examples) -> list of floats`, where
`examples` carry the dataset row (`example.row`) and its reference answer (`example.answer`).

| `name` | reward |
| --- | --- |
| `exact_match` | 1 when the completion, stripped, equals the row's answer |
| `math` | 1 when math-verify finds the completion equal to the answer (GSM8K's `#### 72` is extracted) |
| `format` | 1 when the completion matches the regular expression `pattern` |
| `model` | the score of the reward model at `path` (e.g. runs/default/rm/final) |
| `http` | POST {prompts, completions, answers} as JSON to `url`; the reply is {"rewards": [...]} |
| `module:function` | a user function with the signature above, imported from an installed module |

A function that raises, returns the wrong number of values, or anything but finite numbers stops
the run with an `error:` naming it.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from rlhf_cli.errors import UserError

RewardFn = Callable[[list[str], list[str], Sequence[Any]], list[float]]
BUILTIN_REWARDS = ("exact_match", "math", "format", "model", "http")


@dataclass
class Reward:
    name: str
    weight: float
    fn: RewardFn


def exact_match(prompts: list[str], completions: list[str], examples: Sequence[Any]) -> list[float]:
    return [float(c.strip() == _answer(e, "exact_match").strip()) for c, e in zip(completions, examples)]


def gsm8k_answer(answer: str) -> str:
    """GSM8K writes the final answer after `####`; thousands separators are dropped."""
    return answer.split("####")[-1].strip().replace(",", "") if "####" in answer else answer.strip()


def math_reward(prompts: list[str], completions: list[str], examples: Sequence[Any]) -> list[float]:
    from math_verify import parse, verify

    scores = []
    for completion, example in zip(completions, examples):
        gold = parse(gsm8k_answer(_answer(example, "math")))
        scores.append(float(bool(gold) and verify(gold, parse(completion))))
    return scores


def format_reward(pattern: str) -> RewardFn:
    compiled = re.compile(pattern, re.DOTALL)

    def score(prompts: list[str], completions: list[str], examples: Sequence[Any]) -> list[float]:
        return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]

    return score


def http_reward(url: str, timeout: float, retries: int) -> RewardFn:
    def score(prompts: list[str], completions: list[str], examples: Sequence[Any]) -> list[float]:
        body = json.dumps({"prompts": prompts, "completions": completions,
                           "answers": [getattr(e, "answer", None) for e in examples]}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        failure: Exception = RuntimeError("no attempt")
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(0.1 * 2**attempt)
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    reply = response.read()
            except (urllib.error.URLError, TimeoutError, OSError) as exc:
                failure = exc
                continue
            try:
                return json.loads(reply)["rewards"]
            except (KeyError, TypeError, ValueError) as exc:
                raise RuntimeError(f"{url} replied without a JSON list under 'rewards' ({exc})") from None
        tries = "1 try" if retries == 0 else f"{retries + 1} tries"
        raise RuntimeError(f"{url} did not answer within {timeout:g} s ({tries}; last: {failure})")

    return score


class RewardModel:
    """The score of a reward model (a train-rm final/) at each completion's last token, as a reward function.

    Prompt and completion are re-tokenised as text with the reward model's own tokenizer, exactly
    as train-rm encoded its pairs, so a reward model need not share the policy's tokenizer. Scoring
    runs wherever `model` is, so a caller may move it between uses.
    """

    def __init__(self, model_cfg: Any, path: str, device: Any, batch_size: int = 64):
        import dataclasses

        from rlhf_cli.data.tokenize import stop_token_ids
        from rlhf_cli.models import load_reward_model, load_tokenizer

        rm_cfg = dataclasses.replace(model_cfg, path=path, gradient_checkpointing=False)
        self.tokenizer = load_tokenizer(rm_cfg)
        self.model = load_reward_model(rm_cfg, self.tokenizer, seed=0).to(device).eval().requires_grad_(False)
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.batch_size = batch_size

    def __call__(self, prompts: list[str], completions: list[str], examples: Sequence[Any]) -> list[float]:
        import torch

        from rlhf_cli.data.batches import collate
        from rlhf_cli.data.formats import Message
        from rlhf_cli.data.tokenize import TokenizedSample, encode_prompt_response

        samples = []
        for completion, example in zip(completions, examples):
            response = completion if isinstance(example.prompt, str) else (Message("assistant", completion),)
            prompt_ids, response_ids = encode_prompt_response(self.tokenizer, example.prompt, response, self.stop_ids, example.where)
            ids = prompt_ids + response_ids
            samples.append(TokenizedSample(ids, [False] * len(ids), example.where))
        device = next(self.model.parameters()).device
        scores = []
        with torch.no_grad():
            for start in range(0, len(samples), self.batch_size):
                batch = collate(samples[start : start + self.batch_size], self.tokenizer.pad_token_id)
                logits = self.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                                    use_cache=False).logits
                scores.extend(logits[:, 0].float().tolist())
        return scores


def user_function(spec: str) -> RewardFn:
    module_name, _, attribute = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"grpo.rewards: cannot import reward function '{spec}': {exc}") from None
    if not callable(fn):
        raise UserError(f"grpo.rewards: '{spec}' is not callable")
    return fn


def build_rewards(specs: Sequence[Any], model_cfg: Any = None, device: Any = "cpu") -> list[Reward]:
    """The reward functions a config names, each with its weight; `model_cfg` (the stage's `model`
    keys) supplies the loading options of a `model` reward."""
    rewards = []
    for spec in specs:
        if spec.name == "exact_match":
            fn: RewardFn = exact_match
        elif spec.name == "math":
            fn = math_reward
        elif spec.name == "format":
            if not spec.pattern:
                raise UserError("grpo.rewards: the format reward needs a `pattern` (a regular expression)")
            try:
                fn = format_reward(spec.pattern)
            except re.error as exc:
                raise UserError(f"grpo.rewards: format pattern {spec.pattern!r} is not a regular expression: {exc}") from None
        elif spec.name == "http":
            if not spec.url:
                raise UserError("grpo.rewards: the http reward needs a `url`")
            fn = http_reward(spec.url, spec.timeout, spec.retries)
        elif spec.name == "model":
            if not spec.path:
                raise UserError("grpo.rewards: the model reward needs a `path` to a reward model (e.g. runs/default/rm/final)")
            fn = RewardModel(model_cfg, spec.path, device)
        elif ":" in spec.name:
            fn = user_function(spec.name)
        else:
            raise UserError(f"grpo.rewards: unknown reward '{spec.name}' (use {', '.join(BUILTIN_REWARDS)} or module:function)")
        rewards.append(Reward(spec.name, spec.weight, fn))
    if not rewards:
        raise UserError("grpo.rewards: name at least one reward")
    return rewards


def score(rewards: list[Reward], prompts: list[str], completions: list[str], examples: Sequence[Any]) -> tuple[list[float], dict[str, list[float]]]:
    """The weighted sum of every reward per completion, and each reward's own values."""
    each: dict[str, list[float]] = {}
    for reward in rewards:
        try:
            values = reward.fn(prompts, completions, examples)
        except UserError:
            raise
        except Exception as exc:  # a user's function can fail in any way; name it
            raise UserError(f"reward '{reward.name}' failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise UserError(f"reward '{reward.name}' returned {got} values for {len(completions)} completions")
        bad = [v for v in values if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))]
        if bad:
            raise UserError(f"reward '{reward.name}' returned {bad[0]!r}, not a finite number")
        each[reward.name] = [float(v) for v in values]
    totals = [sum(r.weight * each[r.name][i] for r in rewards) for i in range(len(completions))]
    return totals, each


def _answer(example: Any, reward: str) -> str:
    if getattr(example, "answer", None) is None:
        raise UserError(f"{getattr(example, 'where', '?')}: reward '{reward}' needs an `answer` field, and this row has none")
    return example.answer

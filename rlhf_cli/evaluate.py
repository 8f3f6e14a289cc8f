"""rlhf eval: the metrics of one checkpoint, written to `<output_dir>/eval.json`.

`model.path` (default: sft/final of `from_run`) is evaluated. A causal LM is compared with the
reference `ref.path` and scored by the reward model `reward.path` (defaults: sft/final and rm/final
of from_run); a reward model is scored on preference pairs. Each metric is computed when its inputs
exist and is otherwise listed under `skipped` with the reason: a default that from_run does not hold
skips what needs it, while an explicit path that does not load is an error.

| metric | of | definition |
| --- | --- | --- |
| accuracy | a causal LM | greedy completions to `eval.accuracy_data` rows: the fraction equal to the row's `answer` (stripped); beside it the mean `math` reward (math-verify equivalence) |
| reward | a causal LM | the mean reward-model score of its completions to `data.prompts` |
| win_rate | a causal LM | (wins + ties / 2) / prompts: its completion against the reference's to the same prompt, judged by the reward model |
| kl | a causal LM | the mean over its completions to `data.prompts` of the sum over each completion's tokens of log pi - log ref (each token given the prompt and the tokens before it) |
| rm_accuracy | a reward model | the fraction of `data.eval` pairs whose chosen response it scores higher (train-rm's eval/accuracy) |

The completions of reward, win_rate and kl are sampled at `eval.temperature`, each prompt from its
own seed, and the reference answers each prompt from the same seed: a model raced against itself
ties every prompt. kl is the k1 estimator (Schulman, "Approximating KL divergence", 2020): on the
model's own samples its mean is an unbiased estimate of KL(pi || ref) per completion, though a single
completion's figure can be negative. Both models' log-probabilities are taken at the sampling
temperature, as PPO takes them, so kl estimates KL(pi_T || ref_T), the models' own KL at T = 1. With
greedy completions (`eval.temperature=0`) it is the log-ratio of those completions at T = 1, which
is not an estimate of the KL.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from rlhf_cli.algos.losses import token_logprobs
from rlhf_cli.algos.policy import kl_k1
from rlhf_cli.config.schema import DataFormat, ModelConfig
from rlhf_cli.data.batches import collate
from rlhf_cli.data.preferences import to_preference_groups
from rlhf_cli.data.sources import load_rows
from rlhf_cli.data.tokenize import EncodedPrompt, TokenizedSample, encode_prompts, stop_token_ids
from rlhf_cli.errors import UserError
from rlhf_cli.evaluation import exact_match_rate, greedy_texts, load_answer_examples, win_rate
from rlhf_cli.models import (
    CAUSAL_LM,
    REWARD_MODEL,
    default_device,
    forward_inputs,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    model_kind,
    resolve_dtype,
)
from rlhf_cli.rewards import RewardModel, math_reward
from rlhf_cli.rollout import generate, row_seeds
from rlhf_cli.runs import EVAL_JSON, RunDir, library_versions, redact, write_json_atomic
from rlhf_cli.runs.chain import chained_final
from rlhf_cli.stages import describe_model_source
from rlhf_cli.stages.train_rm import _encode as encode_preference_groups
from rlhf_cli.stages.train_rm import evaluate as score_preference_groups

log = logging.getLogger("rlhf")

METRICS = ("accuracy", "reward", "win_rate", "kl", "rm_accuracy")
GENERATING_METRICS = METRICS[:4]


@dataclass(frozen=True)
class Source:
    """A model the evaluated one is compared with or scored by: its path, or why there is none."""

    path: Optional[str]
    missing: Optional[str] = None


def run(cfg: Any, overrides: list[str]) -> dict[str, Any]:
    # 1. The model and what kind it is; for a causal LM its reference and reward model (explicit,
    #    chained from from_run, or absent and why). The result never goes into a stage's run directory.
    _refuse_stage_run(cfg.output_dir)
    model_path = cfg.model.path or chained_final(cfg.from_run, "sft", "model.path")
    model_keys = _loading_keys(cfg, model_path, revision=cfg.model.revision)
    kind = model_kind(model_keys)
    evaluated: dict[str, Any] = {"model": describe_model_source(model_path) | {"kind": kind}, "reference": None, "reward_model": None}
    if kind == CAUSAL_LM:
        reference = _explicit_or_chained(cfg.ref.path, cfg.from_run, "sft", "ref.path")
        reward = _explicit_or_chained(cfg.reward.path, cfg.from_run, "train-rm", "reward.path")
        _expect_kind(cfg, reference.path, "ref.path", CAUSAL_LM)
        _expect_kind(cfg, reward.path, "reward.path", REWARD_MODEL)
        evaluated["reference"] = describe_model_source(reference.path) if reference.path else None
        evaluated["reward_model"] = describe_model_source(reward.path) if reward.path else None
    device, dtype = default_device(), resolve_dtype(cfg.model.dtype.value)
    tokenizer = load_tokenizer(model_keys)
    log.info(f"eval: {model_path} ({kind.replace('_', ' ')}) -> {Path(cfg.output_dir) / EVAL_JSON}")

    # 2. The metrics of its kind; the others are skipped, with the reason.
    if kind == REWARD_MODEL:
        skipped = {name: "model.path is a reward model; this metric needs a causal LM that generates" for name in GENERATING_METRICS}
        metrics = {}
        if cfg.data.eval:
            metrics["rm_accuracy"] = _rm_accuracy(cfg, model_keys, tokenizer, device, dtype)
        else:
            skipped["rm_accuracy"] = "data.eval is null"
    else:
        metrics, skipped = _evaluate_causal_lm(cfg, model_keys, tokenizer, device, dtype, reference, reward)
        skipped["rm_accuracy"] = "model.path is a causal LM; rm_accuracy needs a reward model (a train-rm final/)"

    # 3. eval.json, whole or not at all, and the table.
    result = {
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **evaluated,
        "metrics": {name: metrics[name] for name in METRICS if name in metrics},
        "skipped": {name: skipped[name] for name in METRICS if name in skipped},
        "config": redact(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)),
        "overrides": redact(overrides),
        "versions": library_versions(),
    }
    output = Path(cfg.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output / EVAL_JSON, result)
    sys.stdout.write(table(result) + "\n")
    sys.stdout.flush()
    return result


def _evaluate_causal_lm(cfg: Any, model_keys: ModelConfig, tokenizer, device: torch.device, dtype: torch.dtype,
                        reference_source: Source, reward_source: Source) -> tuple[dict[str, Any], dict[str, str]]:
    """accuracy, reward, win_rate and kl of a causal LM, each computed when its inputs exist."""
    e = cfg.eval
    metrics: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    policy = load_causal_lm(model_keys, tokenizer, seed=e.seed).to(device, dtype).eval()
    stop_ids = stop_token_ids(tokenizer, policy.generation_config)

    # a. accuracy: greedy completions of the rows with an answer.
    if not e.accuracy_data or not e.generate:
        skipped["accuracy"] = "eval.accuracy_data is null" if not e.accuracy_data else "eval.generate is 0"
    else:
        examples = load_answer_examples(e, subset=cfg.data.subset, split=cfg.data.split)
        texts = greedy_texts(policy, tokenizer, examples, stop_ids, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size)
        math = math_reward([""] * len(texts), texts, examples)
        metrics["accuracy"] = {"value": exact_match_rate(texts, examples), "math": sum(math) / len(math),
                               "rows": len(examples), "data": e.accuracy_data}

    # b. The model's completions to data.prompts; kl to the reference on them.
    if not cfg.data.prompts:
        return metrics, skipped | dict.fromkeys(("reward", "win_rate", "kl"), "data.prompts is null")
    rows = load_rows(cfg.data.prompts, subset=cfg.data.subset, split=cfg.data.split)[: e.max_samples or None]
    prompts = encode_prompts(tokenizer, rows, cfg.data, e.max_new_tokens, name="data.prompts")
    completions = _complete(policy, prompts, tokenizer.pad_token_id, stop_ids, e)
    on_prompts = {"prompts": len(prompts), "data": cfg.data.prompts}
    reference = None
    if reference_source.path is None:
        skipped["win_rate"] = skipped["kl"] = reference_source.missing
    else:
        reference_keys = _loading_keys(cfg, reference_source.path)
        _expect_same_tokenizer(reference_keys, tokenizer)
        reference = load_causal_lm(reference_keys, tokenizer, seed=e.seed).to(device, dtype).eval()
        scoring_temperature = e.temperature if e.temperature > 0 else 1.0  # greedy completions: the models as they are
        kl = completion_kl(policy, reference, prompts, completions, tokenizer.pad_token_id, scoring_temperature, e.batch_size)
        metrics["kl"] = {"value": float(kl.mean()), "estimator": "k1", "completions": "sampled" if e.temperature else "greedy",
                         "temperature": e.temperature, "completion_length": sum(map(len, completions)) / len(completions)} | on_prompts

    # c. reward and win_rate: the reward model scores the model's completions and, from the same seeds, the
    #    reference's (as text, with its own tokenizer).
    if reward_source.path is None:
        skipped["reward"] = reward_source.missing
        skipped.setdefault("win_rate", reward_source.missing)
        return metrics, skipped
    scorer = RewardModel(_loading_keys(cfg, reward_source.path), reward_source.path, device, batch_size=e.batch_size)
    scorer.model.to(dtype)
    examples = [p.example for p in prompts]
    prompt_texts = tokenizer.batch_decode([p.ids for p in prompts], skip_special_tokens=True)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    scores = scorer(prompt_texts, texts, examples)
    metrics["reward"] = {"value": sum(scores) / len(scores)} | on_prompts
    if reference is not None:
        reference_texts = tokenizer.batch_decode(_complete(reference, prompts, tokenizer.pad_token_id, stop_ids, e), skip_special_tokens=True)
        reference_scores = scorer(prompt_texts, reference_texts, examples)
        same_text = [text == other for text, other in zip(texts, reference_texts)]
        metrics["win_rate"] = win_rate(scores, reference_scores, same_text) | {
            "reference_reward": sum(reference_scores) / len(reference_scores)} | on_prompts
    return metrics, skipped


def _complete(model, prompts: list[EncodedPrompt], pad_id: int, stop_ids: set[int], eval_cfg: Any) -> list[list[int]]:
    """One completion per prompt: sampled at eval.temperature, prompt i from seed i (greedy at 0)."""
    seeds = row_seeds(eval_cfg.seed, 0, 0, len(prompts)) if eval_cfg.temperature > 0 else None
    return generate(model, [p.ids for p in prompts], max_new_tokens=eval_cfg.max_new_tokens, pad_id=pad_id, stop_ids=stop_ids,
                    batch_size=eval_cfg.batch_size, temperature=eval_cfg.temperature, seeds=seeds)


@torch.no_grad()
def completion_kl(policy, reference, prompts: list[EncodedPrompt], completions: list[list[int]], pad_id: int,
                  temperature: float, batch_size: int) -> torch.Tensor:
    """(N,) the k1 estimate of each completion: sum over its tokens of log pi - log ref, both from the
    logits divided by `temperature`."""
    device = next(policy.parameters()).device
    sums = []
    for start in range(0, len(prompts), batch_size):
        rows = [TokenizedSample(p.ids + c, [False] * len(p.ids) + [True] * len(c), p.example.where)
                for p, c in zip(prompts[start : start + batch_size], completions[start : start + batch_size])]
        batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
        logprobs = token_logprobs(policy(**forward_inputs(batch)).logits / temperature, batch["input_ids"])
        ref_logprobs = token_logprobs(reference(**forward_inputs(batch)).logits / temperature, batch["input_ids"])
        sums.append((kl_k1(logprobs, ref_logprobs) * batch["loss_mask"][:, 1:]).sum(-1))
    return torch.cat(sums).cpu()


class _NoAutocast:
    """Stands in for the training engine that train-rm's scoring asks for an autocast context: eval casts
    the weights to model.dtype itself, so there is nothing to autocast."""

    @staticmethod
    def autocast():
        return contextlib.nullcontext()


def _rm_accuracy(cfg: Any, model_keys: ModelConfig, tokenizer, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """train-rm's eval/accuracy and eval/margin of the reward model on data.eval, encoded as train-rm encodes."""
    model = load_reward_model(model_keys, tokenizer, seed=cfg.eval.seed).to(device, dtype).eval()
    stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    rows = load_rows(cfg.data.eval, subset=cfg.data.subset, split=cfg.data.split)
    groups = to_preference_groups(rows, DataFormat.auto, use_margin=False)[: cfg.eval.max_samples or None]
    encoded = encode_preference_groups(tokenizer, groups, stop_ids, cfg.data, "data.eval")
    scored = score_preference_groups(model, encoded, tokenizer.pad_token_id, cfg.eval.batch_size, device, _NoAutocast)
    return {"value": scored["eval/accuracy"], "margin": scored["eval/margin"], "pairs": sum(len(g.pairs) for g in encoded),
            "prompts": len(encoded), "data": cfg.data.eval}


def _loading_keys(cfg: Any, path: str, revision: Optional[str] = None) -> ModelConfig:
    """The model keys the loaders take, for `path` with eval's loading options (nothing trains: no LoRA, no
    activation checkpointing). model.revision belongs to model.path alone."""
    return ModelConfig(path=path, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation,
                       trust_remote_code=cfg.model.trust_remote_code, revision=revision)


def _explicit_or_chained(path: Optional[str], from_run: str, parent_stage: str, key: str) -> Source:
    """An explicit path, else from_run's completed `parent_stage` final/; when from_run holds none, the reason."""
    if path is not None:
        return Source(path)
    try:
        return Source(chained_final(from_run, parent_stage, key))
    except UserError as missing:
        return Source(None, str(missing))


def _expect_kind(cfg: Any, path: Optional[str], key: str, kind: str) -> None:
    if path is None:
        return
    found = model_kind(_loading_keys(cfg, path), key)
    if found != kind:
        raise UserError(f"{key}: {path} is a {found.replace('_', ' ')}, not a {kind.replace('_', ' ')}")


def _expect_same_tokenizer(reference_keys: ModelConfig, tokenizer) -> None:
    """kl compares the two models' log-probabilities of the same token ids, so they must share a vocabulary."""
    if load_tokenizer(reference_keys).get_vocab() != tokenizer.get_vocab():
        raise UserError(f"ref.path: {reference_keys.path} has another tokenizer than model.path; kl and win_rate need one tokenizer")


def _refuse_stage_run(output_dir: str) -> None:
    manifest = RunDir(output_dir).read_manifest()
    if manifest is not None:
        raise UserError(f"output_dir={output_dir}: holds a {manifest.get('stage')} run; eval writes beside runs, not into them: "
                        "choose another output_dir")


def table(result: dict[str, Any]) -> str:
    """The terminal summary of an eval.json: one line per metric, its value and what it was computed on."""
    metrics, skipped = result["metrics"], result["skipped"]
    lines = [f"{'metric':<12} {'value':>8}  on"]
    for name in METRICS:
        if name in metrics:
            lines.append(f"{name:<12} {metrics[name]['value']:>8.4f}  {_described(name, metrics[name], result)}")
        else:
            lines.append(f"{name:<12} {'skipped':>8}  {skipped[name]}")
    return "\n".join(lines)


def _described(name: str, metric: dict[str, Any], result: dict[str, Any]) -> str:
    if name == "accuracy":
        return f"exact match of {metric['rows']} greedy completions to {metric['data']}; math reward {metric['math']:.4f}"
    if name == "reward":
        return f"mean score of {metric['prompts']} completions to {metric['data']} by {result['reward_model']['path']}"
    if name == "win_rate":
        return (f"against {result['reference']['path']}: {metric['wins']} wins, {metric['ties']} ties, {metric['losses']} losses "
                f"(the reference's reward {metric['reference_reward']:.4f})")
    if name == "kl":
        return f"k1 to {result['reference']['path']}, summed over each of {metric['prompts']} {metric['completions']} completions"
    return f"{metric['pairs']} pairs of {metric['data']} (mean margin {metric['margin']:.4f})"

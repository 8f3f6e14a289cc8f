"""rlhf grpo: group relative policy optimisation (Shao et al. 2024), with no critic.

Each step samples G completions for every prompt, scores them with the reward functions, and gives
every token of a completion its group-relative advantage. The loss is PPO's clipped surrogate
(asymmetric bounds for DAPO's clip-higher) plus beta times a KL estimator to the frozen reference,
reduced by the chosen aggregation with its normaliser counted over the whole step. With mu inner
updates, the rollout policy's log-probabilities are pi_old; with mu = 1 they equal the current ones
and are not recomputed (the ratio is 1 and its gradient is the policy gradient).

Departures from the paper: the KL estimator and the loss aggregation are choices (k3 and the
per-sequence mean in the paper); beta defaults to 0, with no reference model loaded.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from rlhf_cli.algos.losses import token_logprobs
from rlhf_cli.algos.policy import ADVANTAGES, KL_ESTIMATORS, aggregate_loss, clipped_surrogate
from rlhf_cli.data.batches import StepBatches
from rlhf_cli.data.sources import load_rows
from rlhf_cli.data.tokenize import EncodedPrompt, encode_prompts, stop_token_ids
from rlhf_cli import distributed
from rlhf_cli.engine import make_engine
from rlhf_cli.engine.zero import frozen_for_inference
from rlhf_cli.evaluation import answer_accuracy, load_answer_examples
from rlhf_cli.metrics import MetricsLogger, Throughput
from rlhf_cli.models import (
    apply_lora,
    count_parameters,
    default_device,
    load_causal_lm,
    load_reference,
    load_tokenizer,
)
from rlhf_cli.models.shared_prompt import PromptResponses, collate_responses, response_logits
from rlhf_cli.rewards import RewardModel, build_rewards, score
from rlhf_cli.rollout import Sampler, make_sampler, row_seeds
from rlhf_cli.stages import (
    RunStart,
    begin_training,
    checkpoint_if_due,
    describe_model_source,
    due,
    finish,
    plan_steps,
    seed_everything,
    start_model_path,
)

log = logging.getLogger("rlhf")


@dataclasses.dataclass
class Rollout:
    """One micro-batch of sampled completions, ready for the loss."""

    batch: PromptResponses  # each prompt once, its G completions after it; loss_mask marks the kept completions' tokens
    advantages: torch.Tensor  # (B,)
    old_logprobs: torch.Tensor | None  # (B, T-1), when mu > 1
    ref_logprobs: torch.Tensor | None  # (B, T-1), when beta > 0
    kept: int  # rows in the loss; rows of filtered groups stay in the batch with an empty loss mask


def run(cfg: Any, start: RunStart, overrides: list[str]) -> dict[str, Any]:
    g = cfg.grpo
    # 1. Policy, reference (only with beta > 0), tokenizer and rewards.
    seed_everything(cfg.train.seed)
    cfg.model.path = start_model_path(cfg)
    tokenizer = load_tokenizer(cfg.model)
    policy = apply_lora(load_causal_lm(cfg.model, tokenizer, seed=cfg.train.seed), cfg.model)
    device = default_device()
    policy.to(device)
    stop_ids = stop_token_ids(tokenizer, policy.generation_config)
    reference_path = cfg.ref.path or cfg.model.path
    reference = None
    if g.beta > 0:
        reference = frozen_for_inference(load_reference(cfg.model, reference_path, policy, tokenizer, cfg.train.seed, device), cfg)
    rewards = build_rewards(g.rewards, cfg.model, device)
    for reward in rewards:
        if isinstance(reward.fn, RewardModel):
            reward.fn.model = frozen_for_inference(reward.fn.model, cfg)
    sampler = make_sampler(cfg.rollout, policy, tokenizer.pad_token_id, stop_ids)

    # 2. Data: prompts, encoded once (with answers for the rule rewards); rows with answers for eval accuracy.
    prompts = encode_prompts(tokenizer, load_rows(cfg.data.train, subset=cfg.data.subset, split=cfg.data.train_split),
                             cfg.data, cfg.rollout.max_new_tokens)
    answer_examples = load_answer_examples(cfg.eval)
    batches = StepBatches(prompts, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seed)
    total_steps = plan_steps(cfg.train, len(prompts), batches.samples_per_step)

    # 3. Engine (mu updates per step) and the state to resume from.
    engine = make_engine(policy, cfg, total_steps * g.inner_updates)
    parents = {"model": describe_model_source(cfg.model.path)}
    if reference is not None:
        parents["reference"] = describe_model_source(reference_path)
    start_step = begin_training(cfg, start, policy, engine, parents, overrides)
    log.info(
        f"grpo ({g.advantage.value}, {g.loss_agg.value}, beta {g.beta}): {count_parameters(policy) / 1e6:.2f}M parameters, "
        f"{len(prompts)} prompts, {total_steps} steps of {batches.samples_per_step} prompts x {g.num_generations} "
        f"completions, rewards {', '.join(r.name for r in rewards)} -> {start.run.path}"
    )

    def evaluate() -> dict[str, float]:
        return {"eval/accuracy": answer_accuracy(policy, tokenizer, answer_examples, stop_ids,
                                                 max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)}

    # 4. Train.
    metrics = MetricsLogger(start.run.path, cfg, total_steps, start_step)
    last: dict[str, Any] = {}
    try:
        if start_step == 0 and answer_examples:
            metrics.log(0, evaluate())
        throughput = Throughput()
        stats: dict[str, list[float]] = {}  # per completion, since the last log line
        for step in range(start_step, total_steps):
            # 4a. Rollouts for every micro-batch of the step, scored and turned into advantages.
            rollouts = []
            for i, micro in enumerate(batches.micro_batches(step)):
                seeds = row_seeds(cfg.train.seed, step, batches.first_position(i) * g.num_generations, len(micro) * g.num_generations)
                rollouts.append(_rollout(policy, reference, tokenizer, sampler, micro, rewards, cfg, device, engine.autocast,
                                         seeds=seeds, stats=stats))
                throughput.add(rollouts[-1].batch.num_tokens)
            num_sequences = distributed.total(sum(r.kept for r in rollouts))
            num_tokens = distributed.total(sum(int(r.batch.loss_mask[:, 1:].sum()) for r in rollouts))

            # 4b. mu updates on the same rollouts, the normaliser counted over the whole step.
            lr = engine.lr
            totals = torch.zeros(4, device=device)  # loss, kl sum, clipped tokens, tokens
            for _ in range(g.inner_updates if num_sequences else 0):
                totals.zero_()
                for rollout in rollouts:
                    batch = rollout.batch
                    mask = batch.loss_mask[:, 1:].float()
                    logprobs = _logprobs(policy, batch, cfg.rollout.temperature, engine.autocast)
                    old = rollout.old_logprobs if rollout.old_logprobs is not None else logprobs.detach()
                    per_token, clipped = clipped_surrogate(logprobs, old, rollout.advantages[:, None], g.epsilon_low, g.epsilon_high)
                    kl = torch.zeros_like(per_token)
                    if rollout.ref_logprobs is not None:
                        kl = KL_ESTIMATORS[g.kl_estimator.value](logprobs, rollout.ref_logprobs)
                        per_token = per_token + g.beta * kl
                    loss = aggregate_loss(per_token, mask, g.loss_agg.value, num_sequences=num_sequences,
                                          num_tokens=num_tokens, max_length=cfg.rollout.max_new_tokens)
                    engine.backward(loss)
                    totals += torch.stack([loss.detach(), (kl.detach() * mask).sum(), (clipped * mask).sum(), mask.sum()])
                grad_norm = engine.step()
            done = step + 1
            metrics.advance(done)

            if done % cfg.train.log_every == 0 or done == total_steps:
                loss_sum, kl_sum, clipped_tokens, tokens = distributed.total(totals).tolist()
                stats = {name: distributed.gather(values) for name, values in stats.items()}
                reward = torch.tensor(stats["reward"])
                last = {
                    "loss": loss_sum, "reward/mean": float(reward.mean()), "reward/std": float(reward.std()),
                    **{f"reward/{name}": sum(v) / len(v) for name, v in stats.items() if name not in ("reward", "length", "zero_std")},
                    "kl": kl_sum / max(tokens, 1), "clipfrac": clipped_tokens / max(tokens, 1),
                    "completion_length": sum(stats["length"]) / len(stats["length"]),
                    "frac_reward_zero_std": sum(stats["zero_std"]) / len(stats["zero_std"]),
                    "lr": lr, "grad_norm": grad_norm if num_sequences else 0.0,
                    "nonfinite_steps": engine.nonfinite.total, "tokens_per_s": distributed.total(throughput.read()),
                }
                metrics.log(done, last)
                stats = {}
            if answer_examples and due(cfg.train.eval_every, done, total_steps):
                metrics.log(done, evaluate())
            checkpoint_if_due(cfg, start, done, total_steps, policy, engine)

        # 5. Final evaluation and the model.
        final_metrics = {k: last.get(k) for k in ("reward/mean", "kl", "completion_length")} | {"steps": total_steps}
        if answer_examples:
            evaluation = evaluate()
            metrics.log(total_steps, evaluation)
            final_metrics.update(evaluation)
    finally:
        metrics.close()
    finish(cfg, start, policy, tokenizer, final_metrics)
    return final_metrics


@torch.no_grad()
def _rollout(policy, reference, tokenizer, sampler: Sampler, prompts: list[EncodedPrompt], rewards, cfg: Any,
             device: torch.device, autocast, seeds: list[int], stats: dict[str, list[float]]) -> Rollout:
    """Sample G completions per prompt, score them, and build the loss's tensors. Filtered groups keep
    their rows, masked out of the loss, so that every process runs the same forward passes."""
    g = cfg.grpo
    group = g.num_generations
    examples = [p.example for p in prompts]
    repeated = [p.ids for p in prompts for _ in range(group)]
    completions = sampler(repeated, seeds)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    prompt_texts = [t for t in tokenizer.batch_decode([p.ids for p in prompts], skip_special_tokens=True) for _ in range(group)]
    totals, each = score(rewards, prompt_texts, texts, [e for e in examples for _ in range(group)])
    reward = torch.tensor(totals)
    advantages = ADVANTAGES[g.advantage.value](reward, group)
    spread = reward.view(-1, group).std(dim=1) > 0
    stats.setdefault("reward", []).extend(totals)
    for name, values in each.items():
        stats.setdefault(name, []).extend(values)
    stats.setdefault("length", []).extend(len(c) for c in completions)
    stats.setdefault("zero_std", []).extend((~spread).float().tolist())

    keep = spread.repeat_interleave(group) | (not g.filter_zero_std)
    owners = [i // group for i in range(len(completions))]
    batch = collate_responses([p.ids for p in prompts], completions, owners, tokenizer.pad_token_id)
    batch.loss_mask &= keep[:, None]
    batch = batch.to(device)
    old = _logprobs(policy, batch, cfg.rollout.temperature, autocast) if g.inner_updates > 1 else None
    ref = _logprobs(reference, batch, cfg.rollout.temperature, autocast) if reference is not None else None
    return Rollout(batch, advantages.to(device, non_blocking=True), old, ref, kept=int(keep.sum()))


def _logprobs(model, batch: PromptResponses, temperature: float, autocast) -> torch.Tensor:
    """(B, T-1) log-probabilities of batch's tokens at the sampling temperature, under the run's autocast:
    pi_old and the reference computed as the loss computes pi (under bf16, a float32 forward would
    differ from the same weights' by rounding, and the ratio and the KL would start away from 1 and 0)."""
    with autocast():
        logits = response_logits(model, batch)
    return token_logprobs(logits / temperature, batch.input_ids)

"""rlhf train-rm: a scalar reward model from pairwise or ranked preferences (InstructGPT step 2).

The model is `AutoModelForSequenceClassification` with one output, read at the last non-padding
token (the response's end token), started from `from_run`'s sft/final unless `model.path` is set;
with `model.lora.r > 0` LoRA adapters and the score head train, the rest is frozen.
The loss is Bradley-Terry, -log sigmoid(r_chosen - r_rejected - margin). A ranked prompt with K
responses contributes all K(K-1)/2 pairs, each response encoded once, and (as in InstructGPT) its
pairs share a weight of 1/C(K,2), so each prompt counts once; the step loss averages over prompts.
At the end the reward's mean and standard deviation over the training prompts' chosen responses
are recorded in the manifest (`reward_stats`) for PPO's reward normalisation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_cli.algos.rewards import bradley_terry_loss, reward_centering_penalty
from rlhf_cli.data.batches import StepBatches
from rlhf_cli.data.preferences import PreferenceGroup, to_preference_groups
from rlhf_cli.data.tokenize import encode_prompt_response, stop_token_ids
from rlhf_cli import distributed
from rlhf_cli.engine import make_engine
from rlhf_cli.errors import UserError
from rlhf_cli.metrics import MetricsLogger, Throughput
from rlhf_cli.models import apply_lora, count_parameters, default_device, load_reward_model, load_tokenizer
from rlhf_cli.models.shared_prompt import collate_responses, response_scores
from rlhf_cli.stages import (
    RunStart,
    begin_training,
    checkpoint_if_due,
    describe_model_source,
    due,
    finish,
    plan_steps,
    seed_everything,
    split_rows,
    start_model_path,
)

log = logging.getLogger("rlhf")


@dataclass(frozen=True)
class EncodedGroup:
    where: str
    prompt: tuple[int, ...]
    responses: tuple[tuple[int, ...], ...]
    pairs: tuple[tuple[int, int, float], ...]


def run(cfg: Any, start: RunStart, overrides: list[str]) -> dict[str, Any]:
    # 1. Model (sft/final of from_run unless model.path is set) and tokenizer.
    seed_everything(cfg.train.seed)
    cfg.model.path = start_model_path(cfg)
    tokenizer = load_tokenizer(cfg.model)
    # With LoRA the adapters train and so does the whole score head, which starts new (peft's modules_to_save).
    model = apply_lora(load_reward_model(cfg.model, tokenizer, seed=cfg.train.seed), cfg.model, task_type="SEQ_CLS")
    device = default_device()
    model.to(device)
    stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))

    # 2. Data: preference rows -> groups of responses with their pairs -> token ids.
    train_rows, eval_rows = split_rows(cfg.data)
    train_groups = _encode(tokenizer, to_preference_groups(train_rows, cfg.data.format, cfg.rm.use_margin), stop_ids, cfg.data, "data.train")
    eval_groups = (
        _encode(tokenizer, to_preference_groups(eval_rows, cfg.data.format, cfg.rm.use_margin), stop_ids, cfg.data, "data.eval")
        if eval_rows else []
    )[: cfg.eval.max_samples or None]
    batches = StepBatches(train_groups, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seed)
    total_steps = plan_steps(cfg.train, len(train_groups), batches.samples_per_step)

    # 3. Engine, and the state to resume from.
    engine = make_engine(model, cfg, total_steps)
    start_step = begin_training(cfg, start, model, engine, {"model": describe_model_source(cfg.model.path)}, overrides)
    n_pairs = sum(len(g.pairs) for g in train_groups)
    log.info(
        f"train-rm: {count_parameters(model) / 1e6:.2f}M parameters, {len(train_groups)} training prompts "
        f"({n_pairs} pairs), {len(eval_groups)} eval prompts, {total_steps} steps of {batches.samples_per_step} prompts -> {start.run.path}"
    )

    # 4. Train.
    metrics = MetricsLogger(start.run.path, cfg, total_steps, start_step)
    last: dict[str, Any] = {}
    try:
        model.train()
        throughput = Throughput()
        for step in range(start_step, total_steps):
            micro_batches = batches.micro_batches(step)
            prompts_in_step = distributed.total(sum(len(mb) for mb in micro_batches))
            lr = engine.lr
            totals = torch.zeros(4, device=device)  # loss, correct pairs, margin sum, pairs
            for groups in micro_batches:
                rewards = _rewards(model, groups, tokenizer.pad_token_id, device, engine)
                chosen, rejected, margins, weights = _pairs(groups, rewards, prompts_in_step, device)
                loss = bradley_terry_loss(chosen, rejected, margins, weights)
                if cfg.rm.center_coef:
                    loss = loss + cfg.rm.center_coef * reward_centering_penalty(chosen, rejected, weights)
                engine.backward(loss)
                gap = (chosen - rejected).detach()
                totals += torch.stack([loss.detach(), (gap > 0).sum(), gap.sum(), torch.full((), float(gap.numel()), device=gap.device)])
                throughput.add(sum(len(g.prompt) + len(r) for g in groups for r in g.responses))
            grad_norm = engine.step()
            done = step + 1
            metrics.advance(done)

            if done % cfg.train.log_every == 0 or done == total_steps:
                loss_sum, correct, gap_sum, pairs = distributed.total(totals).tolist()
                last = {"loss": loss_sum, "accuracy": correct / pairs, "margin": gap_sum / pairs, "lr": lr,
                        "grad_norm": grad_norm, "nonfinite_steps": engine.nonfinite.total,
                        "tokens_per_s": distributed.total(throughput.read())}
                metrics.log(done, last)
            if eval_groups and due(cfg.train.eval_every, done, total_steps):
                metrics.log(done, evaluate(model, eval_groups, tokenizer.pad_token_id, cfg.eval.batch_size, device, engine))
            checkpoint_if_due(cfg, start, done, total_steps, model, engine)

        # 5. Final evaluation, the reward statistics PPO normalises with, and the model.
        final_metrics = {k: last.get(k) for k in ("loss", "accuracy", "margin")} | {"steps": total_steps}
        if eval_groups:
            evaluation = evaluate(model, eval_groups, tokenizer.pad_token_id, cfg.eval.batch_size, device, engine)
            metrics.log(total_steps, evaluation)
            final_metrics.update(evaluation)
    finally:
        metrics.close()
    stats = chosen_reward_stats(model, train_groups[: cfg.rm.stats_samples], tokenizer.pad_token_id, cfg.eval.batch_size, device, engine)
    log.info(f"reward over {stats['samples']} chosen training responses: mean {stats['mean']:.4f}, std {stats['std']:.4f}")

    finish(cfg, start, model, tokenizer, final_metrics, reward_stats=stats)
    return final_metrics


def _encode(tokenizer, groups: list[PreferenceGroup], stop_ids: set[int], data_cfg: Any, name: str) -> list[EncodedGroup]:
    """Token ids of every group's prompt and responses; groups over data.max_length are cut, dropped or refused."""
    encoded, truncated, dropped = [], 0, []
    for group in groups:
        prompt: list[int] = []
        responses = []
        for response in group.responses:
            prompt, response_ids = encode_prompt_response(tokenizer, group.prompt, response, stop_ids, group.where)
            responses.append(tuple(response_ids))
        longest = len(prompt) + max(len(r) for r in responses)
        if longest > data_cfg.max_length:
            if data_cfg.truncation.value == "error":
                raise UserError(f"{group.where}: {longest} tokens, over data.max_length={data_cfg.max_length}")
            if data_cfg.truncation.value == "drop":
                dropped.append(group.where)
                continue
            truncated += 1
            responses = [r[: max(data_cfg.max_length - len(prompt), 0)] for r in responses]
            if any(responses[a] == responses[b] for a, b, _ in group.pairs):
                dropped.append(group.where)  # truncation left a pair's two responses identical
                continue
        encoded.append(EncodedGroup(group.where, tuple(prompt), tuple(responses), group.pairs))
    if truncated or dropped:
        log.warning(f"{name}: {truncated} of {len(groups)} prompts truncated to data.max_length={data_cfg.max_length}, {len(dropped)} dropped")
    if groups and not encoded:
        raise UserError(f"{name}: no prompt left after data.max_length={data_cfg.max_length}")
    return encoded


def _rewards(model, groups: list[EncodedGroup], pad_id: int, device: torch.device, engine) -> torch.Tensor:
    """(N,) rewards of every response of the groups, in order; each prompt runs once."""
    owners = [i for i, g in enumerate(groups) for _ in g.responses]
    batch = collate_responses([list(g.prompt) for g in groups], [list(r) for g in groups for r in g.responses], owners, pad_id)
    with engine.autocast():
        return response_scores(model, batch.to(device)).float()


def _pairs(groups: list[EncodedGroup], rewards: torch.Tensor, prompts_in_step: int, device: torch.device):
    """(chosen, rejected, margins, weights), each (P,), for every pair of the groups."""
    chosen_index, rejected_index, margins, weights = [], [], [], []
    offset = 0
    for group in groups:
        for better, worse, margin in group.pairs:
            chosen_index.append(offset + better)
            rejected_index.append(offset + worse)
            margins.append(margin)
            weights.append(1.0 / (len(group.pairs) * prompts_in_step))
        offset += len(group.responses)
    # Non-blocking: a copy from the host need not wait for the device's queued kernels.
    as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype).to(device, non_blocking=True)  # noqa: E731
    return (
        rewards[as_tensor(chosen_index, torch.long)],
        rewards[as_tensor(rejected_index, torch.long)],
        as_tensor(margins, torch.float32),
        as_tensor(weights, torch.float32),
    )


@torch.no_grad()
def evaluate(model, groups: list[EncodedGroup], pad_id: int, batch_size: int, device: torch.device, engine) -> dict[str, float]:
    """eval/loss, eval/accuracy (pairs whose chosen response scores higher) and eval/margin over the eval prompts."""
    model.eval()
    loss, correct, gap_sum, pairs = 0.0, 0, 0.0, 0
    for start in range(0, len(groups), batch_size):
        chunk = groups[start : start + batch_size]
        rewards = _rewards(model, chunk, pad_id, device, engine)
        chosen, rejected, margins, weights = _pairs(chunk, rewards, len(groups), device)
        loss += float(bradley_terry_loss(chosen, rejected, margins, weights))
        gap = chosen - rejected
        correct += int((gap > 0).sum())
        gap_sum += float(gap.sum())
        pairs += gap.numel()
    model.train()
    return {"eval/loss": loss, "eval/accuracy": correct / pairs, "eval/margin": gap_sum / pairs}


@torch.no_grad()
def chosen_reward_stats(model, groups: list[EncodedGroup], pad_id: int, batch_size: int, device: torch.device, engine) -> dict[str, float]:
    """Mean and standard deviation of the reward of each prompt's best response."""
    model.eval()
    best = [EncodedGroup(g.where, g.prompt, (g.responses[g.pairs[0][0]],), ()) for g in groups]
    rewards = torch.cat([_rewards(model, best[i : i + batch_size], pad_id, device, engine) for i in range(0, len(best), batch_size)])
    return {"mean": float(rewards.mean()), "std": float(rewards.std()) if len(rewards) > 1 else 0.0, "samples": len(rewards)}

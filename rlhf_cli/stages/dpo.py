"""rlhf dpo: direct preference optimisation against a frozen reference (Rafailov et al. 2023).

The policy and the reference start from `from_run`'s sft/final unless `model.path` / `ref.path`
say otherwise. Chosen and rejected responses go through the policy in one forward; their
log-probabilities are summed over response tokens only (the prompt is masked), or averaged per
token for the length-normalised variants (IPO, SimPO). `dpo.precompute_ref=true` scores every pair
with the reference once, caches the log-probabilities in the run directory and frees the reference,
so no second model is held while training. `dpo.sft_weight` adds an NLL term on the chosen
responses (RPO, Pang et al. 2024), which keeps the likelihood of good answers from falling while
the margin grows: without it DPO can raise the margin and still wreck generation.

Departures from the paper: pairs of ranked rows are all used, each as its own pair.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from rlhf_cli.algos.dpo import VARIANTS, logratio_margin
from rlhf_cli.algos.losses import sequence_logprobs
from rlhf_cli.data.batches import StepBatches
from rlhf_cli.data.preferences import to_preference_groups
from rlhf_cli.data.tokenize import encode_prompt_response, stop_token_ids
from rlhf_cli import distributed
from rlhf_cli.engine import make_engine
from rlhf_cli.engine.zero import frozen_for_inference
from rlhf_cli.errors import UserError
from rlhf_cli.evaluation import answer_accuracy, load_answer_examples
from rlhf_cli.metrics import MetricsLogger, Throughput
from rlhf_cli.models import (
    AdapterDisabled,
    apply_lora,
    count_parameters,
    default_device,
    load_causal_lm,
    load_reference,
    load_tokenizer,
)
from rlhf_cli.models.shared_prompt import PromptResponses, collate_responses, response_logits
from rlhf_cli.runs import REFERENCE_CACHE
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
class Pair:
    index: int  # position in its split, the key of the cached reference log-probabilities
    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    where: str


@dataclass
class Scored:
    """Log-probabilities of a batch of pairs, each (B,): summed, and aggregated as the loss wants."""

    chosen_sum: torch.Tensor
    rejected_sum: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def run(cfg: Any, start: RunStart, overrides: list[str]) -> dict[str, Any]:
    # 1. Policy, reference and tokenizer.
    seed_everything(cfg.train.seed)
    cfg.model.path = start_model_path(cfg)
    variant = VARIANTS[cfg.dpo.loss.value]
    tokenizer = load_tokenizer(cfg.model)
    policy = apply_lora(load_causal_lm(cfg.model, tokenizer, seed=cfg.train.seed), cfg.model)
    device = default_device()
    policy.to(device)
    stop_ids = stop_token_ids(tokenizer, policy.generation_config)
    reference_path = cfg.ref.path or cfg.model.path
    reference = None
    if variant.uses_reference:
        reference = frozen_for_inference(load_reference(cfg.model, reference_path, policy, tokenizer, cfg.train.seed, device), cfg)

    # 2. Data: preference rows -> pairs of token ids; rows with answers for generation accuracy.
    train_rows, eval_rows = split_rows(cfg.data)
    train_pairs = _encode(tokenizer, train_rows, cfg, stop_ids, "data.train")
    eval_pairs = _encode(tokenizer, eval_rows, cfg, stop_ids, "data.eval")[: cfg.eval.max_samples or None] if eval_rows else []
    answer_examples = load_answer_examples(cfg.eval)
    batches = StepBatches(train_pairs, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seed)
    total_steps = plan_steps(cfg.train, len(train_pairs), batches.samples_per_step)

    # 3. Engine, the state to resume from, and the cached reference log-probabilities.
    engine = make_engine(policy, cfg, total_steps)
    parents = {"model": describe_model_source(cfg.model.path)}
    if variant.uses_reference:
        parents["reference"] = describe_model_source(reference_path)
    start_step = begin_training(cfg, start, policy, engine, parents, overrides)
    cache: Optional[dict[str, torch.Tensor]] = None
    if reference is not None and cfg.dpo.precompute_ref:
        cache = _reference_cache(start.run.path, reference, {"train": train_pairs, "eval": eval_pairs},
                                 tokenizer.pad_token_id, cfg.eval.batch_size, device, engine.autocast)
        reference = None  # no second model in memory while training
    log.info(
        f"dpo ({cfg.dpo.loss.value}, beta {cfg.dpo.beta}): {count_parameters(policy) / 1e6:.2f}M parameters, "
        f"{len(train_pairs)} training pairs, {len(eval_pairs)} eval pairs, {total_steps} steps of "
        f"{batches.samples_per_step} pairs, reference {'none' if not variant.uses_reference else 'cached' if cache else 'the policy without adapters' if isinstance(reference, AdapterDisabled) else 'live'}"
        f" -> {start.run.path}"
    )

    def score_reference(pairs: list[Pair], batch: PromptResponses, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reference log-probabilities of chosen and rejected, (B,) each, of `pairs` (collated in
        `batch`, whose plan the policy's forward made); zeros without a reference."""
        if not variant.uses_reference:
            zeros = torch.zeros(len(pairs), device=device)
            return zeros, zeros
        if cache is not None:
            index = torch.tensor([p.index for p in pairs])
            return (cache[f"{split}_chosen"][index].to(device, non_blocking=True),
                    cache[f"{split}_rejected"][index].to(device, non_blocking=True))
        with torch.no_grad(), engine.autocast():
            scored = _score(reference, batch, length_normalised=False)
        return scored.chosen_sum, scored.rejected_sum

    def evaluate() -> dict[str, float]:
        policy.eval()
        totals = torch.zeros(4)  # loss, implicit-reward wins, policy prefers chosen, pairs
        with torch.no_grad():
            for i in range(0, len(eval_pairs), cfg.eval.batch_size):
                chunk = eval_pairs[i : i + cfg.eval.batch_size]
                batch = _collated(chunk, tokenizer.pad_token_id, device)
                with engine.autocast():
                    scored = _score(policy, batch, variant.length_normalised)
                ref_chosen, ref_rejected = _aggregate(score_reference(chunk, batch, "eval"), scored, variant.length_normalised)
                h = logratio_margin(scored.chosen, scored.rejected, ref_chosen, ref_rejected)
                losses = variant.loss(h, cfg.dpo.beta, cfg.dpo.label_smoothing, cfg.dpo.simpo_gamma)
                totals += torch.tensor([float(losses.sum()), float((h > 0).sum()),
                                        float((scored.chosen_sum > scored.rejected_sum).sum()), len(chunk)])
        result = {}
        if eval_pairs:
            loss_sum, wins, prefers, pairs = totals.tolist()
            result = {"eval/loss": loss_sum / pairs, "eval/rewards/accuracy": wins / pairs, "eval/preference_accuracy": prefers / pairs}
        if answer_examples:
            result["eval/accuracy"] = answer_accuracy(policy, tokenizer, answer_examples, stop_ids,
                                                      max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
        policy.train()
        return result

    # 4. Train.
    metrics = MetricsLogger(start.run.path, cfg, total_steps, start_step)
    last: dict[str, Any] = {}
    try:
        if start_step == 0 and (eval_pairs or answer_examples):
            metrics.log(0, evaluate())  # the starting point every later figure is compared with
        policy.train()
        throughput = Throughput()
        for step in range(start_step, total_steps):
            micro_batches = batches.micro_batches(step)
            pairs_in_step = distributed.total(sum(len(mb) for mb in micro_batches))
            chosen_tokens_in_step = distributed.total(sum(len(p.chosen) for mb in micro_batches for p in mb))
            lr = engine.lr
            sums = torch.zeros(8, device=device)
            for pairs in micro_batches:
                batch = _collated(pairs, tokenizer.pad_token_id, device)
                with engine.autocast():
                    scored = _score(policy, batch, variant.length_normalised)
                ref_chosen, ref_rejected = _aggregate(score_reference(pairs, batch, "train"), scored, variant.length_normalised)
                h = logratio_margin(scored.chosen, scored.rejected, ref_chosen, ref_rejected)
                losses = variant.loss(h, cfg.dpo.beta, cfg.dpo.label_smoothing, cfg.dpo.simpo_gamma)
                loss = losses.sum() / pairs_in_step
                nll = -scored.chosen_sum.sum() / chosen_tokens_in_step
                if cfg.dpo.sft_weight:
                    loss = loss + cfg.dpo.sft_weight * nll
                engine.backward(loss)
                reward_chosen = cfg.dpo.beta * (scored.chosen - ref_chosen).detach()
                reward_rejected = cfg.dpo.beta * (scored.rejected - ref_rejected).detach()
                sums += torch.stack([
                    loss.detach(), nll.detach(), reward_chosen.sum(), reward_rejected.sum(),
                    (reward_chosen > reward_rejected).sum(), scored.chosen_sum.detach().sum(),
                    scored.rejected_sum.detach().sum(), torch.full((), float(len(pairs)), device=device),
                ])
                throughput.add(sum(len(p.prompt) * 2 + len(p.chosen) + len(p.rejected) for p in pairs))
            grad_norm = engine.step()
            done = step + 1
            metrics.advance(done)

            if done % cfg.train.log_every == 0 or done == total_steps:
                loss_sum, nll_sum, chosen, rejected, wins, logp_chosen, logp_rejected, n = distributed.total(sums).tolist()
                last = {
                    "loss": loss_sum, "nll": nll_sum, "rewards/chosen": chosen / n, "rewards/rejected": rejected / n,
                    "rewards/accuracy": wins / n, "rewards/margin": (chosen - rejected) / n,
                    "logps/chosen": logp_chosen / n, "logps/rejected": logp_rejected / n,
                    "lr": lr, "grad_norm": grad_norm, "nonfinite_steps": engine.nonfinite.total,
                    "tokens_per_s": distributed.total(throughput.read()),
                }
                metrics.log(done, last)
            if due(cfg.train.eval_every, done, total_steps) and (eval_pairs or answer_examples):
                metrics.log(done, evaluate())
            checkpoint_if_due(cfg, start, done, total_steps, policy, engine)

        # 5. Final evaluation and the model.
        final_metrics = {k: last.get(k) for k in ("loss", "rewards/accuracy", "rewards/margin")} | {"steps": total_steps}
        if eval_pairs or answer_examples:
            evaluation = evaluate()
            metrics.log(total_steps, evaluation)
            final_metrics.update(evaluation)
    finally:
        metrics.close()
    finish(cfg, start, policy, tokenizer, final_metrics)
    return final_metrics


def _encode(tokenizer, rows, cfg: Any, stop_ids: set[int], name: str) -> list[Pair]:
    """Every (better, worse) pair of every preference group as prompt, chosen and rejected token ids."""
    pairs, over = [], []
    for group in to_preference_groups(rows, cfg.data.format, use_margin=False):
        encoded = [encode_prompt_response(tokenizer, group.prompt, r, stop_ids, group.where) for r in group.responses]
        for better, worse, _ in group.pairs:
            prompt, chosen = encoded[better]
            rejected = encoded[worse][1]
            if len(prompt) + max(len(chosen), len(rejected)) > cfg.data.max_length:
                if cfg.data.truncation.value == "error":
                    raise UserError(f"{group.where}: {len(prompt) + max(len(chosen), len(rejected))} tokens, over data.max_length={cfg.data.max_length}")
                over.append(group.where)  # a cut response would be scored on text it does not end with
                continue
            pairs.append(Pair(len(pairs), tuple(prompt), tuple(chosen), tuple(rejected), group.where))
    if over:
        log.warning(f"{name}: {len(over)} pairs longer than data.max_length={cfg.data.max_length} dropped (first: {over[0]})")
    if rows and not pairs:
        raise UserError(f"{name}: no pair fits data.max_length={cfg.data.max_length}")
    return pairs


def _collated(pairs: list[Pair], pad_id: int, device: torch.device) -> PromptResponses:
    """Every pair's prompt once, then the chosen responses, then the rejected ones, on `device`."""
    n = len(pairs)
    return collate_responses([list(p.prompt) for p in pairs], [list(p.chosen) for p in pairs] + [list(p.rejected) for p in pairs],
                             list(range(n)) * 2, pad_id).to(device)


def _score(model, batch: PromptResponses, length_normalised: bool) -> Scored:
    """The chosen and the rejected responses of every pair of a `_collated` batch, in one forward (each
    prompt once when shared)."""
    n = batch.input_ids.size(0) // 2
    sums, counts = sequence_logprobs(response_logits(model, batch), batch.input_ids, batch.loss_mask)
    aggregated = sums / counts if length_normalised else sums
    return Scored(sums[:n], sums[n:], aggregated[:n], aggregated[n:], counts[:n], counts[n:])


def _aggregate(reference_sums: tuple[torch.Tensor, torch.Tensor], policy: Scored, length_normalised: bool):
    """The reference's log-probabilities in the loss's aggregation (per-token means for IPO)."""
    chosen, rejected = reference_sums
    if not length_normalised:
        return chosen, rejected
    return chosen / policy.chosen_tokens, rejected / policy.rejected_tokens


@torch.no_grad()
def _reference_cache(run_path: Path, reference, splits: dict[str, list[Pair]], pad_id: int, batch_size: int,
                     device: torch.device, autocast) -> dict[str, torch.Tensor]:
    """Summed reference log-probabilities of every pair, computed once and kept in the run directory, under
    the autocast the policy is scored in (a float32 reference would differ from the same weights' bf16
    log-probabilities by rounding, and the margins would start away from 0)."""
    path = run_path / REFERENCE_CACHE
    distributed.barrier()  # every process decides on the same file: under ZeRO-3 they score together
    sizes = {f"{split}_{side}": len(pairs) for split, pairs in splits.items() for side in ("chosen", "rejected")}
    if path.is_file():
        cache = load_file(str(path))
        if {k: len(v) for k, v in cache.items()} == sizes:
            log.info(f"reference log-probabilities from {path}")
            return cache
    cache = {}
    for split, pairs in splits.items():
        chosen, rejected = [], []
        for i in range(0, len(pairs), batch_size):
            with autocast():
                scored = _score(reference, _collated(pairs[i : i + batch_size], pad_id, device), length_normalised=False)
            chosen.append(scored.chosen_sum.cpu())
            rejected.append(scored.rejected_sum.cpu())
        cache[f"{split}_chosen"] = torch.cat(chosen) if chosen else torch.zeros(0)
        cache[f"{split}_rejected"] = torch.cat(rejected) if rejected else torch.zeros(0)
    if distributed.is_main():
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(cache, str(tmp))
        os.replace(tmp, path)
    log.info(f"reference log-probabilities of {sum(len(p) for p in splits.values())} pairs cached in {path}")
    return cache

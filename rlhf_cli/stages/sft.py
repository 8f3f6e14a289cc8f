"""rlhf sft: supervised fine-tuning.

The loss is the mean negative log-likelihood per labelled token of the optimizer step: labels are
the assistant turns of conversations (every one of them, end-of-turn token included) or the
completion of plain prompt/completion rows, plus EOS. The denominator is counted over the whole
step, so gradient accumulation gives the same update as one large batch.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from rlhf_cli.algos.losses import count_label_tokens, label_nll_sum, labels, scoring_positions, sft_loss
from rlhf_cli.data.batches import StepBatches, collate
from rlhf_cli.data.formats import SFTExample, to_sft_examples
from rlhf_cli.data.tokenize import (
    TokenizedSample,
    TruncationReport,
    apply_max_length,
    pack,
    stop_token_ids,
    tokenize_sft,
)
from rlhf_cli import distributed
from rlhf_cli.engine import make_engine
from rlhf_cli.evaluation import answer_accuracy
from rlhf_cli.errors import UserError
from rlhf_cli.metrics import MetricsLogger, Throughput
from rlhf_cli.models import (KeptForward, apply_lora, count_parameters, default_device, forward_inputs, kept_logits, load_causal_lm,
                             load_tokenizer, plan_kept)
from rlhf_cli.models.padding_free import has_segment_attention
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
)

log = logging.getLogger("rlhf")


def run(cfg: Any, start: RunStart, overrides: list[str]) -> dict[str, Any]:
    # 1. Model and tokenizer.
    seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = apply_lora(load_causal_lm(cfg.model, tokenizer, seed=cfg.train.seed), cfg.model)
    padding_free = has_segment_attention(model)
    device = default_device()
    model.to(device)
    stop_ids = stop_token_ids(tokenizer, model.generation_config)

    # 2. Data: rows -> examples -> token ids with label masks -> (packed) samples.
    train_rows, eval_rows = split_rows(cfg.data)
    train_examples = to_sft_examples(train_rows, cfg.data.format)
    eval_examples = to_sft_examples(eval_rows, cfg.data.format) if eval_rows else []
    train_samples = _tokenize(tokenizer, train_examples, stop_ids, cfg.data, "data.train")
    eval_samples = _tokenize(tokenizer, eval_examples[: cfg.eval.max_samples or None], stop_ids, cfg.data, "data.eval")
    if cfg.data.packing:
        train_samples = pack(train_samples, cfg.data.max_length)
    batches = StepBatches(train_samples, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seed)
    total_steps = plan_steps(cfg.train, len(train_samples), batches.samples_per_step)

    # 3. Engine, and the state to resume from.
    engine = make_engine(model, cfg, total_steps)
    start_step = begin_training(cfg, start, model, engine, {"model": describe_model_source(cfg.model.path)}, overrides)
    log.info(
        f"sft: {count_parameters(model) / 1e6:.2f}M parameters, {len(train_samples)} training samples, "
        f"{len(eval_samples)} eval samples, {total_steps} steps of {batches.samples_per_step} samples -> {start.run.path}"
    )

    # 4. Train.
    metrics = MetricsLogger(start.run.path, cfg, total_steps, start_step)
    last: dict[str, Any] = {}
    try:
        model.train()
        throughput = Throughput()
        for step in range(start_step, total_steps):
            micro_batches = [collate(mb, tokenizer.pad_token_id, padding_free) for mb in batches.micro_batches(step)]
            num_tokens = distributed.total(sum(count_label_tokens(b["loss_mask"]) for b in micro_batches))
            lr = engine.lr
            step_loss = torch.zeros((), device=device)
            for batch in micro_batches:
                plan, label_ids = _planned(batch, device)
                with engine.autocast():
                    logits = kept_logits(model, plan)
                loss = sft_loss(logits, label_ids, num_tokens)
                engine.backward(loss)
                step_loss += loss.detach()
                throughput.add(int(batch["input_ids"].numel()))
            grad_norm = engine.step()
            done = step + 1
            metrics.advance(done)

            if done % cfg.train.log_every == 0 or done == total_steps:
                last = {"loss": distributed.total(step_loss).item(), "lr": lr, "grad_norm": grad_norm,
                        "nonfinite_steps": engine.nonfinite.total, "tokens_per_s": distributed.total(throughput.read()),
                        "num_tokens": num_tokens}
                metrics.log(done, last)
            if eval_samples and due(cfg.train.eval_every, done, total_steps):
                metrics.log(done, evaluate(model, tokenizer, eval_samples, eval_examples, stop_ids, cfg.eval, device, padding_free))
            checkpoint_if_due(cfg, start, done, total_steps, model, engine)

        # 5. Final evaluation and the model the next stage loads.
        final_metrics = {"loss": last.get("loss"), "steps": total_steps}
        if eval_samples:
            evaluation = evaluate(model, tokenizer, eval_samples, eval_examples, stop_ids, cfg.eval, device, padding_free)
            metrics.log(total_steps, evaluation)
            final_metrics.update(evaluation)
    finally:
        metrics.close()
    finish(cfg, start, model, tokenizer, final_metrics)
    return final_metrics


def _tokenize(tokenizer, examples: list[SFTExample], stop_ids: set[int], data_cfg: Any, name: str) -> list[TokenizedSample]:
    samples = tokenize_sft(tokenizer, examples, stop_ids)
    report = TruncationReport()
    kept = apply_max_length(samples, data_cfg.max_length, data_cfg.truncation, report)
    summary = report.summary(name, data_cfg.max_length)
    if summary:
        log.warning(summary)
    if examples and not kept:
        raise UserError(f"{name}: no sample left after truncation to data.max_length={data_cfg.max_length}")
    return kept


def _planned(batch: dict, device: torch.device) -> tuple[KeptForward, torch.Tensor]:
    """The forward that reads a collated batch's labelled positions, planned on the host, and its
    labels, both on `device`."""
    plan = plan_kept(forward_inputs(batch), scoring_positions(batch["loss_mask"])).to(device)
    return plan, labels(batch["input_ids"], batch["loss_mask"]).to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model, tokenizer, samples: list[TokenizedSample], examples: list[SFTExample],
             stop_ids: set[int], eval_cfg: Any, device: torch.device, padding_free: bool = False) -> dict[str, float]:
    """eval/loss: mean NLL per labelled token; eval/accuracy: greedy exact match on rows with an answer."""
    model.eval()
    nll, tokens = 0.0, 0
    for start in range(0, len(samples), eval_cfg.batch_size):
        batch = collate(samples[start : start + eval_cfg.batch_size], tokenizer.pad_token_id, padding_free)
        plan, label_ids = _planned(batch, device)
        nll += float(label_nll_sum(kept_logits(model, plan), label_ids))
        tokens += count_label_tokens(batch["loss_mask"])
    result = {"eval/loss": nll / max(tokens, 1)}
    answered = [e for e in examples if e.answer is not None][: eval_cfg.generate]
    if answered:
        result["eval/accuracy"] = answer_accuracy(
            model, tokenizer, answered, stop_ids, max_new_tokens=eval_cfg.max_new_tokens, batch_size=eval_cfg.batch_size
        )
    model.train()
    return result

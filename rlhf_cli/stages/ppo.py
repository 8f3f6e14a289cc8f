"""rlhf ppo: PPO against a learned reward model, InstructGPT's step 3 (Ouyang et al. 2022).

Four models: the actor (from sft/final), the critic (from rm/final), and the frozen reference
(sft/final) and reward model (rm/final). Each step samples one response per prompt, scores it with
the reward model (normalised by the reward model's own statistics, clipped, and penalised when it
never reached EOS), and builds per-token rewards: -kl_coef * (log pi_old - log ref) at every response
token plus the score at the last. GAE turns them into advantages (whitened over the batch) and
returns; then `ppo.epochs` passes over shuffled mini-batches, each an optimizer step of the actor
(clipped surrogate, entropy bonus) and the critic (clipped value loss).

Values and log-probabilities live in "response space": (B, R) tensors whose row b holds the
response tokens of sequence b first. The models read a step's prompts and responses as the other
stages do (rlhf_cli/models/shared_prompt.py): one padding-free row, the LM head and the critic's head
only at the positions that predict a response token, where the critic's value is read too (the value
of the state before the token).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from rlhf_cli.algos.losses import token_logprobs
from rlhf_cli.algos.policy import (
    adaptive_kl_coef,
    clipped_surrogate,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_k2,
    masked_mean,
    masked_whiten,
    token_rewards,
    update_moments,
)
from rlhf_cli.data.batches import StepBatches
from rlhf_cli.data.formats import PromptExample
from rlhf_cli.data.sources import load_rows
from rlhf_cli.data.tokenize import EncodedPrompt, encode_prompts, stop_token_ids
from rlhf_cli import distributed
from rlhf_cli.engine import NonFiniteSteps, make_engine
from rlhf_cli.engine.zero import frozen_for_inference
from rlhf_cli.errors import UserError
from rlhf_cli.evaluation import exact_match_rate, greedy_texts, load_answer_examples
from rlhf_cli.metrics import MetricsLogger, Throughput
from rlhf_cli.models import (
    apply_lora,
    count_parameters,
    default_device,
    load_causal_lm,
    load_reference,
    load_reward_model,
    load_tokenizer,
    score_head,
)
from rlhf_cli.models.shared_prompt import PromptResponses, collate_responses, response_logits, response_outputs, response_values
from rlhf_cli.rewards import RewardModel
from rlhf_cli.rollout import make_sampler, row_seeds
from rlhf_cli.runs import RunDir
from rlhf_cli.runs.chain import chained_final
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
_CONTROLLER = "ppo_controller.json"  # kl_coef and reward moments, beside DeepSpeed checkpoints


class ActorCritic(torch.nn.Module):
    """The trained models under one module, so that a checkpoint holds them all: the actor and either a
    separate critic model or a linear value head on the actor's last hidden state."""

    def __init__(self, actor: torch.nn.Module, critic: torch.nn.Module | None = None):
        super().__init__()
        self.actor = actor
        self.critic = critic
        self.value_head = None
        if critic is None:
            self.value_head = torch.nn.Linear(actor.config.hidden_size, 1)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)

    def logits_and_values(self, batch: PromptResponses, train_actor: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1 + R, V) actor logits in `batch`'s layout (`response_logits`) and (B, R) the value before
        each response token. With `train_actor` off the actor runs without a graph, so the value loss
        reaches the critic (or the value head) only."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and train_actor):
            logits, hidden = response_outputs(self.actor, batch, hidden_states=self.critic is None)
        if self.critic is not None:
            return logits, response_values(self.critic, batch)
        return logits, self.value_head(hidden[:, :-1]).squeeze(-1).float()


class ActorCriticEngine:
    """The optimizers (the actor's, and a separate critic's), the KL coefficient the adaptive controller
    moves and the running reward moments: the training state a checkpoint must restore beyond the weights.
    Under DeepSpeed each engine saves its own checkpoint and the rest goes in a small JSON beside them."""

    def __init__(self, actor: Any, critic: Any, kl_coef: float):
        self.actor, self.critic, self.kl_coef = actor, critic, kl_coef
        self.reward_moments: tuple[int, float, float] = (0, 0.0, 0.0)  # count, mean, m2 of raw scores
        self.owns_weights = actor.owns_weights

    @property
    def nonfinite(self) -> NonFiniteSteps:
        return NonFiniteSteps.combined(*(e.nonfinite for e in (self.actor, self.critic) if e is not None))

    def save(self, directory: Path) -> None:
        for engine in (self.actor, self.critic):
            if engine is not None:
                engine.save(directory)
        if distributed.is_main():
            (directory / _CONTROLLER).write_text(json.dumps(self._controller_state()), encoding="utf-8")

    def load(self, directory: Path) -> None:
        for engine in (self.actor, self.critic):
            if engine is not None:
                engine.load(directory)
        self._load_controller_state(json.loads((directory / _CONTROLLER).read_text(encoding="utf-8")))

    def _controller_state(self) -> dict[str, Any]:
        return {"kl_coef": self.kl_coef, "reward_moments": list(self.reward_moments)}

    def _load_controller_state(self, state: dict[str, Any]) -> None:
        self.kl_coef = state["kl_coef"]
        count, mean, m2 = state["reward_moments"]
        self.reward_moments = (int(count), float(mean), float(m2))

    def state_dict(self) -> dict[str, Any]:
        state = {"actor": self.actor.state_dict(), **self._controller_state()}
        return state | ({"critic": self.critic.state_dict()} if self.critic is not None else {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])
        self._load_controller_state(state)


@dataclasses.dataclass
class Rollouts:
    """One step's sampled responses, scored, with everything the updates need (response space)."""

    batch: PromptResponses  # each prompt, then its response
    mask: torch.Tensor  # (B, R) 1.0 on response tokens
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def rows(self, selected: torch.Tensor) -> "Rollouts":
        return Rollouts(self.batch.rows(selected),
                        *(t[selected] for t in (self.mask, self.old_logprobs, self.old_values, self.advantages, self.returns)))


def run(cfg: Any, start: RunStart, overrides: list[str]) -> dict[str, Any]:
    p = cfg.ppo
    # 1. The four models: actor and reference from sft/final, reward model and critic from rm/final.
    seed_everything(cfg.train.seed)
    cfg.model.path = start_model_path(cfg)
    reward_path = cfg.reward.path or chained_final(cfg.from_run, "train-rm", "reward.path")
    separate_critic = cfg.critic.kind.value == "separate"
    critic_path = (cfg.critic.path or reward_path) if separate_critic else None
    reference_path = cfg.ref.path or cfg.model.path
    device = default_device()
    tokenizer = load_tokenizer(cfg.model)
    actor = apply_lora(load_causal_lm(cfg.model, tokenizer, seed=cfg.train.seed), cfg.model).to(device)
    reference = frozen_for_inference(load_reference(cfg.model, reference_path, actor, tokenizer, cfg.train.seed, device), cfg)
    models = ActorCritic(actor, _load_critic(cfg, critic_path, tokenizer) if separate_critic else None).to(device)
    score = RewardModel(cfg.model, reward_path, device)
    score.model = frozen_for_inference(score.model, cfg)
    frozen = [m for m in (reference, score.model) if isinstance(m, torch.nn.Module)]  # a LoRA reference is the actor
    if p.offload_frozen:
        for model in frozen:
            model.to("cpu")

    def frozen_on_device():
        return _on_device(frozen, device) if p.offload_frozen else contextlib.nullcontext()

    manifest_stats = _reward_stats(reward_path) if p.normalize_reward else None
    stop_ids = stop_token_ids(tokenizer, actor.generation_config)
    sampler = make_sampler(cfg.rollout, actor, tokenizer.pad_token_id, stop_ids)

    # 2. Data: prompts; rows with answers for eval accuracy.
    prompts = encode_prompts(tokenizer, load_rows(cfg.data.train, subset=cfg.data.subset, split=cfg.data.train_split),
                             cfg.data, cfg.rollout.max_new_tokens)
    answer_examples = load_answer_examples(cfg.eval)
    batches = StepBatches(prompts, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seed)
    total_steps = plan_steps(cfg.train, len(prompts), batches.samples_per_step)

    # 3. Engines (one optimizer step per mini-batch and epoch) and the state to resume from.
    updates = total_steps * p.epochs * p.num_mini_batches
    if separate_critic:
        critic_train = dataclasses.replace(cfg.train, lr=cfg.critic.lr, grad_accum=1)
        engine = ActorCriticEngine(make_engine(actor, cfg, updates, dataclasses.replace(cfg.train, grad_accum=1), name="actor"),
                                   make_engine(models.critic, cfg, updates, critic_train, name="critic"), p.kl_coef)
    else:
        engine = ActorCriticEngine(make_engine(models, cfg, updates, dataclasses.replace(cfg.train, grad_accum=1)), None, p.kl_coef)
    parents = {"model": describe_model_source(cfg.model.path), "reference": describe_model_source(reference_path),
               "reward": describe_model_source(reward_path)}
    if separate_critic:
        parents["critic"] = describe_model_source(critic_path)
    start_step = begin_training(cfg, start, models, engine, parents, overrides)
    critic_size = f"critic {count_parameters(models.critic) / 1e6:.2f}M" if separate_critic else "value head"
    log.info(
        f"ppo: actor {count_parameters(actor) / 1e6:.2f}M parameters, {critic_size}, "
        f"{len(prompts)} prompts, {total_steps} steps of {batches.samples_per_step} responses, {p.epochs} epochs x "
        f"{p.num_mini_batches} mini-batches, kl_coef {p.kl_coef}{f' (target {p.kl_target})' if p.kl_target else ''}, "
        f"reward model {reward_path} -> {start.run.path}"
    )
    def normalise(raw: torch.Tensor) -> torch.Tensor:
        """Scores over the reward model's manifest statistics, or over running ones when it has none."""
        if not p.normalize_reward:
            return raw
        if manifest_stats:
            mean, std = manifest_stats["mean"], manifest_stats["std"]
        else:
            engine.reward_moments = update_moments(*engine.reward_moments, torch.tensor(distributed.gather(raw.tolist())))
            count, mean, m2 = engine.reward_moments
            std = math.sqrt(m2 / (count - 1)) if count > 1 else 1.0
        return (raw - mean) / max(std, 1e-6)

    eval_prompts = [PromptExample(e.where, e.prompt_messages if e.messages is not None else e.prompt, e.answer, {})
                    for e in answer_examples]

    def evaluate() -> dict[str, float]:
        texts = greedy_texts(actor, tokenizer, answer_examples, stop_ids, max_new_tokens=cfg.eval.max_new_tokens,
                             batch_size=cfg.eval.batch_size)
        with frozen_on_device():
            scores = score([""] * len(texts), texts, eval_prompts)
        return {"eval/accuracy": exact_match_rate(texts, answer_examples), "eval/reward": sum(scores) / len(scores)}

    # 4. Train.
    metrics = MetricsLogger(start.run.path, cfg, total_steps, start_step)
    window: dict[str, list[float]] = {}  # since the last log line
    final_metrics: dict[str, Any] = {"steps": total_steps}
    try:
        if start_step == 0 and answer_examples:
            metrics.log(0, evaluate())
        throughput = Throughput()
        for step in range(start_step, total_steps):
            step_prompts = [prompt for micro in batches.micro_batches(step) for prompt in micro]
            with frozen_on_device():
                rollouts, stats = _rollout(step_prompts, sampler, score, normalise, models, reference, tokenizer,
                                           stop_ids, cfg, engine.kl_coef, device, engine.actor.autocast,
                                           seeds=row_seeds(cfg.train.seed, step, batches.first_position(0), len(step_prompts)))
            throughput.add(rollouts.batch.num_tokens)
            lr = engine.actor.lr
            train_actor = step >= p.critic_warmup_steps
            stats = {name: distributed.mean(value) for name, value in stats.items()}  # equal shares of the step's prompts
            stats.update(_update(rollouts, models, engine, cfg, train_actor, seed=cfg.train.seed * 7_919 + step))
            if p.kl_target:
                engine.kl_coef = adaptive_kl_coef(engine.kl_coef, stats["kl"], p.kl_target, p.kl_horizon, batches.samples_per_step)
            for name, value in stats.items():
                window.setdefault(name, []).append(value)
            done = step + 1
            metrics.advance(done)

            if done % cfg.train.log_every == 0 or done == total_steps:
                last = {name: sum(values) / len(values) for name, values in window.items()}
                final_metrics.update({k: last[k] for k in ("reward/mean", "kl", "response_length")})
                metrics.log(done, last | {"kl_coef": engine.kl_coef, "lr": lr, "tokens_per_s": distributed.total(throughput.read()),
                                         "nonfinite_steps": engine.nonfinite.total})
                window = {}
            if answer_examples and due(cfg.train.eval_every, done, total_steps):
                metrics.log(done, evaluate())
            checkpoint_if_due(cfg, start, done, total_steps, models, engine)

        # 5. Final evaluation and the actor.
        if answer_examples:
            evaluation = evaluate()
            metrics.log(total_steps, evaluation)
            final_metrics.update(evaluation)
    finally:
        metrics.close()
    finish(cfg, start, actor, tokenizer, final_metrics)
    return final_metrics


@contextlib.contextmanager
def _on_device(modules: list[torch.nn.Module], device: torch.device):
    """Modules on the device for the duration, back in CPU memory after."""
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module in modules:
            module.to("cpu")


def _load_critic(cfg: Any, path: str, tokenizer) -> torch.nn.Module:
    """The critic reads the actor's tokens, so it must share the actor's tokenizer (the reward model
    need not: it is given text)."""
    critic_cfg = dataclasses.replace(cfg.model, path=path)
    if load_tokenizer(critic_cfg).get_vocab() != tokenizer.get_vocab():
        raise UserError(
            f"critic.path: {path} has another tokenizer than the policy ({cfg.model.path}); the critic scores the "
            "policy's tokens, so start it from a model with the policy's tokenizer (e.g. an rm trained from this sft)"
        )
    critic = load_reward_model(critic_cfg, tokenizer, seed=cfg.train.seed)
    score_head(critic, "critic")
    return critic


def _reward_stats(reward_path: str) -> dict[str, float] | None:
    manifest = RunDir(Path(reward_path).parent).read_manifest() or {}
    stats = manifest.get("reward_stats")
    if not stats:
        log.warning(f"{reward_path}: no reward_stats in a train-rm manifest beside it; scores are normalised with running statistics")
    return stats


@torch.no_grad()
def _rollout(prompts: list[EncodedPrompt], sampler, score, normalise, models: ActorCritic, reference, tokenizer,
             stop_ids: set[int], cfg: Any, kl_coef: float, device: torch.device, autocast,
             seeds: list[int]) -> tuple[Rollouts, dict[str, float]]:
    """Sample a response per prompt, score it, and compute old log-probabilities, values, advantages and returns,
    under the autocast the updates run in (a float32 pi_old would differ from their bf16 pi by rounding)."""
    p = cfg.ppo
    responses = sampler([prompt.ids for prompt in prompts], seeds)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    prompt_texts = tokenizer.batch_decode([prompt.ids for prompt in prompts], skip_special_tokens=True)
    raw = torch.tensor(score(prompt_texts, texts, [prompt.example for prompt in prompts]), dtype=torch.float32)
    scores = normalise(raw).clamp(-p.reward_clip, p.reward_clip)
    ended = torch.tensor([bool(r) and r[-1] in stop_ids for r in responses])
    scores = scores - p.missing_eos_penalty * (~ended).float()

    batch = collate_responses([prompt.ids for prompt in prompts], responses, list(range(len(prompts))), tokenizer.pad_token_id).to(device)
    mask = batch.response_mask[:, 1:].float()

    temperature = cfg.rollout.temperature
    with autocast():
        logits, values = models.logits_and_values(batch)
        ref_logits = response_logits(reference, batch)
    logprobs = token_logprobs(logits.float() / temperature, batch.input_ids)
    ref_logprobs = token_logprobs(ref_logits.float() / temperature, batch.input_ids)
    values = values * mask
    kl = (logprobs - ref_logprobs) * mask
    rewards = token_rewards(scores.to(device), kl, mask, kl_coef)
    advantages, returns = gae(rewards, values, mask, p.gamma, p.lam)
    if p.whiten_advantages:
        advantages = masked_whiten(advantages, mask, total=distributed.total)
    stats = {
        "reward/mean": float(raw.mean()), "reward/normalized": float(scores.mean()),
        "kl": float(kl.sum(-1).mean()), "response_length": float(mask.sum(-1).mean()),
        "no_eos_fraction": float((~ended).float().mean()),
        "returns/mean": float(distributed.total((returns * mask).sum()) / distributed.total(mask.sum()).clamp(min=1)),
        "value/explained_variance": explained_variance(values, returns, mask, total=distributed.total),
    }
    return Rollouts(batch, mask, logprobs, values, advantages, returns), stats


def _update(rollouts: Rollouts, models: ActorCritic, engine: ActorCriticEngine, cfg: Any, train_actor: bool, seed: int) -> dict[str, float]:
    """`ppo.epochs` passes over shuffled mini-batches; each is one optimizer step of actor and critic
    (of the critic alone while it warms up). Stops early once the approximate KL to the rollout policy
    passes ppo.early_stop_kl. With several processes, each one's mini-batch means are weighted by its
    share of the mini-batch's tokens over all processes, so that their sum, the gradient and the logged
    figures are the means over the whole mini-batch."""
    p = cfg.ppo
    n = rollouts.mask.size(0)
    size = n // p.num_mini_batches
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    updates = 0
    stopped = False
    for _ in range(p.epochs):
        order = torch.randperm(n, generator=generator).to(rollouts.mask.device)
        for start in range(0, n, size):
            mini = rollouts.rows(order[start : start + size])
            share = float(mini.mask.sum()) / max(distributed.total(float(mini.mask.sum())), 1.0)
            with engine.actor.autocast():
                logits, values = models.logits_and_values(mini.batch, train_actor)
            logits = logits.float() / cfg.rollout.temperature
            logprobs = token_logprobs(logits, mini.batch.input_ids)
            policy_loss, clipped = clipped_surrogate(logprobs, mini.old_logprobs, mini.advantages, p.clip_range, p.clip_range)
            policy_loss = masked_mean(policy_loss, mini.mask)
            entropy = masked_mean(entropy_from_logits(logits[:, :-1]), mini.mask)
            value_loss = masked_mean(clipped_value_loss(values, mini.old_values, mini.returns, p.value_clip), mini.mask)
            actor_loss = policy_loss - p.entropy_coef * entropy
            if engine.critic is None:  # one model: a single loss and step (the value head alone while it warms up)
                engine.actor.backward(share * ((actor_loss if train_actor else 0.0) + p.value_coef * value_loss))
                engine.actor.step()
            else:
                if train_actor:
                    engine.actor.backward(share * actor_loss)
                engine.critic.backward(share * p.value_coef * value_loss)
                if train_actor:
                    engine.actor.step()
                engine.critic.step()
            figures = torch.tensor([policy_loss.item(), value_loss.item(), entropy.item(), float(masked_mean(clipped.float(), mini.mask)),
                                    float(masked_mean(kl_k2(logprobs.detach(), mini.old_logprobs), mini.mask))],
                                   dtype=torch.float64, device=mini.mask.device)  # NCCL reduces GPU tensors only
            figures = distributed.total(figures * share).tolist()
            approx_kl = figures[-1]
            for name, value in zip(("loss/policy", "loss/value", "entropy", "clipfrac", "approx_kl"), figures):
                sums[name] = sums.get(name, 0.0) + value
            updates += 1
            if p.early_stop_kl is not None and approx_kl > p.early_stop_kl:
                stopped = True
                break
        if stopped:
            break
    return {name: total / updates for name, total in sums.items()} | {"updates": float(updates)}

"""The DeepSpeed engine: the same seam as TorchEngine (autocast, backward, step, lr), with ZeRO
partitioning across the processes of the run.

The stages hand `backward` a loss that is already this process's share of the whole optimizer
step's loss (its normaliser counted over every micro-batch of every process). So gradients must be
summed, not averaged: DeepSpeed averages over processes, and the loss is multiplied by the world
size to undo it; gradient accumulation is left to us (`managed_gradient_accumulation: false`), so
DeepSpeed neither divides by the accumulation steps nor steps before `step()` is called.

The DeepSpeed JSON is generated from the typed config (batch, accumulation, clipping, dtype), so the
two cannot disagree; a user's own JSON is checked against it key by key and then extended by it.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from rlhf_cli import distributed
from rlhf_cli.engine import NonFiniteSteps, _param_groups, _scheduler
from rlhf_cli.errors import UserError

# Keys the typed config decides; a user JSON may repeat them (same value or "auto") but not change them.
_DECIDED = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
    "zero_optimization.stage",
    "bf16.enabled",
    "fp16.enabled",
)


def deepspeed_config(train_cfg: Any, ds_keys: Any, compute_dtype: torch.dtype, world_size: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": ds_keys.stage, "overlap_comm": False, "stage3_gather_16bit_weights_on_model_save": True}
    if ds_keys.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds_keys.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    generated = {
        "train_micro_batch_size_per_gpu": train_cfg.batch_size,
        "gradient_accumulation_steps": train_cfg.grad_accum,
        "train_batch_size": train_cfg.batch_size * train_cfg.grad_accum * world_size,
        "gradient_clipping": float(train_cfg.max_grad_norm),
        "zero_optimization": zero,
        "bf16": {"enabled": compute_dtype == torch.bfloat16},
        "fp16": {"enabled": compute_dtype == torch.float16, "loss_scale": 0},
        "managed_gradient_accumulation": False,
        # The optimizer is ours (torch AdamW): no JIT-compiled DeepSpeed Adam, also when offloading.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if ds_keys.config:
        return _merge_user_config(generated, ds_keys.config)
    return generated


def _merge_user_config(generated: dict[str, Any], path: str) -> dict[str, Any]:
    try:
        user = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"deepspeed.config: '{path}' does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"deepspeed.config: {path}: not JSON ({exc})") from None
    if not isinstance(user, dict):
        raise UserError(f"deepspeed.config: {path}: must hold a JSON object")
    for owned, where in (("optimizer", "train.lr, train.adam_*"), ("scheduler", "train.lr_scheduler, train.warmup_ratio")):
        if owned in user:
            raise UserError(f"deepspeed.config: {path}: remove '{owned}'; it comes from {where}")
    for dotted in _DECIDED:
        theirs, ours = _get(user, dotted), _get(generated, dotted)
        if theirs not in (None, "auto") and theirs != ours:
            raise UserError(f"deepspeed.config: {path}: {dotted}={theirs!r} disagrees with the config's {ours!r}")
    return _deep_merge(user, generated)


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


class DeepSpeedEngine:
    owns_weights = True  # a checkpoint is DeepSpeed's own (sharded) one: weights, optimizer and schedule

    def __init__(self, model: torch.nn.Module, train_cfg: Any, total_steps: int, compute_dtype: torch.dtype,
                 ds_keys: Any, name: str = "model"):
        import deepspeed

        config = deepspeed_config(train_cfg, ds_keys, compute_dtype, distributed.world_size())
        # DeepSpeed clips plain fp32 ZeRO-0 gradients without keeping their norm; the optimizer clips instead.
        clips_itself = ds_keys.stage == 0 and compute_dtype == torch.float32
        if clips_itself:
            config["gradient_clipping"] = 0.0
        optimizer = _ClippingAdamW(_param_groups(model, train_cfg.weight_decay), lr=train_cfg.lr,
                                   betas=tuple(train_cfg.adam_betas), eps=train_cfg.adam_eps,
                                   max_grad_norm=train_cfg.max_grad_norm if clips_itself else None)
        self.optimizer = optimizer
        self.scheduler = _scheduler(optimizer, train_cfg, total_steps)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=self.scheduler, config=config)
        self.name = name
        self.world_size = distributed.world_size()
        self.fp16 = compute_dtype == torch.float16
        self.nonfinite = NonFiniteSteps()

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed holds the weights in the compute dtype itself

    def backward(self, loss: torch.Tensor) -> None:
        self.nonfinite.watch(loss)
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self) -> float:
        """Reduce, clip, update, advance the schedule; returns the gradient norm before clipping.
        A non-finite gradient norm is skipped by DeepSpeed itself under ZeRO-1/2/3 (an "overflow", which
        also holds the schedule back) and by _ClippingAdamW under fp32 ZeRO-0 (tests/test_nonfinite.py).
        Should a DeepSpeed version apply one anyway, the check before every save
        (runs.checkpoint.refuse_nonfinite) keeps the weights it leaves off the disk."""
        loss_finite = self.nonfinite.loss_finite()
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        overflowed = self.engine.skipped_steps > skipped_before
        norm = self.engine.get_global_grad_norm()
        norm = float(norm if norm is not None else self.optimizer.grad_norm)
        # fp16: an overflow with a finite loss is the loss scaler finding its scale (NonFiniteSteps).
        self.nonfinite.record(not loss_finite or (not self.fp16 and (overflowed or not math.isfinite(norm))))
        return norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=self.name, save_latest=False,
                                    client_state={"nonfinite": self.nonfinite.state_dict()})

    def load(self, directory: Path) -> None:
        if not (directory / self.name).is_dir():
            raise UserError(f"{directory}: not a DeepSpeed checkpoint of this run (no {self.name}/); "
                            "was it written with another deepspeed setting?")
        loaded, client_state = self.engine.load_checkpoint(str(directory), tag=self.name)
        if loaded is None:
            raise UserError(f"{directory}: the DeepSpeed checkpoint {self.name}/ could not be loaded")
        self.nonfinite.load_state_dict(client_state["nonfinite"])


class _ClippingAdamW(torch.optim.AdamW):
    """AdamW that, given max_grad_norm, clips the (already reduced) gradients itself and keeps their norm,
    and skips a non-finite one as DeepSpeed's ZeRO optimizers do: `overflow` is the flag DeepSpeed's
    engine reads to count the skip and hold the schedule back."""

    def __init__(self, params: Any, max_grad_norm: float | None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self.grad_norm = 0.0
        if max_grad_norm is not None:
            self.overflow = False

    def step(self, closure: Any = None) -> Any:
        if self.max_grad_norm is not None:
            limit = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
            params = [p for group in self.param_groups for p in group["params"]]
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
            self.overflow = not math.isfinite(self.grad_norm)
            if self.overflow:
                return None
        return super().step(closure)


def frozen_for_inference(model: Any, cfg: Any) -> Any:
    """A frozen model (reference, reward) partitioned like the policy under ZeRO-3; under ZeRO-0/1/2 cast
    to the compute dtype DeepSpeed holds the policy's weights in (so that a reference scores as the
    policy does, not in float32); as it is otherwise (the plain engine runs both under one autocast),
    and a LoRA reference, which is the policy itself."""
    from rlhf_cli.models import resolve_dtype

    ds_keys = cfg.deepspeed
    if ds_keys.stage is None or not isinstance(model, torch.nn.Module):
        return model
    compute_dtype = resolve_dtype(cfg.model.dtype.value)
    if ds_keys.stage != 3:
        return model.to(compute_dtype)
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "bf16": {"enabled": compute_dtype == torch.bfloat16}, "fp16": {"enabled": compute_dtype == torch.float16}}
    if ds_keys.offload_params:
        config["zero_optimization"]["offload_param"] = {"device": "cpu"}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.module.eval()
    return engine.module


def full_weights(model: torch.nn.Module):
    """Every parameter of a ZeRO-3 model gathered once for the block (generation, saving); a no-op otherwise."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)

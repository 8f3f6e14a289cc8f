"""The typed schema: every config key, its type, its default and its one-line help.

This is the single source of truth. Hydra validates overrides against it (an unknown key or a value
of the wrong type never reaches a stage), `rlhf <stage> --help` and the README table read the help
strings, and the stage code receives the dataclasses themselves.

Values that the packaged YAML under `conf/` sets per stage (learning rate, steps, built-in data) are
defaults there; the values here are the fallbacks a user YAML can rely on.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any, List, Optional


def _key(default: Any, help: str, **kwargs: Any) -> Any:
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


class DType(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class DataFormat(str, Enum):
    auto = "auto"
    messages = "messages"
    sharegpt = "sharegpt"
    alpaca = "alpaca"
    prompt_completion = "prompt_completion"
    preference = "preference"
    ranked = "ranked"


class Truncation(str, Enum):
    truncate = "truncate"
    drop = "drop"
    error = "error"


class Scheduler(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class DPOLoss(str, Enum):
    sigmoid = "sigmoid"
    ipo = "ipo"
    hinge = "hinge"
    robust = "robust"
    simpo = "simpo"


class Advantage(str, Enum):
    grpo = "grpo"
    dr_grpo = "dr_grpo"
    rloo = "rloo"


class LossAggregation(str, Enum):
    seq_mean_token_mean = "seq_mean_token_mean"
    token_mean = "token_mean"
    seq_mean_token_sum_norm = "seq_mean_token_sum_norm"


class KLEstimator(str, Enum):
    k1 = "k1"
    k2 = "k2"
    k3 = "k3"


class RolloutEngine(str, Enum):
    hf = "hf"


class CriticKind(str, Enum):
    separate = "separate"
    head = "head"


class Logger(str, Enum):
    jsonl = "jsonl"
    wandb = "wandb"
    tensorboard = "tensorboard"


@dataclass
class LoraKeys:
    r: int = _key(0, "LoRA rank; 0 trains every weight (peft must be installed for r > 0: pip install -e \".[lora]\")")
    alpha: float = _key(16.0, "LoRA scaling numerator (the update is scaled by alpha / r)")
    dropout: float = _key(0.0, "dropout on the LoRA path")
    target_modules: List[str] = _key(["all-linear"], "modules that get adapters: all-linear, or names such as q_proj, v_proj")
    merge: bool = _key(True, "final/ holds the adapters merged into full weights; false: the adapter alone, loaded on its base")


@dataclass
class ModelConfig:
    path: Optional[str] = _key(
        "tiny", "hub id or local directory of the model this stage trains; `tiny` is the built-in model; null chains from from_run"
    )
    dtype: DType = _key(DType.auto, "compute dtype: fp32, bf16, fp16, or auto (fp32 on CPU, bf16 on GPU)")
    attn_implementation: str = _key("sdpa", "attention kernel passed to transformers: sdpa, eager, flash_attention_2")
    padding_free: bool = _key(True, "batches without padding: samples in one row, a prompt once for its responses (sdpa)")
    gradient_checkpointing: bool = _key(False, "recompute activations in the backward pass to save memory")
    trust_remote_code: bool = _key(False, "run modelling code shipped with a hub model (off unless you trust it)")
    revision: Optional[str] = _key(None, "hub revision (branch, tag or commit) of model.path")
    lora: LoraKeys = field(default_factory=LoraKeys)


@dataclass
class DataConfig:
    train: str = _key("builtin:arith", "training data: hub dataset id, local .jsonl/.json/.parquet/.csv, or builtin:NAME")
    eval: Optional[str] = _key(None, "evaluation data, same forms as data.train; null carves data.eval_size rows from train")
    eval_size: float = _key(0.0, "rows carved from data.train for evaluation when data.eval is null (<1: a fraction)")
    format: DataFormat = _key(
        DataFormat.auto, "row format: auto, messages, sharegpt, alpaca, prompt_completion, preference, ranked"
    )
    max_length: int = _key(512, "tokens per sample, prompt and response together")
    truncation: Truncation = _key(Truncation.truncate, "samples over max_length: truncate (cut the end), drop, or error")
    packing: bool = _key(False, "pack short samples into max_length rows (no attention across samples)")
    subset: Optional[str] = _key(None, "hub dataset configuration name (e.g. `main` for gsm8k)")
    train_split: str = _key("train", "split of a hub dataset used for training")
    eval_split: str = _key("test", "split of a hub dataset used for evaluation when data.eval names one")


@dataclass
class TrainConfig:
    max_steps: Optional[int] = _key(None, "optimizer steps to train; wins over train.epochs when set")
    epochs: float = _key(1.0, "passes over the training data when train.max_steps is null")
    batch_size: int = _key(8, "per-device micro-batch size (samples)")
    grad_accum: int = _key(1, "micro-batches accumulated into one optimizer step")
    lr: float = _key(1e-5, "peak learning rate")
    lr_scheduler: Scheduler = _key(Scheduler.cosine, "learning-rate schedule after warm-up: cosine, linear, constant")
    warmup_ratio: float = _key(0.0, "fraction of the steps spent warming the learning rate up from 0")
    weight_decay: float = _key(0.0, "AdamW weight decay (not applied to biases and norms)")
    adam_betas: List[float] = _key([0.9, 0.999], "AdamW betas")
    adam_eps: float = _key(1e-8, "AdamW epsilon")
    max_grad_norm: float = _key(1.0, "clip the global gradient norm to this value; 0 disables clipping")
    max_nonfinite_steps: int = _key(
        3, "optimizer steps in a row with a NaN or Inf loss or gradient norm that are skipped before the run "
           "stops with an error (0: stop at the first)")
    seed: int = _key(42, "seed for initialisation, data order and sampling")
    log_every: int = _key(10, "log metrics every N optimizer steps")
    eval_every: int = _key(0, "evaluate every N optimizer steps (0: only at the end)")
    save_every: int = _key(0, "write a resumable checkpoint every N optimizer steps (0: never)")
    keep_checkpoints: int = _key(2, "how many of the newest checkpoints to keep")


@dataclass
class EvalConfig:
    max_samples: int = _key(512, "evaluation rows scored (0: all)")
    batch_size: int = _key(64, "rows per evaluation forward or generation call")


@dataclass
class SFTEvalConfig(EvalConfig):
    generate: int = _key(0, "evaluation rows with an `answer` field decoded greedily for eval/accuracy (0: none)")
    max_new_tokens: int = _key(32, "tokens generated per row for eval/accuracy")


@dataclass
class WandbConfig:
    project: str = _key("rlhf", "wandb project")
    entity: Optional[str] = _key(None, "wandb entity (team or user)")
    name: Optional[str] = _key(None, "wandb run name (default: the output directory)")
    group: Optional[str] = _key(None, "wandb group")
    tags: List[str] = _key([], "wandb tags")


@dataclass
class DeepSpeedKeys:
    """Set as a group: deepspeed=none|zero0|zero1|zero2|zero3|zero3_offload (conf/deepspeed/), then keys."""

    stage: Optional[int] = _key(None, "ZeRO stage 0-3 under DeepSpeed; null: plain PyTorch, one process")
    offload_optimizer: bool = _key(False, "optimizer state in CPU memory (ZeRO 1-3)")
    offload_params: bool = _key(False, "parameters in CPU memory between uses (ZeRO 3)")
    config: Optional[str] = _key(None, "your own DeepSpeed JSON: checked against the one generated from these keys, then used")


@dataclass
class LauncherKeys:
    nproc: int = _key(1, "processes of this run on this node; more than 1 starts them here (needs deepspeed)")


@dataclass
class StageConfig:
    """Keys every stage shares."""

    stage: str = _key("", "the stage this config runs (set by the command)")
    output_dir: str = _key("runs/default/${stage}", "this stage's run directory")
    resume: str = _key("auto", "auto (continue from the newest checkpoint), never (start over), or a checkpoint path")
    logger: List[Logger] = _key([Logger.jsonl], "metric sinks: jsonl (always written), wandb, tensorboard")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    deepspeed: DeepSpeedKeys = field(default_factory=DeepSpeedKeys)
    launcher: LauncherKeys = field(default_factory=LauncherKeys)


@dataclass
class SFTConfig(StageConfig):
    """Supervised fine-tuning: next-token loss on the assistant (completion) tokens only."""

    eval: SFTEvalConfig = field(default_factory=SFTEvalConfig)


@dataclass
class RewardModelKeys:
    center_coef: float = _key(0.0, "reward-centering regulariser: coefficient x mean((r_chosen + r_rejected)^2)")
    use_margin: bool = _key(False, "use each pair's `margin` field (or ranked score differences) in the loss")
    stats_samples: int = _key(1000, "training prompts whose chosen response is scored for the reward mean/std")


@dataclass
class TrainRMConfig(StageConfig):
    """Reward model: Bradley-Terry on pairwise or ranked preferences, a scalar head on the last token."""

    from_run: str = _key("runs/default", "run directory whose sft/final this stage starts from when model.path is null")
    rm: RewardModelKeys = field(default_factory=RewardModelKeys)


@dataclass
class ReferenceKeys:
    path: Optional[str] = _key(None, "the frozen reference model; null: the model the policy starts from")


@dataclass
class DPOKeys:
    loss: DPOLoss = _key(DPOLoss.sigmoid, "variant: sigmoid (DPO), ipo, hinge (SLiC), robust, simpo (no reference)")
    beta: float = _key(0.1, "beta: the strength of the implicit KL constraint (the reward scale)")
    label_smoothing: float = _key(0.0, "assumed label-flip rate e: conservative DPO with sigmoid, robust DPO with robust")
    simpo_gamma: float = _key(0.5, "SimPO's target reward margin gamma")
    sft_weight: float = _key(0.0, "weight of an NLL term on the chosen responses (RPO); 0 disables it")
    precompute_ref: bool = _key(False, "compute the reference log-probabilities once, cache them in the run, free the reference")


@dataclass
class AccuracyEvalConfig(EvalConfig):
    accuracy_data: Optional[str] = _key(None, "rows with a prompt and an `answer` for eval/accuracy (greedy exact match)")
    generate: int = _key(0, "rows of eval.accuracy_data decoded for eval/accuracy (0: none)")
    max_new_tokens: int = _key(32, "tokens generated per row for eval/accuracy")


@dataclass
class DPOConfig(StageConfig):
    """Direct preference optimisation of the policy against a frozen reference, no reward model."""

    from_run: str = _key("runs/default", "run directory whose sft/final is the policy and reference when model.path is null")
    ref: ReferenceKeys = field(default_factory=ReferenceKeys)
    dpo: DPOKeys = field(default_factory=DPOKeys)
    eval: AccuracyEvalConfig = field(default_factory=AccuracyEvalConfig)


@dataclass
class RewardSpec:
    name: str = _key("exact_match", "exact_match, math, format, model, http, or module:function")
    weight: float = _key(1.0, "weight of this reward in the sum")
    pattern: Optional[str] = _key(None, "format: the regular expression a completion must match")
    path: Optional[str] = _key(None, "model: the reward model directory")
    url: Optional[str] = _key(None, "http: the endpoint that scores a batch")
    timeout: float = _key(10.0, "http: seconds to wait for an answer")
    retries: int = _key(2, "http: tries after the first before giving up")


@dataclass
class RolloutKeys:
    engine: RolloutEngine = _key(RolloutEngine.hf, "generation engine: hf (transformers generate with KV cache)")
    max_new_tokens: int = _key(64, "tokens generated per completion at most")
    temperature: float = _key(1.0, "sampling temperature (also divides the logits scored in the loss)")
    top_p: float = _key(1.0, "nucleus sampling threshold (1: off)")


@dataclass
class GRPOKeys:
    num_generations: int = _key(8, "G: completions sampled per prompt")
    beta: float = _key(0.0, "weight of the KL penalty to the reference; 0 loads no reference model")
    kl_estimator: KLEstimator = _key(KLEstimator.k3, "KL estimator in the loss: k1, k2, k3 (Schulman)")
    advantage: Advantage = _key(Advantage.grpo, "advantage: grpo (group mean and std), dr_grpo (mean only), rloo")
    loss_agg: LossAggregation = _key(
        LossAggregation.token_mean, "loss aggregation: seq_mean_token_mean, token_mean (DAPO), seq_mean_token_sum_norm (Dr. GRPO)"
    )
    epsilon_low: float = _key(0.2, "lower clip of the ratio: 1 - epsilon_low")
    epsilon_high: float = _key(0.2, "upper clip of the ratio: 1 + epsilon_high (DAPO clip-higher when larger)")
    inner_updates: int = _key(1, "mu: optimizer updates per rollout batch, with the rollout policy as pi_old")
    filter_zero_std: bool = _key(False, "drop groups whose rewards are all equal (they carry no signal)")
    rewards: List[RewardSpec] = _key([RewardSpec()], "reward functions: a list of {name, weight, ...}")


@dataclass
class GRPOConfig(StageConfig):
    """Group relative policy optimisation with rule-based or model rewards, no critic."""

    from_run: str = _key("runs/default", "run directory whose sft/final is the policy and reference when model.path is null")
    ref: ReferenceKeys = field(default_factory=ReferenceKeys)
    rollout: RolloutKeys = field(default_factory=RolloutKeys)
    grpo: GRPOKeys = field(default_factory=GRPOKeys)
    eval: AccuracyEvalConfig = field(default_factory=AccuracyEvalConfig)


@dataclass
class RewardKeys:
    path: Optional[str] = _key(None, "the frozen reward model (a train-rm final/); null: rm/final of from_run")


@dataclass
class CriticKeys:
    kind: CriticKind = _key(
        CriticKind.separate,
        "separate (a model of its own, from critic.path) or head (a linear value head on the actor: no second model, trained at train.lr)",
    )
    path: Optional[str] = _key(None, "the separate critic's start (a sequence-classification model); null: the reward model")
    lr: float = _key(1e-4, "the separate critic's learning rate (its schedule follows train.lr_scheduler)")


@dataclass
class PPOKeys:
    kl_coef: float = _key(0.05, "beta: weight of the per-token KL penalty in the reward (the start value with kl_target)")
    kl_target: Optional[float] = _key(None, "adaptive KL control (Ziegler et al.): target KL per response; null keeps kl_coef fixed")
    kl_horizon: int = _key(10000, "adaptive KL control: horizon in responses")
    gamma: float = _key(1.0, "GAE discount")
    lam: float = _key(0.95, "GAE lambda")
    epochs: int = _key(4, "PPO epochs over each rollout batch")
    num_mini_batches: int = _key(1, "mini-batches per epoch, each one optimizer step of actor and critic")
    clip_range: float = _key(0.2, "policy ratio clipped to [1 - clip_range, 1 + clip_range]")
    value_clip: float = _key(0.2, "value predictions clipped to old value +- value_clip in the value loss")
    value_coef: float = _key(0.5, "weight of the value loss")
    entropy_coef: float = _key(0.0, "weight of the entropy bonus")
    early_stop_kl: Optional[float] = _key(None, "stop a batch's remaining updates once the approximate KL to the rollout policy passes this")
    missing_eos_penalty: float = _key(1.0, "subtracted from the (normalised) score of a response that ends without EOS")
    normalize_reward: bool = _key(True, "normalise scores with the reward model's mean and std from its train-rm manifest (running ones without it)")
    reward_clip: float = _key(5.0, "normalised scores clipped to +- reward_clip")
    whiten_advantages: bool = _key(True, "whiten advantages over the batch's response tokens")
    offload_frozen: bool = _key(False, "keep the reference and reward model in CPU memory, on the device only for their forward passes")
    critic_warmup_steps: int = _key(0, "steps at the start that train only the critic (its values start from reward-model scores)")


@dataclass
class PPOConfig(StageConfig):
    """PPO against a learned reward model with a critic (InstructGPT step 3)."""

    from_run: str = _key("runs/default", "run directory whose sft/final is the policy and reference and whose rm/final the reward model and critic")
    ref: ReferenceKeys = field(default_factory=ReferenceKeys)
    reward: RewardKeys = field(default_factory=RewardKeys)
    critic: CriticKeys = field(default_factory=CriticKeys)
    rollout: RolloutKeys = field(default_factory=RolloutKeys)
    ppo: PPOKeys = field(default_factory=PPOKeys)
    eval: AccuracyEvalConfig = field(default_factory=AccuracyEvalConfig)


STAGE_SCHEMAS = {"sft": SFTConfig, "train-rm": TrainRMConfig, "dpo": DPOConfig, "grpo": GRPOConfig, "ppo": PPOConfig}


@dataclass
class EvalModelKeys:
    path: Optional[str] = _key(
        None, "the checkpoint to evaluate: a causal LM or a train-rm reward model (a run's final/, a hub id, or tiny); null: sft/final of from_run"
    )
    dtype: DType = _key(DType.auto, "dtype the weights are cast to for inference: fp32, bf16, fp16, or auto (fp32 on CPU, bf16 on GPU)")
    attn_implementation: str = _key("sdpa", "attention kernel passed to transformers: sdpa, eager, flash_attention_2")
    trust_remote_code: bool = _key(False, "run modelling code shipped with a hub model (off unless you trust it)")
    revision: Optional[str] = _key(None, "hub revision (branch, tag or commit) of model.path")


@dataclass
class EvalReferenceKeys:
    path: Optional[str] = _key(None, "the reference of win_rate and kl; null: sft/final of from_run when it is complete (else both are skipped)")


@dataclass
class EvalRewardKeys:
    path: Optional[str] = _key(
        None, "the reward model (a train-rm final/) that scores completions; null: rm/final of from_run when it is complete (else skipped)"
    )


@dataclass
class EvalDataKeys:
    prompts: Optional[str] = _key(
        "builtin:arith_eval", "prompts whose sampled completions give reward, win_rate and kl (rows with a `prompt`); null: skip those"
    )
    eval: Optional[str] = _key(
        "builtin:arith_prefs_near_eval", "preference pairs or ranked rows for rm_accuracy, when model.path is a reward model; null: skip it"
    )
    max_length: int = _key(512, "tokens per sample, prompt and response together")
    truncation: Truncation = _key(
        Truncation.truncate, "samples over max_length: truncate (a prompt keeps its end, a preference pair loses its end), drop, or error"
    )
    subset: Optional[str] = _key(None, "hub dataset configuration name (e.g. `main` for gsm8k)")
    split: str = _key("test", "split of the hub datasets named by data.prompts, data.eval and eval.accuracy_data")


@dataclass
class EvalKeys:
    accuracy_data: Optional[str] = _key(
        "builtin:arith_eval", "rows with a prompt and an `answer` for accuracy (greedy exact match, and the math reward); null: skip it"
    )
    generate: int = _key(500, "rows of eval.accuracy_data decoded for accuracy (0: skip it)")
    max_samples: int = _key(500, "prompts of data.prompts and rows of data.eval evaluated (0: all)")
    max_new_tokens: int = _key(32, "tokens generated per completion at most")
    temperature: float = _key(1.0, "sampling temperature of the completions of reward, win_rate and kl (0: greedy)")
    seed: int = _key(0, "seed of the sampled completions (each prompt draws from its own) and of model.path=tiny's weights")
    batch_size: int = _key(64, "rows per generation or forward call")


@dataclass
class EvalRunConfig:
    """rlhf eval: the metrics of one checkpoint, written to <output_dir>/eval.json."""

    stage: str = _key("eval", "the command this config runs (set by the command)")
    output_dir: str = _key("runs/default/eval", "where eval.json is written (never a stage's run directory)")
    from_run: str = _key("runs/default", "run directory whose sft/final (model and reference) and rm/final (reward model) are the defaults")
    model: EvalModelKeys = field(default_factory=EvalModelKeys)
    ref: EvalReferenceKeys = field(default_factory=EvalReferenceKeys)
    reward: EvalRewardKeys = field(default_factory=EvalRewardKeys)
    data: EvalDataKeys = field(default_factory=EvalDataKeys)
    eval: EvalKeys = field(default_factory=EvalKeys)


# Every command composed from conf/<name>.yaml: the training stages, and eval.
CONFIG_SCHEMAS = {**STAGE_SCHEMAS, "eval": EvalRunConfig}


def key_help(schema: type) -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf key of a schema, in declaration order."""
    rows: list[tuple[str, str, str]] = []

    def walk(cls: type, prefix: str) -> None:
        instance = cls()
        for f in fields(cls):
            value = getattr(instance, f.name)
            if is_dataclass(value):
                walk(type(value), f"{prefix}{f.name}.")
            else:
                rows.append((f"{prefix}{f.name}", show_value(value), f.metadata.get("help", "")))

    walk(schema, "")
    return rows


def show_value(value: Any) -> str:
    """A config value as it would be written in an override (unset keys of a record left out)."""
    if is_dataclass(value):
        return show_value({f.name: getattr(value, f.name) for f in fields(value)})
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{show_value(item)}" for key, item in value.items() if item is not None) + "}"
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list):
        return "[" + ",".join(show_value(v) for v in value) + "]"
    if value is None:
        return "null"
    return str(value)

"""Compose a stage's config the way Hydra will, and check it before anything runs.

The CLI calls `check_overrides` before handing control to the stage's `@hydra.main` entry, so a
typo in a key, a value of the wrong type or an impossible setting is one `error:` line, for every
job of a sweep, before any run directory is created or any job is launched.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import fields, is_dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from rlhf_cli.config.schema import CONFIG_SCHEMAS, show_value
from rlhf_cli.config.user_yaml import FileOverride
from rlhf_cli.errors import UserError
from rlhf_cli.runs import check_writable

CONFIG_MODULE = "rlhf_cli.conf"


def register_schemas() -> None:
    store = ConfigStore.instance()
    for stage, schema in CONFIG_SCHEMAS.items():
        store.store(name=f"{stage}_schema", node=schema)


def check_overrides(stage: str, overrides: list[str], file_overrides: list[FileOverride]) -> list[Any]:
    """Compose and validate every job the overrides describe; return their typed configs."""
    origins = {o.text: o.origin for o in file_overrides}
    configs = [load_config(stage, job, origins) for job in sweep_jobs(overrides)]
    for cfg in configs:
        check_writable(Path(cfg.output_dir))  # before Hydra makes it
        if stage == "eval":
            check_eval_sources(cfg)
        else:
            check_sources(cfg)
    return configs


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override list of each job of a (possible) sweep; a single job when nothing sweeps."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as exc:
        raise UserError(f"bad override: {_first_line(str(exc))}") from None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    try:
        (jobs,) = BasicSweeper.split_arguments(parsed, None)
    except HydraException as exc:
        raise UserError(_first_line(str(exc))) from None
    return jobs


def fixed_keys(overrides: list[str]) -> list[str]:
    """Keys of the overrides that do not sweep (one value for every job)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return sorted({o.get_key_element().lstrip("+~") for o in parsed if not o.is_sweep_override()})


def load_config(stage: str, overrides: list[str], origins: dict[str, str] | None = None) -> Any:
    """The typed config (a schema dataclass instance) of one job. Overrides of Hydra's own settings
    (hydra/launcher=slurm, hydra.launcher.partition=...) are checked too, in a second composition
    that includes the hydra node (the typed config has none)."""
    origins = origins or {}
    job_overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name=stage, overrides=job_overrides)
            if len(job_overrides) < len(overrides):
                compose(config_name=stage, overrides=overrides, return_hydra_config=True)
        resolved = OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise _translate(exc, CONFIG_SCHEMAS[stage], origins) from None
    added = _keys_outside_schema(cfg)
    if added:
        parent = added[0].rpartition(".")[0]
        raise _unknown_key(_origin(added[0], "", origins), added[0], _child_keys(CONFIG_SCHEMAS[stage], parent))
    if stage == "eval":
        validate_eval(resolved)
    else:
        validate(resolved)
    return resolved


def stage_defaults(stage: str) -> dict[str, str]:
    """Dotted key -> the stage's default value as text (the packaged YAML over the schema)."""
    register_schemas()
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name=stage)
    flat: dict[str, str] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = show_value(value)

    walk(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "")
    return flat


def _translate(exc: Exception, schema: type, origins: dict[str, str]) -> UserError:
    """One `error:` line from a Hydra/OmegaConf exception, naming the key and, where known, the file line."""
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    full_key = getattr(cause, "full_key", None) or ""
    where = _origin(full_key, str(exc), origins)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and " not in " in str(cause):
        parent = full_key.rpartition(".")[0]
        # Hydra's settings are dataclasses of Hydra and its plugins, not of our schema.
        hydra_node = getattr(cause, "object_type", None) if full_key.startswith("hydra.") else None
        valid = [f.name for f in fields(hydra_node)] if is_dataclass(hydra_node) else _child_keys(schema, parent)
        return _unknown_key(where, full_key, valid)
    if isinstance(cause, ValidationError):
        enum_choices = _enum_choices(schema, full_key)
        if enum_choices:
            value = getattr(cause, "value", None) or _value_of(str(cause))
            return UserError(f"{where}{full_key}: '{value}' is not one of {', '.join(enum_choices)}")
        return UserError(f"{where}{full_key}: {_first_line(str(cause))}")
    if isinstance(cause, MissingMandatoryValue):
        return UserError(f"{where}{full_key}: a value is required")
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, option = exc.missing_cfg_file.rpartition("/")
        choices = f" (choose from {', '.join(exc.options)})" if exc.options else ""
        # hydra/launcher=slurm extends submitit_slurm, which only the plugin provides.
        install = "; install hydra-submitit-launcher: pip install 'rlhf-cli[slurm]'" if "submitit" in option else ""
        return UserError(f"{where}{group}={option}: no such option{choices}{install}")
    if isinstance(exc, MissingConfigException):
        return UserError(f"{where}{' '.join(str(exc).split())}")
    if isinstance(exc, OverrideParseException):
        return UserError(f"bad override: {_first_line(str(exc))}")
    message = " ".join(str(exc).split()) if isinstance(exc, HydraException) else _first_line(str(exc))
    return UserError(f"{where}{message}")


def _unknown_key(where: str, full_key: str, valid: list[str]) -> UserError:
    parent, _, leaf = full_key.rpartition(".")
    hint = difflib.get_close_matches(leaf, valid, n=1)
    suggestion = f"; did you mean '{_join(parent, hint[0])}'?" if hint else ""
    return UserError(f"{where}unknown key '{full_key}'{suggestion} (valid keys{_in(parent)}: {', '.join(valid)})")


def _keys_outside_schema(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys that `+key=value` added where the schema has none. Hydra lets `+` add to a typed config,
    and the stage would never read them: a misspelt `+train.lrr=1` would pass in silence."""
    known = {f.name for f in fields(OmegaConf.get_type(node))}
    added = []
    for key in node:
        child = node._get_node(key)
        if key not in known:
            added.append(f"{prefix}{key}")
        elif isinstance(child, DictConfig) and is_dataclass(OmegaConf.get_type(child)):
            added += _keys_outside_schema(child, f"{prefix}{key}.")
    return added


def _origin(full_key: str, message: str, origins: dict[str, str]) -> str:
    for text, origin in origins.items():
        key = text.split("=", 1)[0]
        if (full_key and key == full_key) or f"'{text}'" in message:
            return f"{origin}: "
    return ""


def _child_keys(schema: type, parent: str) -> list[str]:
    node: Any = schema
    for part in [p for p in parent.split(".") if p]:
        hint = {f.name: f for f in fields(node)}.get(part)
        default = getattr(node(), part, None) if hint else None
        if not is_dataclass(default):
            return []
        node = type(default)
    return [f.name for f in fields(node)]


def _enum_choices(schema: type, full_key: str) -> list[str]:
    node: Any = schema()
    for part in full_key.split("."):
        if not hasattr(node, part):
            return []
        node = getattr(node, part)
    if isinstance(node, list) and node:
        node = node[0]
    if isinstance(node, Enum):
        return [m.value for m in type(node)]
    return []


def _value_of(message: str) -> str:
    start = message.find("'")
    end = message.find("'", start + 1)
    return message[start + 1 : end] if 0 <= start < end else "?"


def _join(parent: str, leaf: str) -> str:
    return f"{parent}.{leaf}" if parent else leaf


def _in(parent: str) -> str:
    return f" in {parent}" if parent else ""


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else text


def validate(cfg: Any) -> None:
    """Checks on values that the types alone cannot express."""
    t, d, e = cfg.train, cfg.data, cfg.eval
    lora = cfg.model.lora
    checks = [
        ("model.lora.r", lora.r >= 0, "must be non-negative (0: no LoRA)"),
        ("model.lora.merge", lora.r == 0 or lora.merge or cfg.model.path != "tiny",
         "saves only the adapter, but the base weights of model.path=tiny are drawn from train.seed and saved nowhere; "
         "start from a saved model or keep model.lora.merge=true"),
        ("model.lora.alpha", lora.alpha > 0, "must be positive"),
        ("model.lora.dropout", 0 <= lora.dropout < 1, "must be in [0, 1)"),
        ("train.batch_size", t.batch_size >= 1, "must be at least 1"),
        ("train.grad_accum", t.grad_accum >= 1, "must be at least 1"),
        ("train.lr", t.lr > 0, "must be positive"),
        ("train.epochs", t.epochs > 0, "must be positive"),
        ("train.max_steps", t.max_steps is None or t.max_steps >= 1, "must be at least 1 (or null to use train.epochs)"),
        ("train.warmup_ratio", 0 <= t.warmup_ratio < 1, "must be in [0, 1)"),
        ("train.weight_decay", t.weight_decay >= 0, "must be non-negative"),
        ("train.adam_betas", len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas), "must be two values in [0, 1)"),
        ("train.adam_eps", t.adam_eps > 0, "must be positive"),
        ("train.max_grad_norm", t.max_grad_norm >= 0, "must be non-negative (0 disables clipping)"),
        ("train.max_nonfinite_steps", t.max_nonfinite_steps >= 0, "must be non-negative (0 stops at the first)"),
        ("train.log_every", t.log_every >= 1, "must be at least 1"),
        ("train.eval_every", t.eval_every >= 0, "must be non-negative"),
        ("train.save_every", t.save_every >= 0, "must be non-negative"),
        ("train.keep_checkpoints", t.keep_checkpoints >= 1, "must be at least 1"),
        ("data.max_length", d.max_length >= 2, "must be at least 2"),
        ("data.eval_size", d.eval_size >= 0, "must be non-negative"),
        ("eval.max_samples", e.max_samples >= 0, "must be non-negative"),
        ("eval.batch_size", e.batch_size >= 1, "must be at least 1"),
    ]
    ds, nproc = cfg.deepspeed, cfg.launcher.nproc
    checks += [
        ("deepspeed.stage", ds.stage is None or 0 <= ds.stage <= 3, "must be 0, 1, 2 or 3 (or null: no DeepSpeed)"),
        ("deepspeed.offload_optimizer", not ds.offload_optimizer or (ds.stage or 0) >= 1, "needs deepspeed.stage 1, 2 or 3"),
        ("deepspeed.offload_params", not ds.offload_params or ds.stage == 3, "needs deepspeed.stage 3"),
        ("deepspeed.config", ds.config is None or ds.stage is not None, "needs a ZeRO stage (deepspeed=zero0..zero3)"),
        ("launcher.nproc", nproc >= 1, "must be at least 1"),
        ("launcher.nproc", nproc == 1 or ds.stage is not None, "more than one process needs DeepSpeed: set deepspeed=zero0|zero1|zero2|zero3"),
    ]
    if hasattr(e, "generate"):
        checks += [
            ("eval.generate", e.generate >= 0, "must be non-negative"),
            ("eval.max_new_tokens", e.max_new_tokens >= 1, "must be at least 1"),
        ]
    if hasattr(cfg, "rm"):
        checks += [
            ("rm.center_coef", cfg.rm.center_coef >= 0, "must be non-negative"),
            ("rm.stats_samples", cfg.rm.stats_samples >= 1, "must be at least 1"),
        ]
    if hasattr(cfg, "dpo"):
        smoothing_limit = 0.5 if cfg.dpo.loss.value == "robust" else 1.0
        checks += [
            ("dpo.beta", cfg.dpo.beta > 0, "must be positive"),
            ("dpo.label_smoothing", 0 <= cfg.dpo.label_smoothing < smoothing_limit, f"must be in [0, {smoothing_limit})"),
            ("dpo.sft_weight", cfg.dpo.sft_weight >= 0, "must be non-negative"),
        ]
    if hasattr(cfg, "rollout"):
        r = cfg.rollout
        checks += [
            ("rollout.max_new_tokens", r.max_new_tokens >= 1, "must be at least 1"),
            ("data.max_length", cfg.data.max_length > r.max_new_tokens, f"must exceed rollout.max_new_tokens={r.max_new_tokens} (room for the prompt)"),
            ("rollout.temperature", r.temperature > 0, "must be positive (the policy is sampled)"),
            ("rollout.top_p", 0 < r.top_p <= 1, "must be in (0, 1]"),
        ]
    if hasattr(cfg, "ppo"):
        p = cfg.ppo
        rollouts_per_step = cfg.train.batch_size * cfg.train.grad_accum
        checks += [
            ("ppo.kl_coef", p.kl_coef >= 0, "must be non-negative"),
            ("ppo.kl_target", p.kl_target is None or p.kl_target > 0, "must be positive (or null for a fixed kl_coef)"),
            ("ppo.kl_horizon", p.kl_horizon >= 1, "must be at least 1"),
            ("ppo.gamma", 0 < p.gamma <= 1, "must be in (0, 1]"),
            ("ppo.lam", 0 <= p.lam <= 1, "must be in [0, 1]"),
            ("ppo.epochs", p.epochs >= 1, "must be at least 1"),
            ("ppo.num_mini_batches", p.num_mini_batches >= 1 and rollouts_per_step % p.num_mini_batches == 0,
             f"must divide the {rollouts_per_step} responses of a step (train.batch_size x train.grad_accum)"),
            ("ppo.clip_range", 0 < p.clip_range < 1, "must be in (0, 1)"),
            ("ppo.value_clip", p.value_clip > 0, "must be positive"),
            ("ppo.early_stop_kl", p.early_stop_kl is None or p.early_stop_kl > 0, "must be positive (or null)"),
            ("ppo.reward_clip", p.reward_clip > 0, "must be positive"),
            ("critic.lr", cfg.critic.lr > 0, "must be positive"),
            ("ppo.critic_warmup_steps", p.critic_warmup_steps >= 0, "must be non-negative"),
            ("ppo.offload_frozen", not p.offload_frozen or ds.stage != 3, "does not combine with ZeRO-3, which partitions the frozen models; use deepspeed.offload_params"),
        ]
    if hasattr(cfg, "grpo"):
        g = cfg.grpo
        checks += [
            ("grpo.num_generations", g.num_generations >= 2, "must be at least 2 (a group needs two completions)"),
            ("grpo.beta", g.beta >= 0, "must be non-negative"),
            ("grpo.epsilon_low", 0 <= g.epsilon_low < 1, "must be in [0, 1)"),
            ("grpo.epsilon_high", g.epsilon_high >= 0, "must be non-negative"),
            ("grpo.inner_updates", g.inner_updates >= 1, "must be at least 1"),
        ]
    _refuse_failed(cfg, checks)
    if ds.config is not None and not os.path.isfile(ds.config):
        raise UserError(f"deepspeed.config: '{ds.config}' is not a file")
    if cfg.resume not in ("auto", "never") and not os.path.isdir(cfg.resume):
        raise UserError(f"resume: '{cfg.resume}' is not auto, never, or an existing checkpoint directory")
    if not cfg.output_dir:
        raise UserError("output_dir: must not be empty")


def validate_eval(cfg: Any) -> None:
    """The value checks of `rlhf eval`'s config (it has no training keys)."""
    e = cfg.eval
    _refuse_failed(cfg, [
        ("eval.generate", e.generate >= 0, "must be non-negative (0: no accuracy)"),
        ("eval.max_samples", e.max_samples >= 0, "must be non-negative (0: all)"),
        ("eval.max_new_tokens", e.max_new_tokens >= 1, "must be at least 1"),
        ("eval.temperature", e.temperature >= 0, "must be non-negative (0: greedy)"),
        ("eval.batch_size", e.batch_size >= 1, "must be at least 1"),
        ("data.max_length", cfg.data.max_length > e.max_new_tokens, f"must exceed eval.max_new_tokens={e.max_new_tokens} (room for the prompt)"),
        ("output_dir", bool(cfg.output_dir), "must not be empty"),
    ])


def _refuse_failed(cfg: Any, checks: list[tuple[str, bool, str]]) -> None:
    for key, ok, rule in checks:
        if not ok:
            raise UserError(f"{key}: {_lookup(cfg, key)!r} {rule}")


def _lookup(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_sources(cfg: Any) -> None:
    """Local model and data paths that do not exist, and unknown built-in sets, before anything starts."""
    if cfg.model.path is None:
        if not hasattr(cfg, "from_run"):
            raise UserError(f"model.path: {cfg.stage} needs a model (tiny, a hub id or a local directory)")
        from rlhf_cli.runs.chain import chained_final

        chained_final(cfg.from_run, "sft", "model.path")
    for key, path, kind in _model_paths(cfg):
        _check_model_path(key, path, cfg.model)
        _check_model_kind(key, path, kind, cfg.model)
    sources = [(f"data.{key}", getattr(cfg.data, key)) for key in ("train", "eval")]
    if getattr(cfg.eval, "accuracy_data", None):
        sources.append(("eval.accuracy_data", cfg.eval.accuracy_data))
    for key, spec in sources:
        _check_data_source(key, spec)


def check_eval_sources(cfg: Any) -> None:
    """`rlhf eval`: the model to evaluate exists (explicit, or chained from from_run), and so do the
    explicit reference, reward model and data. A chained reference or reward model that from_run lacks
    is no error: the metrics that need it are skipped."""
    if cfg.model.path is None:
        from rlhf_cli.runs.chain import chained_final

        chained_final(cfg.from_run, "sft", "model.path")
    for key, path in (("model.path", cfg.model.path), ("ref.path", cfg.ref.path), ("reward.path", cfg.reward.path)):
        _check_model_path(key, path, cfg.model)
    for key, spec in (("data.prompts", cfg.data.prompts), ("data.eval", cfg.data.eval), ("eval.accuracy_data", cfg.eval.accuracy_data)):
        _check_data_source(key, spec)


def _check_model_path(key: str, path: str | None, model_keys: Any) -> None:
    """A local model directory that does not exist or holds no model, or an adapter whose base is gone."""
    from rlhf_cli.data.sources import looks_local
    from rlhf_cli.models import ADAPTER_CONFIG, TINY, adapter_base_config

    if path is None or path == TINY:
        return
    if looks_local(path) and not os.path.isdir(path):
        raise UserError(f"{key}: '{path}' is not an existing directory (nor a hub id)")
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, name)) for name in ("config.json", ADAPTER_CONFIG)):
        raise UserError(f"{key}: '{path}' has no config.json here, so it is not a model directory")
    try:
        adapter_base_config(replace(model_keys, path=path))
    except UserError as exc:
        raise UserError(f"{key}: {exc}") from None


def _model_paths(cfg: Any) -> list[tuple[str, Optional[str], Optional[str]]]:
    """(key, path, the kind of model it must hold, None for either) of every model a stage loads by path."""
    from rlhf_cli.models import CAUSAL_LM, REWARD_MODEL

    # A reward model may start from a policy or from another reward model.
    paths = [("model.path", cfg.model.path, None if cfg.stage == "train-rm" else CAUSAL_LM),
             ("ref.path", getattr(getattr(cfg, "ref", None), "path", None), CAUSAL_LM)]
    if hasattr(cfg, "reward"):
        paths.append(("reward.path", cfg.reward.path, REWARD_MODEL))
    for i, spec in enumerate(getattr(getattr(cfg, "grpo", None), "rewards", [])):
        if spec.name == "model":
            paths.append((f"grpo.rewards[{i}].path", spec.path, REWARD_MODEL))
    return paths


def _check_model_kind(key: str, path: Optional[str], kind: Optional[str], model_keys: Any) -> None:
    """A local model directory of the wrong kind. It would load without complaint: a reward model read as a
    policy gets a fresh language-model head, a policy read as a reward model a fresh score head."""
    from rlhf_cli.models import model_kind

    if kind is None or path is None or not os.path.isdir(path):
        return  # tiny, or a hub id (checked as it loads)
    found = model_kind(replace(model_keys, path=path), key)
    if found != kind:
        raise UserError(f"{key}: {path} is a {found.replace('_', ' ')}, not a {kind.replace('_', ' ')}")


def _check_data_source(key: str, spec: str | None) -> None:
    """An unknown built-in set, or a local data path that does not exist."""
    from rlhf_cli.data.builtin import BUILTINS
    from rlhf_cli.data.sources import BUILTIN_PREFIX, looks_local

    if spec is None:
        return
    if spec.startswith(BUILTIN_PREFIX):
        if spec[len(BUILTIN_PREFIX) :] not in BUILTINS:
            raise UserError(f"{key}: '{spec}' is not a built-in set (choose from builtin:{', builtin:'.join(sorted(BUILTINS))})")
    elif looks_local(spec) and not os.path.exists(spec):
        raise UserError(f"{key}: '{spec}' does not exist")

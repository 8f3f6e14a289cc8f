"""Model and tokenizer loading: a hub id, a local directory, or the built-in `tiny` preset.

A local directory may also hold a LoRA adapter alone (an adapter-only `final/`, `model.lora.merge=false`):
it loads as its base model with the adapter merged in, so every stage can start from it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Optional

from safetensors import SafetensorError

from rlhf_cli.data.sources import looks_local
from rlhf_cli.errors import UserError
from rlhf_cli.runs import RunDir

log = logging.getLogger("rlhf")

TINY = "tiny"
TINY_DIR = Path(__file__).resolve().parent / "tiny"
ADAPTER_CONFIG = "adapter_config.json"  # what peft writes beside an adapter's weights
PAD_TOKEN = "<|pad|>"  # added to a tokenizer that has no pad token distinct from EOS
# What each transformers factory reads from a model directory, for errors.
_PARTS = {"AutoTokenizer": "the tokenizer files", "AutoConfig": "config.json"}

# The fallback template for tokenizers that ship none (base models): one turn per block, each closed
# by the tokenizer's EOS so that the trained end-of-turn is the token generation stops at.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] + ':\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)


def default_device():
    """This process's accelerator (cuda:LOCAL_RANK under a launcher) when there is one, else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def resolve_dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load_tokenizer(model_cfg: Any):
    """The tokenizer of `model.path`, with a pad token distinct from EOS and a chat template."""
    from transformers import AutoTokenizer

    base = adapter_base_config(model_cfg)
    if base is not None and not (Path(model_cfg.path) / "tokenizer_config.json").is_file():
        return load_tokenizer(base)  # an adapter saved without its tokenizer uses its base's
    source = str(TINY_DIR) if model_cfg.path == TINY else model_cfg.path
    tokenizer = _from_pretrained(AutoTokenizer, source, model_cfg)
    if tokenizer.eos_token is None:
        raise UserError(f"model.path={model_cfg.path}: the tokenizer defines no EOS token")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # A pad equal to EOS would make the loss mask hide the real EOS; the model would never stop.
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def load_causal_lm(model_cfg: Any, tokenizer, seed: int):
    """The policy model: `tiny` is built from its config (weights from `seed`), anything else loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    base = adapter_base_config(model_cfg)
    if base is not None:
        return _merge_adapter(model_cfg.path, lambda: load_causal_lm(base, tokenizer, seed))
    kwargs = {"attn_implementation": model_cfg.attn_implementation, "dtype": torch.float32}
    if model_cfg.path == TINY:
        config = AutoConfig.from_pretrained(TINY_DIR, **kwargs)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = _from_pretrained(AutoModelForCausalLM, model_cfg.path, model_cfg, **kwargs)
    _fit_embeddings(model, tokenizer, model_cfg.path)
    model.config.pad_token_id = tokenizer.pad_token_id
    _padding_free(model, model_cfg)
    if model_cfg.gradient_checkpointing:
        _enable_activation_checkpointing(model)
    return model


def _fit_embeddings(model, tokenizer, path: str) -> None:
    """Give the pad token this package added an embedding row. Any other token id beyond a loaded model's
    embeddings means a tokenizer of another model: training would give those tokens fresh random rows
    (`tiny` is all fresh rows, so it grows to any tokenizer)."""
    rows = model.get_input_embeddings().num_embeddings
    foreign = [token for token in tokenizer.convert_ids_to_tokens(list(range(rows, len(tokenizer)))) if token != PAD_TOKEN]
    if foreign and path != TINY:
        raise UserError(f"model.path={path}: the tokenizer has {len(tokenizer)} tokens but the model embeds only {rows} "
                        f"(first unknown: {foreign[0]!r}); the tokenizer belongs to another model")
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))


def apply_lora(model, model_cfg: Any, task_type: str = "CAUSAL_LM"):
    """The model with LoRA adapters (peft) on `model.lora.target_modules` when `model.lora.r > 0`, else as is.

    Only the adapters train; the base weights are frozen. With task_type SEQ_CLS (a reward model) peft
    also trains the `score` head in full (its `modules_to_save`): a new head has nothing to adapt.
    """
    lora_cfg = model_cfg.lora
    if lora_cfg.r == 0:
        return model
    if not lora_cfg.merge and adapter_base_config(model_cfg) is not None:
        # transformers loads an adapter whose base is a model directory or hub id, not one whose base is
        # another adapter; a final/ of that form would load only through this package.
        raise UserError(
            f"model.lora.merge=false: the start model {model_cfg.path} is itself a LoRA adapter, so an adapter "
            "trained on top of it would not load with from_pretrained; set model.lora.merge=true"
        )
    peft = _import_peft("model.lora.r > 0")
    targets = lora_cfg.target_modules
    config = peft.LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                             target_modules=targets[0] if targets == ["all-linear"] else list(targets), task_type=task_type)
    try:
        adapted = peft.get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"model.lora.target_modules: {list(targets)}: {exc}") from None
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    log.info(f"LoRA r={lora_cfg.r}: {trainable:,} trainable parameters of {count_parameters(adapted):,}")
    return adapted


class AdapterDisabled:
    """A LoRA policy's base model as the frozen reference: the same weights with the adapters switched
    off, so the reference costs no second copy in memory. Called like a model, never with gradients."""

    def __init__(self, policy):
        self.policy = policy

    @property
    def config(self):
        return self.policy.config

    def __call__(self, **inputs):
        import torch

        with torch.no_grad(), self.policy.disable_adapter():
            return self.policy(**inputs)


def load_reference(model_cfg: Any, path: str, policy, tokenizer, seed: int, device):
    """The frozen reference: the LoRA policy's base when it starts from the same weights, else a model of its own."""
    if model_cfg.lora.r > 0 and path == model_cfg.path:
        return AdapterDisabled(policy)
    reference = load_causal_lm(dataclasses.replace(model_cfg, path=path), tokenizer, seed=seed)
    return reference.to(device).eval().requires_grad_(False)


def without_adapters(model):
    """The model to save as final/: LoRA adapters merged into the base weights (plain transformers)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def base_model_reference(path: str) -> str:
    """How an adapter names its base: an absolute path for a local directory, so it loads from any working directory."""
    return str(Path(path).resolve()) if Path(path).is_dir() else path


def save_adapter(model, directory: Path, model_cfg: Any) -> None:
    """The LoRA adapter alone (adapter_config.json, adapter_model.safetensors), naming `model.path` as its base.

    Plain transformers loads such a directory (with peft installed) by loading the base it names and
    injecting the adapter, and so does every stage here (merged). Two bases cannot be named this way,
    so they are refused before training: the built-in `tiny` model, whose weights are drawn from
    `train.seed` and exist on no disk (config validation), and a start model that is itself an adapter
    (`apply_lora`), which transformers cannot load as a base.
    """
    config = model.peft_config["default"]
    config.base_model_name_or_path = base_model_reference(model_cfg.path)
    config.revision = model_cfg.revision
    model.save_pretrained(directory, safe_serialization=True)


def adapter_base_config(model_cfg: Any) -> Optional[Any]:
    """The model config of the base of the LoRA adapter in directory `model_cfg.path`; None when it holds no adapter.

    The adapter must still fit its base: when both are final/ of runs here, the adapter's manifest
    records the base run's id, and a base trained again since is refused.
    """
    path = model_cfg.path
    if path is None or path == TINY or not (Path(path) / ADAPTER_CONFIG).is_file():
        return None
    config_file = Path(path) / ADAPTER_CONFIG
    try:
        recorded = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{config_file}: not JSON") from None
    base = recorded.get("base_model_name_or_path") if isinstance(recorded, dict) else None
    if not base:
        raise UserError(f"{config_file}: names no base_model_name_or_path, so the adapter cannot be loaded")
    if looks_local(base) and not Path(base).is_dir():
        raise UserError(f"{path}: a LoRA adapter of {base}, which is not an existing directory (restore the base model there)")
    trained_on = _manifest_of_final(path).get("base_model") or {}
    base_now = _manifest_of_final(base)
    if trained_on.get("run_id") and base_now.get("run_id") and trained_on["run_id"] != base_now["run_id"]:
        raise UserError(
            f"{path}: a LoRA adapter trained on {base} as it was at {trained_on.get('finished_at')}, since rerun "
            f"({base_now.get('finished_at')}); the adapter no longer fits its base: train it again from the new one"
        )
    return dataclasses.replace(model_cfg, path=base, revision=recorded.get("revision"))


def _manifest_of_final(path: str) -> dict[str, Any]:
    """The manifest of the run whose final/ `path` is; empty for any other directory."""
    return (RunDir(Path(path).parent).read_manifest() or {}) if Path(path).name == "final" else {}


def _merge_adapter(adapter_dir: str, load_base: Callable[[], Any]):
    """The model `load_base()` returns with the LoRA adapter of `adapter_dir` merged into its weights,
    every weight trainable again."""
    peft = _import_peft(f"{adapter_dir} (a LoRA adapter)")
    try:
        base_model = load_base()
    except UserError as exc:
        raise UserError(f"{adapter_dir}: the base model of this LoRA adapter does not load: {exc}") from None
    config = peft.PeftConfig.from_pretrained(adapter_dir)
    # The generic PeftModel (no task type) applies an adapter under any head, so a causal-LM adapter
    # (an adapter-only sft/final) also starts a reward model.
    config.task_type = None
    try:
        merged = peft.PeftModel.from_pretrained(base_model, adapter_dir, config=config).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"{adapter_dir}: the LoRA adapter does not fit its base model: {str(exc).strip().splitlines()[0]}") from None
    # peft loads an adapter for inference and freezes the base; the caller decides what trains.
    return merged.requires_grad_(True)


def _import_peft(needed_by: str):
    try:
        import peft
    except ImportError:
        raise UserError(f'{needed_by} needs peft: pip install -e ".[lora]" (or pip install peft)') from None
    return peft


def load_reward_model(model_cfg: Any, tokenizer, seed: int):
    """A scalar-headed AutoModelForSequenceClassification (num_labels=1), read at the last non-pad token.

    Started from a causal LM (an sft/final), the new head is drawn from N(0, 1/sqrt(d+1)) as in
    Ziegler et al. 2019, rather than transformers' default.
    """
    import math

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    base = adapter_base_config(model_cfg)
    if base is not None:
        # The base gets its head first (fresh, or its own); a reward model's adapter carries its trained head.
        return _merge_adapter(model_cfg.path, lambda: load_reward_model(base, tokenizer, seed))
    kwargs = {"attn_implementation": model_cfg.attn_implementation, "dtype": torch.float32, "num_labels": 1}
    if model_cfg.path == TINY:
        config = AutoConfig.from_pretrained(TINY_DIR, **kwargs)
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config)
        fresh_head = True
    else:
        source_config = _from_pretrained(AutoConfig, model_cfg.path, model_cfg)
        fresh_head = not any("SequenceClassification" in a for a in (source_config.architectures or []))
        torch.manual_seed(seed)
        model = _from_pretrained(AutoModelForSequenceClassification, model_cfg.path, model_cfg, **kwargs)
    _fit_embeddings(model, tokenizer, model_cfg.path)
    # Without it the score is read at the wrong position (TRL issue 937).
    model.config.pad_token_id = tokenizer.pad_token_id
    head = getattr(model, "score", None)
    if fresh_head and isinstance(head, torch.nn.Linear):
        torch.nn.init.normal_(head.weight, std=1 / math.sqrt(model.config.hidden_size + 1))
        if head.bias is not None:
            torch.nn.init.zeros_(head.bias)
    _padding_free(model, model_cfg)
    if model_cfg.gradient_checkpointing:
        _enable_activation_checkpointing(model)
    return model


def _padding_free(model, model_cfg: Any) -> None:
    """Segment attention (rlhf_cli/models/padding_free.py) when the config asks for it and the model can take it."""
    from rlhf_cli.models.padding_free import use_segment_attention

    if getattr(model_cfg, "padding_free", False):
        unsupported = use_segment_attention(model)
        if unsupported:
            log.info(f"model.padding_free: padded batches, {unsupported}")


CAUSAL_LM = "causal_lm"  # a policy: generates
REWARD_MODEL = "reward_model"  # a sequence-classification model with a scalar head (train-rm's final/)
_ADAPTER_KINDS = {"CAUSAL_LM": CAUSAL_LM, "SEQ_CLS": REWARD_MODEL}


def model_kind(model_cfg: Any, key: str = "model.path") -> str:
    """CAUSAL_LM or REWARD_MODEL: what the directory or hub id `model.path` holds, read from its config's
    architectures, or for a LoRA adapter from its task type. Loading a reward model as a causal LM (or the
    reverse) would not fail, it would draw a fresh head, so callers check this first. `key` names the path in errors."""
    if model_cfg.path == TINY:
        return CAUSAL_LM
    adapter_file = Path(model_cfg.path) / ADAPTER_CONFIG
    if adapter_file.is_file():
        task_type = json.loads(adapter_file.read_text(encoding="utf-8")).get("task_type")
        if task_type not in _ADAPTER_KINDS:
            raise UserError(f"{key}: {model_cfg.path} is a LoRA adapter of task type {task_type}, neither CAUSAL_LM nor SEQ_CLS (a reward model)")
        return _ADAPTER_KINDS[task_type]
    from transformers import AutoConfig

    architectures = _from_pretrained(AutoConfig, model_cfg.path, model_cfg).architectures or []
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return REWARD_MODEL
    # A config that names no architecture is taken for a causal LM, as every stage takes the model it is given.
    if not architectures or any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        return CAUSAL_LM
    raise UserError(f"{key}: {model_cfg.path} is a {', '.join(architectures)}, neither a causal LM nor a sequence-classification reward model")


def _from_pretrained(factory: Any, source: str, model_cfg: Any, **kwargs: Any):
    local = Path(source)
    if not local.exists() and looks_local(source):
        raise UserError(f"model.path={source}: no such directory")
    if local.exists() and not local.is_dir():
        raise UserError(f"model.path={source}: not a directory (a model directory holds config.json)")
    if local.is_dir() and not (local / "config.json").is_file() and not (local / ADAPTER_CONFIG).is_file():
        raise UserError(f"model.path={source}: no config.json (nor {ADAPTER_CONFIG}) here, so not a model directory")
    if (local / "config.json").is_file():
        _check_json_object(local / "config.json")
    part = _PARTS.get(factory.__name__, "the weights")
    try:
        return factory.from_pretrained(
            source,
            revision=model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
            **kwargs,
        )
    except OSError as exc:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model.path={source}: cannot load{offline}: {reason}") from None
    except pickle.UnpicklingError:
        # torch.load(weights_only=True) met a pickle that would run code or build objects; never load such a file.
        raise UserError(f"model.path={source}: {part} hold pickled objects beyond tensors, which could run code on "
                        "loading; refused (save the model as safetensors)") from None
    except SafetensorError as exc:
        raise UserError(f"model.path={source}: {part} are not a readable safetensors file: {exc}") from None
    except RuntimeError as exc:
        if "ignore_mismatched_sizes" not in str(exc):
            raise
        raise UserError(f"model.path={source}: {part} do not have the shapes its config.json describes "
                        "(weights and config.json of different models?)") from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(f"model.path={source}: needs model.trust_remote_code=true to load its own code") from None
        raise UserError(f"model.path={source}: {part}: {str(exc).strip().splitlines()[0]}") from None


def _check_json_object(path: Path) -> None:
    """transformers reports a config.json that is not a JSON object as a hub problem or a TypeError."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not a JSON object, found {type(value).__name__}")


def _enable_activation_checkpointing(model) -> None:
    # transformers 5 renamed gradient_checkpointing_enable; older releases only have the old name.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def forward_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of a training or scoring forward from a collated batch.

    No KV cache: with one, transformers skips the per-sample attention it derives from the position
    ids of packed rows, and attention would leak across samples.
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "segments") if k in batch}
    return inputs | {"use_cache": False}


@dataclasses.dataclass
class KeptForward:
    """A forward whose outputs are read at some positions only, planned on the host (`plan_kept`)
    before its tensors go to the device: on a GPU, planning there would wait for its queued kernels."""

    inputs: dict[str, Any]  # the model's keyword arguments
    kept: Any  # (K,) the positions of a (1, N) row that are read, ascending (logits_to_keep); a padded batch's (B, T) mask
    order: Any = None  # index into the K kept outputs that gives the caller's order and shape; None: as kept

    def to(self, device: Any) -> "KeptForward":
        import torch

        def moved(value: Any) -> Any:
            if isinstance(value, torch.Tensor):  # non-blocking: a copy from the host need not wait for the device's queue
                return value.to(device, non_blocking=True)
            return value.to(device) if hasattr(value, "to") else value  # segments; flags

        return KeptForward({k: moved(v) for k, v in self.inputs.items()}, moved(self.kept), moved(self.order))


def plan_kept(inputs: dict[str, Any], keep) -> KeptForward:
    """The forward of `inputs` that computes the True positions of keep (B, T) only, in row-major order.
    The LM head runs on those positions alone (transformers' logits_to_keep), which with a large
    vocabulary is much of a forward's work and most of its memory. In a padding-free row, the prefixes
    that samples share run once, and the model does not run the positions no kept output reads (each
    sample's tokens after its last kept position). Runs on the host: give it the batch before it
    moves to the device."""
    import torch

    if inputs.get("segments") is None or keep.size(0) != 1:
        return KeptForward(inputs, keep)
    order = None
    inputs, moved_to = share_prefixes(inputs)
    if moved_to is not None:
        kept_at = moved_to[keep[0]]
        keep = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
        keep[0, kept_at] = True
        order = (keep[0].cumsum(0) - 1)[kept_at]  # samples that share a kept position read the same outputs
    needed = inputs["segments"].read_by(keep[0])
    if 0 < int(needed.sum()) < needed.numel():
        inputs = _positions(inputs, needed) | {"segments": inputs["segments"].narrowed(needed)}
        keep = keep[:, needed]
    return KeptForward(inputs, keep[0].nonzero().squeeze(1), order)


def kept_logits(model, plan: KeptForward):
    """(K, V) logits at the kept positions of `plan` (or in its order)."""
    return kept_outputs(model, plan)[0]


def kept_outputs(model, plan: KeptForward, hidden_states: bool = False):
    """kept_logits, and with `hidden_states` the (K, H) last hidden states at the same positions from
    the same forward (a value head's input); None without it."""
    output = model(**plan.inputs, logits_to_keep=plan.kept, output_hidden_states=hidden_states)
    logits = _at_kept(output.logits, plan.kept)
    hidden = _at_kept(output.hidden_states[-1], plan.kept) if hidden_states else None
    if plan.order is None:
        return logits, hidden
    return logits[plan.order], None if hidden is None else hidden[plan.order]


def kept_hidden_states(body, plan: KeptForward):
    """(K, H) last hidden states of a transformer body (`backbone`) at the kept positions of `plan`."""
    hidden = _at_kept(body(**plan.inputs).last_hidden_state, plan.kept)
    return hidden if plan.order is None else hidden[plan.order]


def _at_kept(per_position, kept):
    """The (K, D) outputs at the kept positions, from a forward given logits_to_keep=kept, also from a
    model (or an output) that ignores it. Indexing, not masking: a mask's count would be read on the host."""
    if kept.dim() == 1:
        return per_position[0] if per_position.size(1) == kept.numel() else per_position[0, kept]
    return selected_logits(per_position, kept)


def share_prefixes(inputs: dict[str, Any]):
    """The inputs of a padding-free (1, N) row in which the prefixes its samples share run once, and
    the (N,) new position of each old one (None, with the inputs as they are, when none is shared)."""
    from rlhf_cli.models.padding_free import shared_prefixes

    shared = shared_prefixes(inputs["segments"], inputs["input_ids"][0])
    if shared is None:
        return inputs, None
    return _positions(inputs, shared.survivors) | {"segments": shared.segments}, shared.moved_to


def _positions(inputs: dict[str, Any], which) -> dict[str, Any]:
    """The (1, N) tensors of a row's inputs at positions `which` (a mask, or indices in their new order)."""
    import torch

    return {k: v[:, which] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def selected_logits(logits, keep):
    """The (K, V) logits of a forward given logits_to_keep=keep (B, T), also from a model that ignores it."""
    return logits if logits.dim() == 2 else logits[keep]


def backbone(model):
    """The transformer body of a task model (hidden states, no head), also inside a peft wrapper."""
    inner = _without_peft_wrapper(model)
    return getattr(inner, inner.base_model_prefix)


def score_head(model, who: str = "model"):
    """The scalar head of a sequence-classification model (`score`, or `classifier`), also inside a peft wrapper."""
    import torch

    inner = _without_peft_wrapper(model)
    for name in ("score", "classifier"):
        head = getattr(inner, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise UserError(f"{who}: {type(inner).__name__} has no `score` head to read per-token values from")


def _without_peft_wrapper(model):
    """The transformers model inside a PeftModel (its LoRA layers in place), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def count_parameters(model, trainable_only: bool = False) -> int:
    """All (or the trainable) parameters, also those ZeRO-3 has partitioned away (ds_numel is a
    parameter's full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)

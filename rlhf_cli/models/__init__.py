"""Model and tokenizer loading: a hub id, a local directory, or the built-in `tiny` preset."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rlhf_cli.data.sources import looks_local
from rlhf_cli.errors import UserError

TINY = "tiny"
TINY_DIR = Path(__file__).resolve().parent / "tiny"

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

    source = str(TINY_DIR) if model_cfg.path == TINY else model_cfg.path
    tokenizer = _from_pretrained(AutoTokenizer, source, model_cfg)
    if tokenizer.eos_token is None:
        raise UserError(f"model.path={model_cfg.path}: the tokenizer defines no EOS token")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # A pad equal to EOS would make the loss mask hide the real EOS; the model would never stop.
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    if not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def load_causal_lm(model_cfg: Any, tokenizer, seed: int):
    """The policy model: `tiny` is built from its config (weights from `seed`), anything else loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"attn_implementation": model_cfg.attn_implementation, "dtype": torch.float32}
    if model_cfg.path == TINY:
        config = AutoConfig.from_pretrained(TINY_DIR, **kwargs)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = _from_pretrained(AutoModelForCausalLM, model_cfg.path, model_cfg, **kwargs)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if model_cfg.gradient_checkpointing:
        _enable_activation_checkpointing(model)
    return model


def apply_lora(model, lora_cfg: Any):
    """The model with LoRA adapters (peft) on `lora_cfg.target_modules` when `lora_cfg.r > 0`, else as is.
    Only the adapters train; the base weights are frozen."""
    if lora_cfg.r == 0:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError('model.lora.r > 0 needs peft: pip install -e ".[lora]" (or pip install peft)') from None
    targets = lora_cfg.target_modules
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=targets[0] if targets == ["all-linear"] else list(targets), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"model.lora.target_modules: {list(targets)}: {exc}") from None


class AdapterDisabled:
    """A LoRA policy's base model as the frozen reference: the same weights with the adapters switched
    off, so the reference costs no second copy in memory. Called like a model, never with gradients."""

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, **inputs):
        import torch

        with torch.no_grad(), self.policy.disable_adapter():
            return self.policy(**inputs)


def load_reference(model_cfg: Any, path: str, policy, tokenizer, seed: int, device):
    """The frozen reference: the LoRA policy's base when it starts from the same weights, else a model of its own."""
    import dataclasses

    if model_cfg.lora.r > 0 and path == model_cfg.path:
        return AdapterDisabled(policy)
    reference = load_causal_lm(dataclasses.replace(model_cfg, path=path), tokenizer, seed=seed)
    return reference.to(device).eval().requires_grad_(False)


def without_adapters(model):
    """The model to save as final/: LoRA adapters merged into the base weights (plain transformers)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def load_reward_model(model_cfg: Any, tokenizer, seed: int):
    """A scalar-headed AutoModelForSequenceClassification (num_labels=1), read at the last non-pad token.

    Started from a causal LM (an sft/final), the new head is drawn from N(0, 1/sqrt(d+1)) as in
    Ziegler et al. 2019, rather than transformers' default.
    """
    import math

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

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
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    # Without it the score is read at the wrong position (TRL issue 937).
    model.config.pad_token_id = tokenizer.pad_token_id
    head = getattr(model, "score", None)
    if fresh_head and isinstance(head, torch.nn.Linear):
        torch.nn.init.normal_(head.weight, std=1 / math.sqrt(model.config.hidden_size + 1))
        if head.bias is not None:
            torch.nn.init.zeros_(head.bias)
    if model_cfg.gradient_checkpointing:
        _enable_activation_checkpointing(model)
    return model


def _from_pretrained(factory: Any, source: str, model_cfg: Any, **kwargs: Any):
    local = Path(source)
    if not local.exists() and looks_local(source):
        raise UserError(f"model.path={source}: no such directory")
    if local.exists() and not local.is_dir():
        raise UserError(f"model.path={source}: not a directory (a model directory holds config.json)")
    if local.is_dir() and not (local / "config.json").is_file():
        raise UserError(f"model.path={source}: no config.json here, so not a model directory")
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
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(f"model.path={source}: needs model.trust_remote_code=true to load its own code") from None
        raise UserError(f"model.path={source}: {str(exc).strip().splitlines()[0]}") from None


def _enable_activation_checkpointing(model) -> None:
    # transformers 5 renamed gradient_checkpointing_enable; older releases only have the old name.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def forward_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of a training or scoring forward from a collated batch.

    No KV cache: with one, transformers skips the per-sample attention it derives from the position
    ids of packed rows, and attention would leak across samples.
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    return inputs | {"use_cache": False}


def count_parameters(model) -> int:
    """All parameters, also those ZeRO-3 has partitioned away (ds_numel is a parameter's full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())

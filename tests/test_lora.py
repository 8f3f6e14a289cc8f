"""LoRA (peft) for the causal-LM stages: adapters train, final/ holds merged weights, and the reference
of dpo, grpo and ppo is the policy with its adapters switched off, not a second model."""

import json
import sys

import pytest

from tests.conftest import read_jsonl, write_jsonl

LORA = ["model.lora.r=4", "model.lora.alpha=8"]
PAIRS = [{"prompt": f"Q: {i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(12)]
PROMPTS = [{"prompt": f"Q: {i}+1=", "answer": str(i + 1)} for i in range(8)]


@pytest.fixture
def reference_loads(monkeypatch):
    """Counts the reference models loaded from disk (load_reference's own load_causal_lm calls)."""
    import rlhf_cli.models as models

    calls = []
    original = models.load_causal_lm

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(models, "load_causal_lm", counting)
    return calls


def test_sft_with_lora_trains_adapters_and_saves_merged_weights(rlhf, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rlhf_cli.config.schema import ModelConfig
    from rlhf_cli.models import load_causal_lm, load_tokenizer

    args = ["sft", "model.path=tiny", "train.max_steps=4", "train.batch_size=4", "eval.generate=0", "eval.max_samples=4",
            "train.lr=0.01", "train.save_every=2", "train.seed=7"]
    assert rlhf(*args, *LORA).exit_code == 0
    checkpoint = load_file(tmp_path / "runs/default/sft/checkpoints/step-2/model.safetensors")
    assert any("lora_A" in name for name in checkpoint)
    final_dir = tmp_path / "runs/default/sft/final"
    final = load_file(final_dir / "model.safetensors")
    assert not any("lora" in name for name in final)
    trained = AutoModelForCausalLM.from_pretrained(final_dir).state_dict()
    start = load_causal_lm(ModelConfig(path="tiny"), load_tokenizer(ModelConfig(path="tiny")), seed=7).state_dict()
    # Adapted linear layers moved (adapters merged in); everything else is the frozen start.
    assert not torch.equal(trained["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(trained["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    assert torch.equal(trained["model.layers.0.input_layernorm.weight"], start["model.layers.0.input_layernorm.weight"])


def test_dpo_with_lora_uses_the_policy_without_adapters_as_reference(rlhf, tmp_path, reference_loads):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    args = ["dpo", "model.path=tiny", f"data.train={data}", "data.eval=null", "data.eval_size=0", "eval.generate=0",
            "train.max_steps=3", "train.batch_size=4", "train.log_every=1", "train.lr=1e-2", "train.warmup_ratio=0"]
    assert rlhf(*args, "output_dir=full").exit_code == 0
    assert len(reference_loads) == 1
    result = rlhf(*args, *LORA, "output_dir=lora")
    assert result.exit_code == 0, result.output
    assert len(reference_loads) == 1  # no second model for the LoRA run
    assert "reference the policy without adapters" in result.output
    first = read_jsonl(tmp_path / "lora/metrics.jsonl")[0]
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)  # step 1 starts at the reference itself
    assert read_jsonl(tmp_path / "lora/metrics.jsonl")[-1]["rewards/chosen"] != pytest.approx(0.0, abs=1e-6)


def test_grpo_and_ppo_with_lora(rlhf, tmp_path, reference_loads):
    from rlhf_cli.config.schema import ModelConfig
    from rlhf_cli.models import load_reward_model, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(path="tiny"))
    load_reward_model(ModelConfig(path="tiny"), tokenizer, seed=1).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    common = ["model.path=tiny", f"data.train={data}", "train.max_steps=2", "train.batch_size=2", "eval.generate=0",
              "rollout.max_new_tokens=4", *LORA]
    grpo = rlhf("grpo", *common, "grpo.num_generations=2", "grpo.beta=0.1")
    assert grpo.exit_code == 0, grpo.output
    ppo = rlhf("ppo", *common, f"reward.path={tmp_path / 'rm'}", "ppo.critic_warmup_steps=0")
    assert ppo.exit_code == 0, ppo.output
    assert reference_loads == []
    manifest = json.loads((tmp_path / "runs/default/ppo/manifest.json").read_text())
    assert manifest["config"]["model"]["lora"]["r"] == 4


def test_lora_settings_are_checked(rlhf):
    result = rlhf("train-rm", "model.path=tiny", "model.lora.r=4")
    assert result.exit_code == 2 and "model.lora.r: 4 LoRA is not available for train-rm yet" in result.output
    result = rlhf("sft", "model.lora.dropout=1.5")
    assert result.exit_code == 2 and "model.lora.dropout: 1.5 must be in [0, 1)" in result.output


def test_lora_without_peft_says_how_to_install_it(rlhf, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    result = rlhf("sft", "model.path=tiny", "train.max_steps=1", "train.batch_size=2", "eval.generate=0", *LORA)
    assert result.exit_code == 2
    assert 'model.lora.r > 0 needs peft: pip install -e ".[lora]"' in result.output

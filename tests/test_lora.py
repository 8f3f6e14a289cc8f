"""LoRA (peft) in every stage: adapters train (and a reward model's score head), final/ holds merged
weights or with model.lora.merge=false the adapter alone, which the next stage loads on its base; the
reference of dpo, grpo and ppo is the policy with its adapters switched off, not a second model."""

import json
import sys

import pytest

from tests.conftest import read_jsonl, write_jsonl

LORA = ["model.lora.r=4", "model.lora.alpha=8"]
PAIRS = [{"prompt": f"Q: {i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(12)]
PROMPTS = [{"prompt": f"Q: {i}+1=", "answer": str(i + 1)} for i in range(8)]
PAIR_STEPS = ["data.eval=null", "data.eval_size=0", "train.max_steps=3", "train.batch_size=4", "train.log_every=1",
              "train.lr=1e-2", "train.warmup_ratio=0", "eval.max_samples=4"]
PPO_STEPS = ["train.max_steps=2", "train.batch_size=2", "eval.generate=0", "rollout.max_new_tokens=4", "ppo.critic_warmup_steps=0"]
IDS = [[5, 6, 7, 8, 9]]


@pytest.fixture
def reference_loads(monkeypatch):
    """Counts the reference models loaded from disk (load_reference's own load_causal_lm calls)."""
    import inspect

    import rlhf_cli.models as models

    calls = []
    original = models.load_causal_lm

    def counting(*args, **kwargs):
        # A stage module first imported after this patch takes it too: count load_reference's calls alone.
        if inspect.currentframe().f_back.f_code.co_name == "load_reference":
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
    result = rlhf("sft", "model.lora.dropout=1.5")
    assert result.exit_code == 2 and "model.lora.dropout: 1.5 must be in [0, 1)" in result.output
    result = rlhf("sft", "model.path=tiny", "model.lora.merge=false", *LORA)
    assert result.exit_code == 2
    assert "model.lora.merge: False saves only the adapter, but the base weights of model.path=tiny are drawn" in result.output


def test_lora_without_peft_says_how_to_install_it(rlhf, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    result = rlhf("sft", "model.path=tiny", "train.max_steps=1", "train.batch_size=2", "eval.generate=0", *LORA)
    assert result.exit_code == 2
    assert 'model.lora.r > 0 needs peft: pip install -e ".[lora]"' in result.output


def test_train_rm_with_lora_trains_adapters_and_the_score_head_and_feeds_ppo(rlhf, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from rlhf_cli.config.schema import ModelConfig
    from rlhf_cli.models import load_reward_model, load_tokenizer

    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    result = rlhf("train-rm", "model.path=tiny", f"data.train={pairs}", *PAIR_STEPS, "train.save_every=2", "train.seed=3", *LORA)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs/default/rm"
    assert any("lora_A" in name for name in load_file(run / "checkpoints/step-2/model.safetensors"))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["final_format"] == "merged"
    assert manifest["parameters"]["trainable"] < manifest["parameters"]["total"] / 10
    trained = AutoModelForSequenceClassification.from_pretrained(run / "final").state_dict()
    assert not any("lora" in name for name in trained)
    start = load_reward_model(ModelConfig(path="tiny"), load_tokenizer(ModelConfig(path="tiny")), seed=3).state_dict()
    # Adapters merged into the linear layers, the whole head trained, everything else the frozen start.
    assert not torch.equal(trained["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(trained["score.weight"], start["score.weight"])
    assert torch.equal(trained["model.embed_tokens.weight"], start["model.embed_tokens.weight"])

    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    ppo = rlhf("ppo", "model.path=tiny", f"data.train={prompts}", *PPO_STEPS)  # reward model and critic: rm/final
    assert ppo.exit_code == 0, ppo.output
    parents = json.loads((tmp_path / "runs/default/ppo/manifest.json").read_text())["parents"]
    assert parents["reward"]["stage"] == parents["critic"]["stage"] == "train-rm"


def test_adapter_only_sft_final_loads_with_transformers_and_chains_into_dpo(rlhf, tmp_path, saved_tiny):
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_cli.config.schema import ModelConfig
    from rlhf_cli.models import load_causal_lm, load_tokenizer

    sft = rlhf("sft", f"model.path={saved_tiny}", "train.max_steps=3", "train.batch_size=4", "eval.generate=0",
               "eval.max_samples=4", "train.lr=0.01", "model.lora.merge=false", *LORA)
    assert sft.exit_code == 0, sft.output
    final = tmp_path / "runs/default/sft/final"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    assert not (final / "model.safetensors").exists()
    manifest = json.loads((final.parent / "manifest.json").read_text())
    assert manifest["final_format"] == "adapter" and manifest["base_model"]["path"] == str(saved_tiny.resolve())

    # transformers (with peft) loads the base the adapter names and injects it; the stages load it merged.
    ids = torch.tensor(IDS)
    plain = AutoModelForCausalLM.from_pretrained(final)
    merged = load_causal_lm(ModelConfig(path=str(final)), load_tokenizer(ModelConfig(path=str(final))), seed=0)
    base = AutoModelForCausalLM.from_pretrained(saved_tiny)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(base(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-3)

    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    dpo = ["dpo", f"data.train={pairs}", *PAIR_STEPS, "eval.generate=0"]
    chained = rlhf(*dpo, *LORA, "output_dir=dpo_lora")  # a new adapter on the merged sft model; reference: adapters off
    assert chained.exit_code == 0, chained.output
    explicit = rlhf(*dpo, f"model.path={final}", f"ref.path={final}", "output_dir=dpo_full")  # every weight trains
    assert explicit.exit_code == 0, explicit.output
    for run in ("dpo_lora", "dpo_full"):
        logged = read_jsonl(tmp_path / run / "metrics.jsonl")
        assert logged[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)  # the reference is the start policy
        assert logged[-1]["rewards/chosen"] != pytest.approx(0.0, abs=1e-4)  # and the policy moved away from it


def test_adapter_only_reward_model_loads_with_transformers_and_feeds_ppo(rlhf, tmp_path, saved_tiny):
    import torch
    from transformers import AutoModelForSequenceClassification

    from rlhf_cli.config.schema import ModelConfig
    from rlhf_cli.models import load_reward_model, load_tokenizer

    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    rm = rlhf("train-rm", f"model.path={saved_tiny}", f"data.train={pairs}", *PAIR_STEPS, "model.lora.merge=false", *LORA)
    assert rm.exit_code == 0, rm.output
    final = tmp_path / "runs/default/rm/final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()

    # The base's config has no num_labels, so transformers needs it; the trained head comes from the adapter.
    ids = torch.tensor(IDS)
    plain = AutoModelForSequenceClassification.from_pretrained(final, num_labels=1)
    merged = load_reward_model(ModelConfig(path=str(final)), load_tokenizer(ModelConfig(path=str(final))), seed=5)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)

    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    ppo = rlhf("ppo", f"model.path={saved_tiny}", f"data.train={prompts}", *PPO_STEPS)  # reward model and critic: rm/final
    assert ppo.exit_code == 0, ppo.output


def test_an_adapter_that_cannot_be_loaded_honestly_is_refused(rlhf, tmp_path, saved_tiny):
    import shutil

    quick = ["train.max_steps=1", "train.batch_size=4", "eval.generate=0", "eval.max_samples=4"]
    assert rlhf("sft", f"model.path={saved_tiny}", *quick, "model.lora.merge=false", *LORA, "output_dir=adapter").exit_code == 0
    adapter = tmp_path / "adapter/final"

    # An adapter on top of an adapter would name an adapter as its base, which transformers cannot load.
    result = rlhf("sft", f"model.path={adapter}", *quick, "model.lora.merge=false", *LORA, "output_dir=twice")
    assert result.exit_code == 2
    assert f"model.lora.merge=false: the start model {adapter} is itself a LoRA adapter" in result.output

    # A base trained again since the adapter was: the adapter's manifest records the base run's id.
    assert rlhf("sft", "model.path=tiny", *quick, "output_dir=sft").exit_code == 0
    assert rlhf("sft", f"model.path={tmp_path / 'sft/final'}", *quick, "model.lora.merge=false", *LORA, "output_dir=on_sft").exit_code == 0
    assert rlhf("sft", "model.path=tiny", *quick, "train.lr=0.002", "output_dir=sft", "resume=never").exit_code == 0
    result = rlhf("sft", f"model.path={tmp_path / 'on_sft/final'}", *quick, "output_dir=after")
    assert result.exit_code == 2 and "the adapter no longer fits its base" in result.output

    # A base that is gone: refused when the config is checked, or when a reward model is loaded.
    shutil.rmtree(saved_tiny)
    result = rlhf("sft", f"model.path={adapter}", *quick, "output_dir=gone")
    assert result.exit_code == 2
    assert f"error: model.path: {adapter}: a LoRA adapter of {saved_tiny}, which is not an existing directory" in result.output
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    result = rlhf("ppo", "model.path=tiny", f"reward.path={adapter}", f"data.train={prompts}", *PPO_STEPS)
    assert result.exit_code == 2 and f"a LoRA adapter of {saved_tiny}, which is not an existing directory" in result.output
    assert "Traceback" not in result.output

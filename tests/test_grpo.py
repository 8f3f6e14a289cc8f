"""`rlhf grpo` end to end on the built-in tiny model."""

import json

import pytest

from tests.conftest import read_jsonl, write_jsonl

GRPO_QUICK = ["model.path=tiny", "train.max_steps=2", "train.batch_size=2", "train.log_every=1", "grpo.num_generations=4",
              "rollout.max_new_tokens=4", "eval.generate=0"]
SPEC_METRICS = {"reward/mean", "reward/std", "kl", "clipfrac", "completion_length", "frac_reward_zero_std"}
PROMPTS = [{"prompt": f"Q: {i}+1=", "answer": str(i + 1)} for i in range(8)]


def test_trains_logs_the_spec_metrics_and_writes_a_loadable_final(rlhf, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    result = rlhf("grpo", f"data.train={data}", *GRPO_QUICK)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs/default/grpo"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert "reference" not in manifest["parents"]  # beta = 0 loads none
    logged = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in logged] == [1, 2]
    assert SPEC_METRICS | {"reward/exact_match"} <= set(logged[-1])
    assert 0 <= logged[-1]["reward/mean"] <= 1
    AutoModelForCausalLM.from_pretrained(run / "final")


@pytest.mark.parametrize(
    "variant",
    [
        ["grpo.advantage=rloo", "grpo.loss_agg=seq_mean_token_mean"],
        ["grpo.advantage=dr_grpo", "grpo.loss_agg=seq_mean_token_sum_norm", "grpo.epsilon_high=0.28"],
        ["grpo.beta=0.05", "grpo.kl_estimator=k1", "grpo.inner_updates=2", "train.grad_accum=2"],
        ["grpo.beta=0.05", "grpo.kl_estimator=k2", "grpo.filter_zero_std=true", "rollout.top_p=0.9", "rollout.temperature=0.7"],
    ],
)
def test_variants_train(rlhf, tmp_path, variant):
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    result = rlhf("grpo", f"data.train={data}", *GRPO_QUICK, *variant)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs/default/grpo"
    manifest = json.loads((run / "manifest.json").read_text())
    assert ("reference" in manifest["parents"]) == any(v.startswith("grpo.beta=") for v in variant)
    assert SPEC_METRICS <= set(read_jsonl(run / "metrics.jsonl")[-1])


@pytest.fixture
def spread_reward(tmp_path, monkeypatch):
    """Untrained, the model never answers right: a reward that varies with the text gives every group a spread."""
    (tmp_path / "spread_reward.py").write_text("def score(prompts, completions, examples):\n"
                                               "    return [float(sum(map(ord, c)) % 7) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "grpo.rewards=[{name:'spread_reward:score'}]"


def test_inner_updates_move_the_policy_off_its_rollout_policy(rlhf, tmp_path, spread_reward):
    """With mu = 2 the second update sees ratios away from 1; with mu = 1 none is ever clipped."""
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    args = ["grpo", f"data.train={data}", *GRPO_QUICK, "train.lr=0.05", "grpo.epsilon_low=0.01", "grpo.epsilon_high=0.01",
            spread_reward]
    assert rlhf(*args, "output_dir=mu1").exit_code == 0
    assert rlhf(*args, "output_dir=mu2", "grpo.inner_updates=2").exit_code == 0
    assert all(m["clipfrac"] == 0 for m in read_jsonl(tmp_path / "mu1/metrics.jsonl"))
    assert any(m["clipfrac"] > 0 for m in read_jsonl(tmp_path / "mu2/metrics.jsonl"))


def test_resumed_from_a_checkpoint_it_ends_with_the_weights_of_an_uninterrupted_run(rlhf, tmp_path, spread_reward):
    import torch
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    args = ["grpo", f"data.train={data}", *GRPO_QUICK, "train.max_steps=4", "train.save_every=2", "train.lr=1e-3", spread_reward]
    assert rlhf(*args, "output_dir=straight").exit_code == 0
    resumed = rlhf(*args, "output_dir=resumed", f"resume={tmp_path / 'straight/checkpoints/step-2'}")
    assert resumed.exit_code == 0, resumed.output
    start = load_file(tmp_path / "straight/checkpoints/step-2/model.safetensors")
    straight = load_file(tmp_path / "straight/final/model.safetensors")
    again = load_file(tmp_path / "resumed/final/model.safetensors")
    assert any(not torch.equal(start[name], straight[name]) for name in start if name in straight)
    for name in straight:
        torch.testing.assert_close(again[name], straight[name], atol=1e-6, rtol=0)


def test_gsm8k_rows_with_the_math_reward(rlhf, tmp_path):
    rows = [{"question": f"Tom has {i} apples and buys one more. How many now?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
            for i in range(6)]
    data = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    result = rlhf("grpo", f"data.train={data}", *GRPO_QUICK, "grpo.rewards=[{name:math},{name:format,pattern:'\\d+',weight:0.1}]")
    assert result.exit_code == 0, result.output
    last = read_jsonl(tmp_path / "runs/default/grpo/metrics.jsonl")[-1]
    assert {"reward/math", "reward/format"} <= set(last)


def test_chains_from_sft_and_evaluates_accuracy(rlhf, tmp_path):
    missing = rlhf("grpo", "train.max_steps=1")
    assert missing.exit_code != 0 and "run `rlhf sft` first" in missing.output
    assert rlhf("sft", "train.max_steps=2", "train.batch_size=4", "eval.generate=0", "eval.max_samples=4").exit_code == 0
    result = rlhf("grpo", "train.max_steps=2", "train.batch_size=2", "grpo.num_generations=2", "rollout.max_new_tokens=4",
                  "eval.generate=8", "eval.max_new_tokens=4", "grpo.beta=0.1")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "runs/default/grpo/manifest.json").read_text())
    assert manifest["parents"]["model"]["stage"] == manifest["parents"]["reference"]["stage"] == "sft"
    logged = read_jsonl(tmp_path / "runs/default/grpo/metrics.jsonl")
    assert [m["step"] for m in logged if "eval/accuracy" in m] == [0, 2]
    assert "eval/accuracy" in manifest["final_metrics"]


def test_reward_model_reward_from_a_train_rm_run(rlhf, tmp_path):
    assert rlhf("sft", "train.max_steps=1", "train.batch_size=4", "eval.generate=0", "eval.max_samples=4").exit_code == 0
    assert rlhf("train-rm", "train.max_steps=1", "train.batch_size=4", "eval.max_samples=4").exit_code == 0
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in PROMPTS])
    result = rlhf("grpo", f"data.train={data}", "train.max_steps=1", "train.batch_size=2", "grpo.num_generations=2",
                  "rollout.max_new_tokens=4", "eval.generate=0", "grpo.rewards=[{name:model,path:runs/default/rm/final}]")
    assert result.exit_code == 0, result.output
    assert "reward/model" in read_jsonl(tmp_path / "runs/default/grpo/metrics.jsonl")[-1]


@pytest.mark.parametrize(
    "args,expected",
    [
        (["grpo.num_generations=1"], "grpo.num_generations: 1 must be at least 2"),
        (["rollout.temperature=0"], "rollout.temperature: 0.0 must be positive"),
        (["grpo.loss_agg=mean"], "grpo.loss_agg: 'mean' is not one of seq_mean_token_mean, token_mean, seq_mean_token_sum_norm"),
        (["grpo.rewards=[{name:bleu}]"], "unknown reward 'bleu'"),
        (["grpo.rewards=[{name:format}]"], "the format reward needs a `pattern`"),
        (["grpo.rewards=[]"], "name at least one reward"),
        (["data.max_length=4"], "data.max_length: 4 must exceed rollout.max_new_tokens=4"),
    ],
)
def test_bad_settings_are_one_line_errors(rlhf, tmp_path, args, expected):
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    result = rlhf("grpo", f"data.train={data}", *GRPO_QUICK, *args)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs/default/grpo/final").exists()


def test_rows_without_a_prompt_name_the_line(rlhf, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [*PROMPTS[:2], {"text": "Q: 1+1="}])
    result = rlhf("grpo", f"data.train={data}", *GRPO_QUICK)
    assert result.exit_code == 2
    assert "prompts.jsonl:3: expected a `prompt` (or GSM8K `question`) field, found keys: text" in result.output


def test_a_rule_reward_on_rows_without_answers_names_the_row(rlhf, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in PROMPTS])
    result = rlhf("grpo", f"data.train={data}", *GRPO_QUICK)
    assert result.exit_code == 2
    assert "reward 'exact_match' needs an `answer` field" in result.output


def test_a_failing_user_reward_stops_the_run_with_its_name(rlhf, tmp_path, monkeypatch):
    (tmp_path / "bad_reward.py").write_text("def score(prompts, completions, examples):\n    raise ValueError('model server down')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    result = rlhf("grpo", f"data.train={data}", *GRPO_QUICK, "grpo.rewards=[{name:'bad_reward:score'}]")
    assert result.exit_code == 2
    assert "error: reward 'bad_reward:score' failed: ValueError: model server down" in result.output
    manifest = json.loads((tmp_path / "runs/default/grpo/manifest.json").read_text())
    assert manifest["status"] != "completed"
    assert not (tmp_path / "runs/default/grpo/final").exists()


def test_long_prompts_are_cut_dropped_or_refused(rlhf, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [*PROMPTS, {"prompt": "Q: " + "1+" * 40 + "1=", "answer": "41"}])
    common = ["grpo", f"data.train={data}", *GRPO_QUICK, "data.max_length=24"]
    refused = rlhf(*common, "data.truncation=error")
    assert refused.exit_code == 2 and "prompts.jsonl:9: prompt of 85 tokens" in refused.output
    dropped = rlhf(*common, "data.truncation=drop", "output_dir=dropped")
    assert dropped.exit_code == 0 and "1 dropped (first: " in dropped.output
    cut = rlhf(*common, "data.truncation=truncate", "output_dir=cut")
    assert cut.exit_code == 0 and "1 of 9 samples longer than data.max_length=24 were truncated" in cut.output


def test_under_bf16_pi_old_and_the_reference_are_computed_as_the_loss_computes_pi(rlhf, tmp_path):
    # With the weights left as they are (lr 1e-12 moves no float32 weight), pi_old and the reference are
    # the policy itself: computed under the same autocast, the ratio is exactly 1 and the KL exactly 0,
    # so the loss is the advantages' mean, 0; a float32 pi_old and reference would differ by rounding.
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    result = rlhf("grpo", f"data.train={data}", *GRPO_QUICK, "train.max_steps=1", "model.dtype=bf16", "grpo.beta=0.1",
                  "grpo.inner_updates=2", "train.lr=1e-12")
    assert result.exit_code == 0, result.output
    logged = read_jsonl(tmp_path / "runs/default/grpo/metrics.jsonl")[0]
    assert logged["kl"] == 0.0 and logged["loss"] == 0.0

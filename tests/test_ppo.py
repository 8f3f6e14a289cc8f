"""`rlhf ppo` end to end on the built-in tiny model."""

import json

import pytest

from tests.conftest import read_jsonl, write_jsonl

PPO_QUICK = ["train.max_steps=2", "train.batch_size=4", "train.log_every=1", "rollout.max_new_tokens=4", "eval.generate=0",
             "ppo.epochs=2", "ppo.num_mini_batches=2", "ppo.critic_warmup_steps=0"]
SPEC_METRICS = {"reward/mean", "kl", "loss/policy", "loss/value", "clipfrac", "entropy", "response_length",
                "value/explained_variance", "kl_coef", "approx_kl", "returns/mean"}
PROMPTS = [{"prompt": f"Q: {i}+1=", "answer": str(i + 1)} for i in range(8)]


@pytest.fixture
def reward_model_dir(tmp_path):
    """A tiny reward model saved like a train-rm final/, with the tiny tokenizer (or one with an extra token)."""
    from rlhf_cli.config.schema import ModelConfig
    from rlhf_cli.models import load_reward_model, load_tokenizer

    def save(name: str, extra_token: bool = False):
        tokenizer = load_tokenizer(ModelConfig(path="tiny"))
        if extra_token:
            tokenizer.add_tokens(["<extra>"])
        model = load_reward_model(ModelConfig(path="tiny"), tokenizer, seed=1)
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        return tmp_path / name

    return save


def test_chains_from_sft_and_train_rm_and_logs_the_spec_metrics(rlhf, tmp_path):
    from transformers import AutoModelForCausalLM

    missing = rlhf("ppo", "train.max_steps=1")
    assert missing.exit_code == 2 and "run `rlhf sft` first" in missing.output
    assert rlhf("sft", "train.max_steps=1", "train.batch_size=4", "eval.generate=0", "eval.max_samples=4").exit_code == 0
    no_rm = rlhf("ppo", "train.max_steps=1")
    assert no_rm.exit_code == 2 and "reward.path is null" in no_rm.output and "run `rlhf train-rm` first" in no_rm.output
    assert rlhf("train-rm", "train.max_steps=1", "train.batch_size=4", "eval.max_samples=4").exit_code == 0

    result = rlhf("ppo", *PPO_QUICK, "eval.generate=8", "eval.max_new_tokens=4")
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs/default/ppo"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    stages = {name: parent.get("stage") for name, parent in manifest["parents"].items()}
    assert stages == {"model": "sft", "reference": "sft", "reward": "train-rm", "critic": "train-rm"}
    logged = read_jsonl(run / "metrics.jsonl")
    assert SPEC_METRICS <= set(next(m for m in logged if m["step"] == 2 and "loss/policy" in m))
    assert {"eval/accuracy", "eval/reward"} <= set(logged[0]) and logged[0]["step"] == 0
    AutoModelForCausalLM.from_pretrained(run / "final")


@pytest.mark.parametrize("kind", ["separate", "head"])
def test_resumed_from_a_checkpoint_it_ends_with_the_weights_of_an_uninterrupted_run(rlhf, tmp_path, reward_model_dir, kind):
    import torch
    from safetensors.torch import load_file

    rm = reward_model_dir("rm")
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    args = ["ppo", "model.path=tiny", f"reward.path={rm}", f"data.train={data}", *PPO_QUICK, "train.max_steps=4", f"critic.kind={kind}",
            "train.save_every=2", "ppo.kl_target=0.01", "ppo.kl_horizon=10"]  # running reward moments: no RM manifest
    assert rlhf(*args, "output_dir=straight").exit_code == 0
    resumed = rlhf(*args, "output_dir=resumed", f"resume={tmp_path / 'straight/checkpoints/step-2'}")
    assert resumed.exit_code == 0, resumed.output
    straight = load_file(tmp_path / "straight/final/model.safetensors")
    again = load_file(tmp_path / "resumed/final/model.safetensors")
    for name in straight:
        torch.testing.assert_close(again[name], straight[name], atol=1e-6, rtol=0)
    # The adaptive controller's coefficient is part of the resumed state.
    coefs = [m["kl_coef"] for m in read_jsonl(tmp_path / "straight/metrics.jsonl") if "kl_coef" in m]
    assert coefs[-1] != 0.05
    assert [m["kl_coef"] for m in read_jsonl(tmp_path / "resumed/metrics.jsonl") if "kl_coef" in m] == coefs[2:]


def test_early_stop_on_approximate_kl_cuts_the_updates(rlhf, tmp_path, reward_model_dir):
    rm = reward_model_dir("rm")
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    args = ["ppo", "model.path=tiny", f"reward.path={rm}", f"data.train={data}", *PPO_QUICK, "ppo.epochs=4", "train.lr=0.01"]
    assert rlhf(*args, "output_dir=full").exit_code == 0
    assert rlhf(*args, "output_dir=stopped", "ppo.early_stop_kl=1e-9").exit_code == 0
    assert {m["updates"] for m in read_jsonl(tmp_path / "full/metrics.jsonl")} == {8}
    # The first mini-batch meets the rollout policy itself (KL 0); the second sees the first update and stops.
    assert {m["updates"] for m in read_jsonl(tmp_path / "stopped/metrics.jsonl")} == {2}


def test_a_reward_model_with_another_tokenizer_scores_text_but_cannot_be_the_critic(rlhf, tmp_path, reward_model_dir):
    other = reward_model_dir("other_rm", extra_token=True)
    same = reward_model_dir("critic")
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    args = ["ppo", "model.path=tiny", f"reward.path={other}", f"data.train={data}", *PPO_QUICK]
    refused = rlhf(*args)
    assert refused.exit_code == 2
    assert f"critic.path: {other} has another tokenizer than the policy" in refused.output
    result = rlhf(*args, f"critic.path={same}")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "args,expected",
    [
        (["ppo.num_mini_batches=3"], "ppo.num_mini_batches: 3 must divide the 4 responses of a step"),
        (["ppo.gamma=0"], "ppo.gamma: 0.0 must be in (0, 1]"),
        (["ppo.kl_target=0"], "ppo.kl_target: 0.0 must be positive"),
        (["ppo.clip_range=1.5"], "ppo.clip_range: 1.5 must be in (0, 1)"),
        (["rollout.temperature=0"], "rollout.temperature: 0.0 must be positive"),
    ],
)
def test_bad_settings_are_one_line_errors(rlhf, tmp_path, reward_model_dir, args, expected):
    rm = reward_model_dir("rm")
    result = rlhf("ppo", "model.path=tiny", f"reward.path={rm}", *PPO_QUICK, *args)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output


def test_responses_that_never_end_are_penalised(rlhf, tmp_path, reward_model_dir):
    rm = reward_model_dir("rm")
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    result = rlhf("ppo", "model.path=tiny", f"reward.path={rm}", f"data.train={data}", *PPO_QUICK, "rollout.max_new_tokens=1",
                  "ppo.normalize_reward=false", "ppo.reward_clip=100", "ppo.missing_eos_penalty=3")
    assert result.exit_code == 0, result.output
    for m in read_jsonl(tmp_path / "runs/default/ppo/metrics.jsonl"):
        assert m["no_eos_fraction"] > 0.5  # one token, almost never EOS from an untrained model
        assert m["reward/normalized"] == pytest.approx(m["reward/mean"] - 3 * m["no_eos_fraction"], abs=1e-5)


@pytest.mark.parametrize("kind", ["separate", "head"])
def test_critic_warmup_leaves_the_actor_alone(rlhf, tmp_path, reward_model_dir, kind):
    import torch
    from safetensors.torch import load_file

    rm = reward_model_dir("rm")
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    args = ["ppo", "model.path=tiny", f"reward.path={rm}", f"data.train={data}", *PPO_QUICK, "train.save_every=1", f"critic.kind={kind}"]
    assert rlhf(*args, "ppo.critic_warmup_steps=2", "output_dir=warm").exit_code == 0
    first = load_file(tmp_path / "warm/checkpoints/step-1/model.safetensors")
    last = load_file(tmp_path / "warm/final/model.safetensors")
    actor = [name for name in first if name.startswith("actor.") and name[len("actor."):] in last]
    assert actor and all(torch.equal(first[name], last[name[len("actor."):]]) for name in actor)
    steps = {m["step"]: m for m in read_jsonl(tmp_path / "warm/metrics.jsonl")}
    assert steps[1]["loss/value"] != steps[2]["loss/value"]


def test_a_value_head_on_the_actor_instead_of_a_critic_model(rlhf, tmp_path, reward_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    rm = reward_model_dir("rm")
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    result = rlhf("ppo", "model.path=tiny", f"reward.path={rm}", f"data.train={data}", *PPO_QUICK, "critic.kind=head",
                  "train.save_every=1")
    assert result.exit_code == 0, result.output
    assert "value head" in result.output
    run = tmp_path / "runs/default/ppo"
    assert "critic" not in json.loads((run / "manifest.json").read_text())["parents"]
    saved = load_file(run / "checkpoints/step-1/model.safetensors")
    assert {"value_head.weight", "value_head.bias"} <= set(saved)
    assert not any(name.startswith("critic.") for name in saved)
    assert SPEC_METRICS <= set(read_jsonl(run / "metrics.jsonl")[-1])
    AutoModelForCausalLM.from_pretrained(run / "final")  # the actor alone


def test_without_reward_model_statistics_scores_are_normalised_with_running_ones(rlhf, tmp_path, reward_model_dir):
    rm = reward_model_dir("rm")
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    result = rlhf("ppo", "model.path=tiny", f"reward.path={rm}", f"data.train={data}", *PPO_QUICK, "ppo.missing_eos_penalty=0")
    assert result.exit_code == 0, result.output
    assert "normalised with running statistics" in result.output
    first, second = read_jsonl(tmp_path / "runs/default/ppo/metrics.jsonl")[:2]
    assert first["reward/normalized"] == pytest.approx(0.0, abs=1e-5)  # the first batch is its own statistics
    assert second["reward/normalized"] != pytest.approx(0.0, abs=1e-5)


def test_offloaded_frozen_models_go_back_to_cpu_after_each_use(rlhf, tmp_path, reward_model_dir, monkeypatch):
    """On this CPU machine the moves change nothing; the test records that they happen around each rollout."""
    import torch

    moves = []
    original = torch.nn.Module.to

    def recording(self, *args, **kwargs):
        if type(self).__name__ in ("LlamaForSequenceClassification", "LlamaForCausalLM") and args:
            moves.append((type(self).__name__, str(args[0])))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording)
    rm = reward_model_dir("rm")
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    args = ["ppo", "model.path=tiny", f"reward.path={rm}", f"data.train={data}", *PPO_QUICK, "critic.kind=head"]
    assert rlhf(*args, "output_dir=kept").exit_code == 0
    kept = list(moves)
    moves.clear()
    assert rlhf(*args, "output_dir=offloaded", "ppo.offload_frozen=true").exit_code == 0
    to_cpu = [m for m in moves if m[1] == "cpu"]
    # Reference and reward model leave the device after each of the 2 rollouts (plus once at load).
    assert to_cpu.count(("LlamaForSequenceClassification", "cpu")) >= 3
    assert to_cpu.count(("LlamaForCausalLM", "cpu")) >= 3
    assert len(to_cpu) > len([m for m in kept if m[1] == "cpu"])


@pytest.mark.parametrize("kind", ["separate", "head"])
def test_actor_and_critic_read_a_step_as_one_padding_free_row_with_the_values_of_padded_rows(kind):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_cli.algos.losses import token_logprobs
    from rlhf_cli.models.shared_prompt import collate_responses
    from rlhf_cli.stages.ppo import ActorCritic
    from tests.test_shared_prompt import ALIKE_PROMPTS, ALIKE_RESPONSES, _model

    def models(segments: bool) -> ActorCritic:
        critic = _model(AutoModelForSequenceClassification, segments, num_labels=1) if kind == "separate" else None
        pair = ActorCritic(_model(AutoModelForCausalLM, segments), critic)
        if critic is None:
            torch.nn.init.normal_(pair.value_head.weight)  # a fresh head is zero: every value would agree
        return pair

    prompts = ALIKE_PROMPTS + ALIKE_PROMPTS[:2] + [[40, 41, 42, 43]] * 2  # one response per prompt, as PPO samples
    responses = ALIKE_RESPONSES
    batch = collate_responses(prompts, responses, list(range(len(responses))), pad_id=0)
    mask = batch.response_mask[:, 1:]
    one_row, padded = models(True), models(False)
    padded.load_state_dict(one_row.state_dict())
    embedded = []
    one_row.actor.get_input_embeddings().register_forward_hook(lambda module, args, output: embedded.append(args[0].shape))
    logits, values = one_row.logits_and_values(batch)
    padded_logits, padded_values = padded.logits_and_values(batch)
    # One row, shorter than the prompts and responses end to end (shared openings run once, last tokens not at all).
    assert len(embedded) == 1 and embedded[0][0] == 1
    assert embedded[0][1] < sum(map(len, prompts)) + sum(len(r) - 1 for r in responses)
    torch.testing.assert_close(token_logprobs(logits, batch.input_ids)[mask], token_logprobs(padded_logits, batch.input_ids)[mask],
                               atol=1e-5, rtol=1e-5)
    assert values.shape == mask.shape
    torch.testing.assert_close(values[mask], padded_values[mask], atol=1e-5, rtol=1e-5)
    assert values[mask].std() > 0


def test_under_bf16_pi_old_is_computed_as_the_update_computes_pi(rlhf, tmp_path, reward_model_dir):
    # With the weights left as they are (lr 1e-12 moves no float32 weight), one epoch of one mini-batch
    # reads pi_old itself: under the updates' autocast the KL between them is exactly 0, where a float32
    # pi_old would differ from the bf16 pi by rounding (and could trip ppo.early_stop_kl on its own).
    rm = reward_model_dir("rm")
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    result = rlhf("ppo", "model.path=tiny", f"reward.path={rm}", f"data.train={data}", *PPO_QUICK, "train.max_steps=1",
                  "model.dtype=bf16", "train.lr=1e-12", "ppo.epochs=1", "ppo.num_mini_batches=1")
    assert result.exit_code == 0, result.output
    logged = next(m for m in read_jsonl(tmp_path / "runs/default/ppo/metrics.jsonl") if "approx_kl" in m)
    assert logged["approx_kl"] == 0.0 and logged["clipfrac"] == 0.0

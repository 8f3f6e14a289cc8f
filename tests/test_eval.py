"""`rlhf eval` end to end on tiny runs, and the figures it computes."""

import json
import math

import pytest
import torch

from tests.conftest import write_jsonl

EVAL_QUICK = ["eval.generate=8", "eval.max_samples=8", "eval.max_new_tokens=4", "eval.batch_size=8"]


def manifest(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())


def test_the_chained_sft_is_scored_by_rm_and_raced_against_itself(rlhf, chain):
    result = rlhf("eval", f"from_run={chain}", *EVAL_QUICK)
    assert result.exit_code == 0, result.output
    evaluated = json.loads((chain / "eval/eval.json").read_text())  # default output_dir: ${from_run}/eval
    sft, rm = manifest(chain / "sft"), manifest(chain / "rm")
    assert evaluated["model"] == {"path": str(chain / "sft/final"), "run": str(chain / "sft"), "stage": "sft",
                                  "run_id": sft["run_id"], "finished_at": sft["finished_at"], "kind": "causal_lm"}
    assert evaluated["reference"]["run_id"] == sft["run_id"]
    assert evaluated["reward_model"]["path"] == str(chain / "rm/final") and evaluated["reward_model"]["run_id"] == rm["run_id"]
    metrics = evaluated["metrics"]
    assert list(metrics) == ["accuracy", "reward", "win_rate", "kl"]
    assert 0 <= metrics["accuracy"]["value"] <= 1 and 0 <= metrics["accuracy"]["math"] <= 1 and metrics["accuracy"]["rows"] == 8
    assert math.isfinite(metrics["reward"]["value"]) and metrics["reward"]["prompts"] == 8
    # The reference is the model itself: the same seeds give the same completions, every prompt ties, and KL is 0.
    assert metrics["win_rate"]["value"] == 0.5 and metrics["win_rate"]["ties"] == 8
    assert metrics["win_rate"]["reference_reward"] == pytest.approx(metrics["reward"]["value"])
    assert abs(metrics["kl"]["value"]) < 1e-5 and metrics["kl"]["estimator"] == "k1" and metrics["kl"]["completions"] == "sampled"
    assert evaluated["skipped"] == {"rm_accuracy": "model.path is a causal LM; rm_accuracy needs a reward model (a train-rm final/)"}
    assert evaluated["config"]["eval"]["max_samples"] == 8 and "eval.max_samples=8" in evaluated["overrides"]
    assert "win_rate       0.5000  against" in result.output and "rm_accuracy   skipped" in result.output


def test_another_model_is_raced_against_the_reference(rlhf, tmp_path, chain):
    result = rlhf("eval", "model.path=tiny", f"from_run={chain}", "output_dir=out", *EVAL_QUICK)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out/eval.json").read_text())["metrics"]
    assert abs(metrics["kl"]["value"]) > 1e-4  # tiny drawn from eval.seed=0, the reference trained from train.seed=42
    race = metrics["win_rate"]
    assert 0 <= race["value"] <= 1 and race["wins"] + race["ties"] + race["losses"] == 8


def test_a_reward_model_is_scored_on_preference_pairs_as_train_rm_scores_it(rlhf, tmp_path, chain):
    result = rlhf("eval", f"model.path={chain / 'rm/final'}", "output_dir=out", *EVAL_QUICK)
    assert result.exit_code == 0, result.output
    evaluated = json.loads((tmp_path / "out/eval.json").read_text())
    assert evaluated["model"]["kind"] == "reward_model" and evaluated["reference"] is None
    rm_accuracy = evaluated["metrics"]["rm_accuracy"]
    # train-rm evaluated the same 8 prompts of builtin:arith_prefs_near_eval at its end.
    trained = manifest(chain / "rm")["final_metrics"]
    assert rm_accuracy["value"] == pytest.approx(trained["eval/accuracy"]) and rm_accuracy["margin"] == pytest.approx(trained["eval/margin"])
    assert 0 <= rm_accuracy["value"] <= 1 and rm_accuracy["pairs"] == 8
    assert set(evaluated["skipped"]) == {"accuracy", "reward", "win_rate", "kl"}
    assert all("model.path is a reward model" in reason for reason in evaluated["skipped"].values())


def test_weights_cast_to_bf16_give_every_metric(rlhf, tmp_path, chain):
    result = rlhf("eval", f"from_run={chain}", "model.dtype=bf16", "output_dir=policy", *EVAL_QUICK)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "policy/eval.json").read_text())["metrics"]
    assert list(metrics) == ["accuracy", "reward", "win_rate", "kl"] and abs(metrics["kl"]["value"]) < 1e-5
    assert all(math.isfinite(metric["value"]) for metric in metrics.values())
    result = rlhf("eval", f"model.path={chain / 'rm/final'}", "model.dtype=bf16", "output_dir=rm", *EVAL_QUICK)
    assert result.exit_code == 0, result.output
    assert 0 <= json.loads((tmp_path / "rm/eval.json").read_text())["metrics"]["rm_accuracy"]["value"] <= 1


def test_accuracy_counts_greedy_completions_equal_to_the_answer(rlhf, tmp_path):
    from rlhf_cli.config.schema import ModelConfig
    from rlhf_cli.data.formats import SFTExample
    from rlhf_cli.data.tokenize import stop_token_ids
    from rlhf_cli.evaluation import greedy_texts
    from rlhf_cli.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(path="tiny"))
    model = load_causal_lm(ModelConfig(path="tiny"), tokenizer, seed=0)  # eval.seed=0 draws the same weights
    prompts = [f"Q: {i}+{i}=" for i in range(6)]
    texts = greedy_texts(model, tokenizer, [SFTExample(str(i), prompt=p, completion="") for i, p in enumerate(prompts)],
                         stop_token_ids(tokenizer, model.generation_config), max_new_tokens=4, batch_size=6)
    # Rows 0 and 2 answer what the model says; rows 1 and 3 something else; rows 4 and 5 lie past eval.generate=4.
    answers = [texts[0], "12345", texts[2], "12345", texts[4], texts[5]]
    data = write_jsonl(tmp_path / "answers.jsonl", [{"prompt": p, "completion": a, "answer": a} for p, a in zip(prompts, answers)])
    result = rlhf("eval", "model.path=tiny", f"eval.accuracy_data={data}", "eval.generate=4", "eval.max_new_tokens=4",
                  "data.prompts=null", "from_run=nothing")
    assert result.exit_code == 0, result.output
    accuracy = json.loads((tmp_path / "nothing/eval/eval.json").read_text())["metrics"]["accuracy"]
    assert accuracy["value"] == 0.5 and accuracy["rows"] == 4 and accuracy["data"] == str(data)


def test_data_split_picks_the_split_of_a_dataset_directory(rlhf, tmp_path):
    rows = [{"prompt": f"Q: {i}+1=", "completion": str(i + 1), "answer": str(i + 1)} for i in range(5)]
    (tmp_path / "sets").mkdir()
    write_jsonl(tmp_path / "sets/train.jsonl", rows)
    write_jsonl(tmp_path / "sets/test.jsonl", rows[:3])
    common = ["model.path=tiny", "ref.path=tiny", "from_run=nothing", "data.prompts=sets", "eval.accuracy_data=sets",
              "eval.generate=10", "eval.max_new_tokens=2"]
    for split, expected in (("test", 3), ("train", 5)):  # test: the default
        result = rlhf("eval", *common, f"data.split={split}", f"output_dir={split}")
        assert result.exit_code == 0, result.output
        metrics = json.loads((tmp_path / split / "eval.json").read_text())["metrics"]
        assert metrics["accuracy"]["rows"] == expected and metrics["kl"]["prompts"] == expected


def test_what_is_missing_is_skipped_with_the_reason(rlhf, tmp_path, chain):
    result = rlhf("eval", "model.path=tiny", "from_run=nothing", *EVAL_QUICK)
    assert result.exit_code == 0, result.output
    evaluated = json.loads((tmp_path / "nothing/eval/eval.json").read_text())
    assert list(evaluated["metrics"]) == ["accuracy"]
    assert "run `rlhf train-rm` first" in evaluated["skipped"]["reward"]
    assert "run `rlhf sft` first" in evaluated["skipped"]["win_rate"] and "run `rlhf sft` first" in evaluated["skipped"]["kl"]
    assert evaluated["reference"] is None and evaluated["reward_model"] is None

    # An explicit reference without a reward model: kl, and no reward or race.
    result = rlhf("eval", "model.path=tiny", f"ref.path={chain / 'sft/final'}", "from_run=nothing", "output_dir=ref_only", *EVAL_QUICK)
    assert result.exit_code == 0, result.output
    evaluated = json.loads((tmp_path / "ref_only/eval.json").read_text())
    assert list(evaluated["metrics"]) == ["accuracy", "kl"]
    assert "run `rlhf train-rm` first" in evaluated["skipped"]["reward"] and "run `rlhf train-rm` first" in evaluated["skipped"]["win_rate"]

    result = rlhf("eval", f"from_run={chain}", "eval.accuracy_data=null", "data.prompts=null", "output_dir=no_data")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "no_data/eval.json").read_text())["skipped"] == {
        "accuracy": "eval.accuracy_data is null", "reward": "data.prompts is null", "win_rate": "data.prompts is null",
        "kl": "data.prompts is null", "rm_accuracy": "model.path is a causal LM; rm_accuracy needs a reward model (a train-rm final/)"}

    result = rlhf("eval", f"model.path={chain / 'rm/final'}", "data.eval=null", "output_dir=no_pairs")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "no_pairs/eval.json").read_text())["skipped"]["rm_accuracy"] == "data.eval is null"


@pytest.fixture
def other_tokenizer_model(tmp_path):
    """A tiny causal LM saved with a tokenizer that has one more token."""
    from rlhf_cli.config.schema import ModelConfig
    from rlhf_cli.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(path="tiny"))
    tokenizer.add_tokens(["<extra>"])
    load_causal_lm(ModelConfig(path="tiny"), tokenizer, seed=0).save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    return tmp_path / "other"


@pytest.mark.parametrize("case", ["missing-reward", "reward-is-a-policy", "reference-is-a-reward-model", "nothing-to-evaluate",
                                  "into-a-stage-run", "missing-prompts", "negative-temperature", "misspelt-key",
                                  "not-a-causal-lm", "reference-with-another-tokenizer"])
def test_bad_input_is_one_error_line(rlhf, tmp_path, chain, request, case):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert/config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    other_tokenizer_model = request.getfixturevalue("other_tokenizer_model") if case == "reference-with-another-tokenizer" else None
    args, message = {
        "missing-reward": (["reward.path=./nope"], "error: reward.path: './nope' is not an existing directory"),
        "reward-is-a-policy": ([f"reward.path={chain / 'sft/final'}"], f"error: reward.path: {chain / 'sft/final'} is a causal lm, not a reward model"),
        "reference-is-a-reward-model": ([f"ref.path={chain / 'rm/final'}"], "is a reward model, not a causal lm"),
        "nothing-to-evaluate": (["from_run=nothing"], "error: model.path is null and nothing/sft holds no run: run `rlhf sft` first"),
        "into-a-stage-run": ([f"output_dir={chain / 'sft'}"], "holds a sft run; eval writes beside runs, not into them"),
        "missing-prompts": (["data.prompts=nothere.jsonl"], "error: data.prompts: 'nothere.jsonl' does not exist"),
        "negative-temperature": (["eval.temperature=-1"], "error: eval.temperature: -1.0 must be non-negative (0: greedy)"),
        "misspelt-key": (["eval.temprature=0"], "did you mean 'eval.temperature'?"),
        "not-a-causal-lm": ([f"model.path={tmp_path / 'bert'}"], "is a BertForMaskedLM, neither a causal LM nor a sequence-classification reward model"),
        "reference-with-another-tokenizer": ([f"ref.path={other_tokenizer_model}"], "has another tokenizer than model.path"),
    }[case]
    from_run = [] if any(arg.startswith("from_run=") for arg in args) else [f"from_run={chain}"]
    result = rlhf("eval", *from_run, "output_dir=out", *EVAL_QUICK, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out/eval.json").exists() and not (chain / "sft/eval.json").exists()


def test_cfg_job_conf_and_a_sweep_of_two_jobs(rlhf, tmp_path):
    (tmp_path / "my.yaml").write_text("eval:\n  seed: 7\n  max_new_tokens: 3\n")
    shown = rlhf("eval", "--cfg", "job", "conf=my.yaml", "eval.max_new_tokens=5", "model.path=tiny")
    assert shown.exit_code == 0, shown.output
    assert "seed: 7" in shown.output and "max_new_tokens: 5" in shown.output and "stage: eval" in shown.output

    # The model against itself (tiny drawn from eval.seed twice), greedy and sampled: kl is 0 either way.
    result = rlhf("eval", "-m", "eval.temperature=0,1.0", "model.path=tiny", "ref.path=tiny", "from_run=nothing",
                  "output_dir=ev", "eval.generate=0", *EVAL_QUICK[1:])
    assert result.exit_code == 0, result.output
    found = sorted((tmp_path / "ev-sweep").glob("*/*/eval.json"))
    assert [path.parent.name for path in found] == ["0_eval.temperature=0", "1_eval.temperature=1.0"]
    kls = [json.loads(path.read_text())["metrics"]["kl"] for path in found]
    assert [kl["completions"] for kl in kls] == ["greedy", "sampled"] and all(abs(kl["value"]) < 1e-5 for kl in kls)


def test_completion_kl_equals_the_log_ratio_of_each_row_computed_alone():
    from rlhf_cli.config.schema import ModelConfig
    from rlhf_cli.data.formats import PromptExample
    from rlhf_cli.data.tokenize import EncodedPrompt
    from rlhf_cli.evaluate import completion_kl
    from rlhf_cli.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(path="tiny"))
    policy = load_causal_lm(ModelConfig(path="tiny"), tokenizer, seed=1).eval()
    reference = load_causal_lm(ModelConfig(path="tiny"), tokenizer, seed=2).eval()
    # Prompts and completions of different lengths, so that the batch pads both.
    prompts = [EncodedPrompt(tokenizer(text)["input_ids"], PromptExample(str(i), text, None, {}))
               for i, text in enumerate(["Q: 1+1=", "Q: 12*34=", "Q: 5-3="])]
    completions = [[50, 51, 52], [53], [54, 55]]
    batched = completion_kl(policy, reference, prompts, completions, tokenizer.pad_token_id, temperature=1.5, batch_size=3)

    def summed_logprob(model, prompt, completion):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double() / 1.5, dim=-1)
        return sum(float(logprobs[len(prompt) - 1 + i, token]) for i, token in enumerate(completion))

    alone = [summed_logprob(policy, p.ids, c) - summed_logprob(reference, p.ids, c) for p, c in zip(prompts, completions)]
    torch.testing.assert_close(batched, torch.tensor(alone, dtype=torch.float32), atol=1e-4, rtol=1e-4)


def test_win_rate_counts_a_tie_as_half_a_win():
    from rlhf_cli.evaluation import win_rate

    # Prompt 0 wins (1 > 0), 1 ties on the score (2 = 2), 2 loses (3 < 4), 3 ties on the text (the same
    # completion, scored 0.5 and 0.7 in other batches): (1 win + 2 ties / 2) / 4 prompts = 0.5.
    assert win_rate([1.0, 2.0, 3.0, 0.5], [0.0, 2.0, 4.0, 0.7], [False, False, False, True]) == {
        "value": 0.5, "wins": 1, "ties": 2, "losses": 1}
    assert win_rate([1.0, 1.0], [0.0, 0.0], [False, False])["value"] == 1.0


def test_the_kind_of_a_lora_adapter_is_its_task_type(tmp_path):
    from rlhf_cli.config.schema import ModelConfig
    from rlhf_cli.errors import UserError
    from rlhf_cli.models import CAUSAL_LM, REWARD_MODEL, model_kind

    for task_type, kind in (("SEQ_CLS", REWARD_MODEL), ("CAUSAL_LM", CAUSAL_LM)):
        (tmp_path / task_type).mkdir()
        (tmp_path / task_type / "adapter_config.json").write_text(json.dumps({"task_type": task_type}))
        assert model_kind(ModelConfig(path=str(tmp_path / task_type))) == kind
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens/adapter_config.json").write_text(json.dumps({"task_type": "TOKEN_CLS"}))
    with pytest.raises(UserError, match="ref.path: .* is a LoRA adapter of task type TOKEN_CLS"):
        model_kind(ModelConfig(path=str(tmp_path / "tokens")), "ref.path")

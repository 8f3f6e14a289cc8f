"""`rlhf dpo` end to end on the built-in tiny model."""

import json

import pytest

from tests.conftest import read_jsonl, write_jsonl

DPO_QUICK = ["model.path=tiny", "train.max_steps=3", "train.batch_size=4", "train.log_every=1", "data.eval=null",
             "data.eval_size=0", "eval.generate=0", "train.lr=1e-3"]
PAIRS = [{"prompt": f"Q: {i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(12)]
SPEC_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen", "logps/rejected"}


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "robust", "simpo"])
def test_each_variant_trains_and_logs_the_spec_metrics(rlhf, tmp_path, loss):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    smoothing = ["dpo.label_smoothing=0.1"] if loss == "robust" else []
    result = rlhf("dpo", f"data.train={data}", f"dpo.loss={loss}", *DPO_QUICK, *smoothing)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs/default/dpo"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert ("reference" in manifest["parents"]) == (loss != "simpo")
    logged = read_jsonl(run / "metrics.jsonl")
    assert SPEC_METRICS <= set(logged[-1])


def test_precomputed_reference_gives_the_losses_of_a_live_one(rlhf, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    args = ["dpo", f"data.train={data}", *DPO_QUICK, "dpo.sft_weight=0.5"]
    assert rlhf(*args, "output_dir=live").exit_code == 0
    result = rlhf(*args, "output_dir=cached", "dpo.precompute_ref=true")
    assert result.exit_code == 0, result.output
    assert "reference cached" in result.output
    assert (tmp_path / "cached/reference_logps.safetensors").is_file()
    live, cached = read_jsonl(tmp_path / "live/metrics.jsonl"), read_jsonl(tmp_path / "cached/metrics.jsonl")
    assert [m["step"] for m in live] == [m["step"] for m in cached] == [1, 2, 3]
    for a, b in zip(live, cached):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert abs(a[key] - b[key]) < 1e-5, (key, a[key], b[key])


def test_chains_policy_and_reference_from_sft(rlhf, tmp_path):
    missing = rlhf("dpo", "train.max_steps=1")
    assert missing.exit_code != 0 and "run `rlhf sft` first" in missing.output
    assert rlhf("sft", "train.max_steps=2", "train.batch_size=4", "eval.generate=0", "eval.max_samples=4").exit_code == 0
    result = rlhf("dpo", "train.max_steps=2", "train.batch_size=4", "eval.max_samples=8", "eval.generate=8")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "runs/default/dpo/manifest.json").read_text())
    assert manifest["parents"]["model"]["stage"] == manifest["parents"]["reference"]["stage"] == "sft"
    first = read_jsonl(tmp_path / "runs/default/dpo/metrics.jsonl")[0]
    assert first["step"] == 0 and {"eval/accuracy", "eval/preference_accuracy", "eval/rewards/accuracy"} <= set(first)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["dpo.loss=kto"], "dpo.loss: 'kto' is not one of sigmoid, ipo, hinge, robust, simpo"),
        (["dpo.beta=0"], "dpo.beta: 0.0 must be positive"),
        (["dpo.loss=robust", "dpo.label_smoothing=0.5"], "dpo.label_smoothing: 0.5 must be in [0, 0.5)"),
        (["ref.path=./nowhere"], "ref.path: './nowhere' is not an existing directory"),
        (["eval.accuracy_data=nope.jsonl", "eval.generate=4"], "eval.accuracy_data: 'nope.jsonl' does not exist"),
    ],
)
def test_bad_dpo_config_is_one_error_line(rlhf, tmp_path, args, expected):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    result = rlhf("dpo", f"data.train={data}", *DPO_QUICK, *args)
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.output


def test_bad_preference_row_names_file_and_line(rlhf, tmp_path):
    write_jsonl(tmp_path / "d.jsonl", PAIRS[:2] + [{"prompt": "x", "chosen": "a"}])
    result = rlhf("dpo", "data.train=d.jsonl", *DPO_QUICK)
    assert result.exit_code != 0 and "error: d.jsonl:3: missing field 'rejected'" in result.output


@pytest.mark.parametrize("fmt", ["explicit", "hh", "ultrafeedback", "trl-conversational", "ranked"])
def test_every_preference_format_of_train_rm_trains(rlhf, tmp_path, fmt):
    from tests.test_train_rm import FORMAT_ROWS

    data = write_jsonl(tmp_path / "prefs.jsonl", [FORMAT_ROWS[fmt]] * 8)
    result = rlhf("dpo", f"data.train={data}", *DPO_QUICK)
    assert result.exit_code == 0, result.output
    pairs = 24 if fmt == "ranked" else 8  # a ranked row of 3 responses gives 3 pairs
    assert f"{pairs} training pairs" in result.output


def test_under_bf16_the_reference_is_scored_as_the_policy_is(rlhf, tmp_path):
    # At the first step the policy is the reference: scored under the same autocast on the same batch,
    # every margin is exactly 0 and the sigmoid loss is log 2; a float32 reference would differ by bf16
    # rounding. (A cached reference is scored in other batches, which round differently.)
    import math

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    result = rlhf("dpo", f"data.train={data}", *DPO_QUICK, "train.max_steps=1", "model.dtype=bf16", "dpo.loss=sigmoid",
                  "dpo.sft_weight=0", "dpo.precompute_ref=false")
    assert result.exit_code == 0, result.output
    logged = next(m for m in read_jsonl(tmp_path / "runs/default/dpo/metrics.jsonl") if "loss" in m)
    assert logged["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_the_live_reference_reads_the_policys_batch_and_plan(rlhf, tmp_path, monkeypatch):
    import rlhf_cli.models.shared_prompt as shared_prompt
    import rlhf_cli.stages.dpo as dpo

    calls = {"plans": 0, "forwards": 0}

    def counted(name, function):
        def call(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return call

    monkeypatch.setitem(shared_prompt._PLANS, "responses", counted("plans", shared_prompt._PLANS["responses"]))
    monkeypatch.setattr(dpo, "response_logits", counted("forwards", dpo.response_logits))
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    result = rlhf("dpo", f"data.train={data}", *DPO_QUICK, "dpo.precompute_ref=false")
    assert result.exit_code == 0, result.output
    assert calls == {"plans": 3, "forwards": 6}  # 3 steps: the policy and the reference read one batch each

"""`rlhf train-rm` end to end on the built-in tiny model."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import read_jsonl, write_jsonl

RM_QUICK = ["train.max_steps=3", "train.batch_size=4", "train.log_every=1", "eval.max_samples=8", "data.eval=null",
            "data.eval_size=0"]


def msg(role, content):
    return {"role": role, "content": content}


FORMAT_ROWS = {
    "explicit": {"prompt": "Q: 2+2=", "chosen": "4", "rejected": "5"},
    "hh": {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"},
    "ultrafeedback": {"prompt": "2+2?", "chosen": [msg("user", "2+2?"), msg("assistant", "4")],
                      "rejected": [msg("user", "2+2?"), msg("assistant", "5")]},
    "trl-conversational": {"prompt": [msg("user", "2+2?")], "chosen": [msg("assistant", "4")],
                           "rejected": [msg("assistant", "5")]},
    "ranked": {"prompt": "Q: 2+2=", "responses": ["4", "5", "22"]},
}


@pytest.mark.parametrize("fmt", sorted(FORMAT_ROWS))
def test_each_preference_format_trains(rlhf, tmp_path, fmt):
    data = write_jsonl(tmp_path / "prefs.jsonl", [FORMAT_ROWS[fmt]] * 8)
    result = rlhf("train-rm", "model.path=tiny", f"data.train={data}", *RM_QUICK)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs/default/rm"
    assert json.loads((run / "manifest.json").read_text())["status"] == "completed"
    logged = read_jsonl(run / "metrics.jsonl")
    assert {"loss", "accuracy", "margin"} <= set(logged[0])


def test_chains_from_sft_and_final_scores_text(rlhf, tmp_path):
    missing = rlhf("train-rm", *RM_QUICK)
    assert missing.exit_code != 0 and "run `rlhf sft` first" in missing.output
    assert rlhf("sft", "train.max_steps=2", "train.batch_size=4", "eval.generate=0", "eval.max_samples=4").exit_code == 0
    result = rlhf("train-rm", *RM_QUICK, "data.eval=builtin:arith_prefs_eval")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "runs/default/rm/manifest.json").read_text())
    assert manifest["parents"]["model"]["stage"] == "sft"
    assert manifest["parents"]["model"]["path"].endswith("runs/default/sft/final")
    assert set(manifest["reward_stats"]) == {"mean", "std", "samples"}
    assert "eval/accuracy" in manifest["final_metrics"]
    final = tmp_path / "runs/default/rm/final"
    model = AutoModelForSequenceClassification.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    scores = model(**tokenizer(["Q: 2+2=4<|im_end|>"], return_tensors="pt")).logits
    assert scores.shape == (1, 1) and torch.isfinite(scores).all()


def test_ranked_rows_encode_each_response_once(rlhf, tmp_path):
    data = write_jsonl(tmp_path / "ranked.jsonl", [FORMAT_ROWS["ranked"]] * 4)
    result = rlhf("train-rm", "model.path=tiny", f"data.train={data}", *RM_QUICK)
    assert "4 training prompts (12 pairs)" in result.output


@pytest.mark.parametrize(
    "row,expected",
    [
        ({"prompt": "x", "chosen": "a"}, "d.jsonl:1: missing field 'rejected'"),
        ({"prompt": "x", "chosen": "a", "rejected": "a"}, "d.jsonl:1: chosen and rejected are the same response"),
        ({"prompt": "x"}, "d.jsonl:1: this row has no chosen/rejected responses"),
        ({"prompt": "x", "responses": ["a"]}, "d.jsonl:1: a ranked row needs at least 2 responses"),
    ],
)
def test_bad_preference_data_is_one_error_line(rlhf, tmp_path, row, expected):
    write_jsonl(tmp_path / "d.jsonl", [row])
    result = rlhf("train-rm", "model.path=tiny", "data.train=d.jsonl", *RM_QUICK)
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.output
    assert not (tmp_path / "runs/default/rm/final").exists()


def test_eval_split_is_carved_from_train_when_none_is_given(rlhf, tmp_path):
    rows = [{"prompt": f"Q: {i}+1=", "chosen": str(i + 1), "rejected": str(i + 5)} for i in range(8)]
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    result = rlhf("train-rm", "model.path=tiny", f"data.train={data}", "data.eval=null", "data.eval_size=0.25",
                  "train.max_steps=2", "train.batch_size=2")
    assert result.exit_code == 0, result.output
    assert "6 training prompts (6 pairs), 2 eval prompts" in result.output
    final = json.loads((tmp_path / "runs/default/rm/manifest.json").read_text())["final_metrics"]
    assert {"eval/loss", "eval/accuracy", "eval/margin"} <= set(final)


def test_a_completed_run_whose_parent_was_retrained_is_not_taken_as_done(rlhf, tmp_path):
    sft = ["sft", "train.max_steps=2", "train.batch_size=4", "eval.generate=0", "eval.max_samples=4"]
    assert rlhf(*sft).exit_code == 0
    assert rlhf("train-rm", *RM_QUICK).exit_code == 0
    again = rlhf("train-rm", *RM_QUICK)
    assert again.exit_code == 0 and "already complete" in again.output
    assert rlhf(*sft, "train.lr=5e-4", "resume=never").exit_code == 0
    stale = rlhf("train-rm", *RM_QUICK)
    assert stale.exit_code != 0 and "was trained again since it started from it" in stale.output and "resume=never" in stale.output
    assert rlhf("train-rm", *RM_QUICK, "resume=never").exit_code == 0

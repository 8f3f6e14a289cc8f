"""The `rlhf sft` command end to end, in-process, on the built-in tiny model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import QUICK, read_jsonl, write_jsonl

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                     {"role": "assistant", "content": "6"}]}
FORMAT_ROWS = {
    "messages": CHAT,
    "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    "alpaca": {"instruction": "Add.", "input": "2 3", "output": "5"},
    "prompt_completion": {"prompt": "Q: 1+1=", "completion": "2"},
}


def test_help_lists_the_keys(rlhf):
    result = rlhf("sft", "--help")
    assert result.exit_code == 0
    for key in ("model.path=tiny", "data.train=builtin:arith", "train.lr=", "data.packing", "resume=auto"):
        assert key in result.output


def test_cfg_job_prints_the_resolved_config_with_overrides(rlhf):
    result = rlhf("sft", "--cfg", "job", "train.lr=3e-4", "data.max_length=99")
    assert result.exit_code == 0, result.output
    assert "lr: 0.0003" in result.output and "max_length: 99" in result.output


def test_conf_yaml_is_merged_and_the_command_line_wins(rlhf, tmp_path):
    (tmp_path / "my.yaml").write_text("train:\n  lr: 2.0e-4\n  batch_size: 3\ndata:\n  packing: true\n")
    result = rlhf("sft", "--cfg", "job", "conf=my.yaml", "train.batch_size=5")
    assert result.exit_code == 0, result.output
    assert "lr: 0.0002" in result.output and "batch_size: 5" in result.output and "packing: true" in result.output


@pytest.mark.parametrize("fmt", sorted(FORMAT_ROWS))
def test_sft_trains_on_each_format_auto_detected(rlhf, tmp_path, fmt):
    data = write_jsonl(tmp_path / f"{fmt}.jsonl", [FORMAT_ROWS[fmt]] * 8)
    result = rlhf("sft", f"data.train={data}", "data.eval=null", *QUICK)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs/default/sft"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["stage"] == "sft"
    assert manifest["parents"]["model"]["path"] == "tiny"
    assert (run / "final/model.safetensors").is_file()
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]


def test_loss_falls_and_final_loads_with_from_pretrained_and_generates(rlhf, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [CHAT] * 16)
    result = rlhf("sft", f"data.train={data}", "data.eval=null", "train.max_steps=30", "train.batch_size=8",
                  "train.lr=3e-3", "train.log_every=1", "eval.generate=0")
    assert result.exit_code == 0, result.output
    final = tmp_path / "runs/default/sft/final"
    losses = [m["loss"] for m in read_jsonl(final.parent / "metrics.jsonl") if "loss" in m]
    assert losses[-1] < 0.5 * losses[0]
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    prompt = tokenizer.apply_chat_template(CHAT["messages"][:2], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == "4"


def test_default_run_evaluates_on_the_builtin_held_out_set(rlhf, tmp_path):
    result = rlhf("sft", "train.max_steps=2", "train.batch_size=8", "eval.max_samples=16", "eval.generate=8")
    assert result.exit_code == 0, result.output
    final = json.loads((tmp_path / "runs/default/sft/manifest.json").read_text())["final_metrics"]
    assert set(final) >= {"loss", "eval/loss", "eval/accuracy"}


def test_multirun_sweep_runs_each_job_into_its_own_directory(rlhf, tmp_path):
    data = write_jsonl(tmp_path / "pc.jsonl", [FORMAT_ROWS["prompt_completion"]] * 8)
    result = rlhf("sft", "-m", "train.lr=1e-4,3e-4", f"data.train={data}", "data.eval=null", *QUICK)
    assert result.exit_code == 0, result.output
    finals = sorted((tmp_path / "runs/default").glob("sft-sweep/*/*/final"))
    assert len(finals) == 2
    lrs = sorted(json.loads((f.parent / "manifest.json").read_text())["config"]["train"]["lr"] for f in finals)
    assert lrs == [1e-4, 3e-4]
    assert {f.parent.name for f in finals} == {"0_train.lr=0.0001", "1_train.lr=0.0003"}


def test_rerunning_a_completed_run_does_nothing_and_a_changed_config_is_refused(rlhf, tmp_path):
    data = write_jsonl(tmp_path / "pc.jsonl", [FORMAT_ROWS["prompt_completion"]] * 8)
    args = ["sft", f"data.train={data}", "data.eval=null", *QUICK]
    assert rlhf(*args).exit_code == 0
    final = tmp_path / "runs/default/sft/final/model.safetensors"
    stamp = final.stat().st_mtime_ns
    again = rlhf(*args)
    assert again.exit_code == 0 and "already complete" in again.output
    changed = rlhf(*args, "train.lr=5e-4")
    assert changed.exit_code != 0
    assert "train.lr" in changed.output and "resume=never" in changed.output
    assert final.stat().st_mtime_ns == stamp
    replaced = rlhf(*args, "train.lr=5e-4", "resume=never")
    assert replaced.exit_code == 0
    manifest = json.loads((tmp_path / "runs/default/sft/manifest.json").read_text())
    assert manifest["config"]["train"]["lr"] == 5e-4 and manifest["status"] == "completed"


def test_grad_accumulation_gives_the_same_weights_as_one_large_batch(rlhf, tmp_path):
    rows = [{"prompt": f"Q: {i}+{i}=", "completion": str(2 * i) * (1 + i % 3)} for i in range(16)]
    data = write_jsonl(tmp_path / "acc.jsonl", rows)
    common = ["sft", f"data.train={data}", "data.eval=null", "train.max_steps=3", "train.lr=1e-3", "eval.generate=0"]
    assert rlhf(*common, "train.batch_size=8", "train.grad_accum=1", "output_dir=big").exit_code == 0
    assert rlhf(*common, "train.batch_size=2", "train.grad_accum=4", "output_dir=acc").exit_code == 0
    from safetensors.torch import load_file

    big, acc = load_file(tmp_path / "big/final/model.safetensors"), load_file(tmp_path / "acc/final/model.safetensors")
    assert big.keys() == acc.keys()
    for name in big:
        torch.testing.assert_close(big[name], acc[name], atol=1e-5, rtol=1e-4)


def test_packing_trains_and_reports(rlhf, tmp_path):
    data = write_jsonl(tmp_path / "pc.jsonl", [FORMAT_ROWS["prompt_completion"]] * 12)
    result = rlhf("sft", f"data.train={data}", "data.eval=null", "data.packing=true", "data.max_length=40", *QUICK)
    assert result.exit_code == 0, result.output
    assert "3 training samples" in result.output  # 12 rows of 10 tokens packed 4 to a 40-token row


def test_truncation_is_reported(rlhf, tmp_path):
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "Q: ", "completion": "x" * 60}] * 4)
    result = rlhf("sft", f"data.train={data}", "data.eval=null", "data.max_length=32", *QUICK)
    assert result.exit_code == 0, result.output
    assert "4 of 4 samples longer than data.max_length=32 were truncated" in result.output


def test_wandb_logger_runs_offline_and_no_secret_reaches_any_file(rlhf, tmp_path, monkeypatch):
    secret = "sk-test-0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_MODE", "offline")
    data = write_jsonl(tmp_path / "pc.jsonl", [FORMAT_ROWS["prompt_completion"]] * 8)
    result = rlhf("sft", f"data.train={data}", "data.eval=null", "logger=[jsonl,wandb]", *QUICK)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs/default/sft"
    assert list(run.glob("wandb/offline-run-*")), "wandb wrote no offline run"
    for path in run.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"secret found in {path}"


def test_multirun_through_the_submitit_launcher(rlhf, tmp_path):
    data = write_jsonl(tmp_path / "pc.jsonl", [FORMAT_ROWS["prompt_completion"]] * 8)
    result = rlhf("sft", "-m", "hydra/launcher=submitit_local", "train.seed=1,2", f"data.train={data}",
                  "data.eval=null", *QUICK)
    assert result.exit_code == 0, result.output
    manifests = sorted((tmp_path / "runs/default").glob("sft-sweep/*/*/manifest.json"))
    assert len(manifests) == 2
    assert all(json.loads(m.read_text())["status"] == "completed" for m in manifests)


def test_resume_from_an_explicit_checkpoint(rlhf, tmp_path):
    data = write_jsonl(tmp_path / "pc.jsonl", [FORMAT_ROWS["prompt_completion"]] * 8)
    args = ["sft", f"data.train={data}", "data.eval=null", "train.max_steps=4", "train.save_every=2",
            "train.batch_size=4", "train.log_every=1", "eval.generate=0"]
    assert rlhf(*args, "output_dir=first").exit_code == 0
    checkpoint = tmp_path / "first/checkpoints/step-2"
    assert checkpoint.is_dir()
    result = rlhf(*args, "output_dir=second", f"resume={checkpoint}")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "second/manifest.json").read_text())
    assert manifest["resumed_from"] == str(checkpoint)
    assert [m["step"] for m in read_jsonl(tmp_path / "second/metrics.jsonl") if "loss" in m] == [3, 4]


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch):
    import io
    import sys

    from rlhf_cli.config.schema import SFTConfig
    from rlhf_cli.metrics import MetricsLogger

    terminal = io.StringIO()
    terminal.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", terminal)
    logger = MetricsLogger(tmp_path, SFTConfig(stage="sft"), total_steps=4, start_step=0)
    for step in range(1, 5):
        logger.advance(step)
        logger.log(step, {"loss": 1.0 / step, "lr": 1e-3, "tokens_per_s": 1234.0})
    logger.log(4, {"eval/loss": 0.5})
    logger.close()
    import re

    shown = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", terminal.getvalue())
    assert "eval/loss 0.5" in shown and "4/4" in shown
    assert [m["step"] for m in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 4]


def test_tensorboard_logger_writes_event_files(rlhf, tmp_path):
    data = write_jsonl(tmp_path / "pc.jsonl", [FORMAT_ROWS["prompt_completion"]] * 8)
    result = rlhf("sft", f"data.train={data}", "data.eval=null", "logger=[jsonl,tensorboard]", *QUICK)
    assert result.exit_code == 0, result.output
    events = list((tmp_path / "runs/default/sft/tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


@pytest.mark.parametrize("option", ["model.dtype=bf16", "model.gradient_checkpointing=true", "model.attn_implementation=eager",
                                    "train.lr_scheduler=linear", "data.format=prompt_completion"])
def test_model_and_training_options_run(rlhf, tmp_path, option):
    data = write_jsonl(tmp_path / "pc.jsonl", [FORMAT_ROWS["prompt_completion"]] * 8)
    result = rlhf("sft", f"data.train={data}", "data.eval=null", option, *QUICK)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "runs/default/sft/manifest.json").read_text())["status"] == "completed"


def test_a_saved_model_directory_is_loaded_by_path(rlhf, tmp_path):
    data = write_jsonl(tmp_path / "pc.jsonl", [FORMAT_ROWS["prompt_completion"]] * 8)
    assert rlhf("sft", f"data.train={data}", "data.eval=null", "output_dir=first", *QUICK).exit_code == 0
    result = rlhf("sft", f"data.train={data}", "data.eval=null", "output_dir=second", "model.path=first/final", *QUICK)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "second/manifest.json").read_text())
    first = json.loads((tmp_path / "first/manifest.json").read_text())
    assert manifest["parents"]["model"] == {"path": "first/final", "run": "first", "stage": "sft",
                                            "run_id": first["run_id"], "finished_at": first["finished_at"]}

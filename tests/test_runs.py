"""Run-directory plumbing: atomic directories, secret redaction, checkpoint discovery."""

import pytest

from rlhf_cli.runs import RunDir, atomic_directory, redact


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "final"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("killed mid-write")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "model.safetensors").write_text("whole")
    assert (target / "model.safetensors").read_text() == "whole"


def test_atomic_directory_replaces_an_existing_one(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "old").write_text("x")
    with atomic_directory(target) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["new"]


def test_redact_hides_secret_keys_only():
    config = {"wandb": {"api_key": "k", "project": "p"}, "hf_token": "t", "password": "pw",
              "eval": {"max_new_tokens": 8}, "tokens": 3, "empty_token": None}
    assert redact(config) == {"wandb": {"api_key": "<redacted>", "project": "p"}, "hf_token": "<redacted>",
                              "password": "<redacted>", "eval": {"max_new_tokens": 8}, "tokens": 3, "empty_token": None}


def test_only_whole_checkpoints_are_found(tmp_path):
    run = RunDir(tmp_path)
    for name in ("step-10", "step-2", ".step-30.tmp-123", "notes"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert [step for step, _ in run.checkpoints()] == [2, 10]
    assert run.latest_checkpoint().name == "step-10"

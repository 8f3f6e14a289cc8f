"""Run-directory plumbing: atomic, sealed directories, secret redaction, checkpoint discovery."""

import json
import os

import pytest

from rlhf_cli.errors import UserError
from rlhf_cli.runs import RunDir, atomic_directory, redact


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "final"
    with pytest.raises(UserError, match=r"final: not written \(the disk failed; [\d.]+ GB free on its disk\); nothing of it"):
        with atomic_directory(target) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("[enforce fail]\nthe disk failed")  # torch's shape of a failed write
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
    assert sorted(p.name for p in target.iterdir()) == ["complete.json", "new"]


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


def _sealed_directory(tmp_path):
    target = tmp_path / "checkpoints/step-2"
    target.parent.mkdir()
    with atomic_directory(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"\x01" * 1000)
        (tmp / "deepspeed/shard.pt").parent.mkdir()
        (tmp / "deepspeed/shard.pt").write_bytes(b"\x02" * 10)
    return target


def test_a_sealed_directory_is_whole_until_a_file_changes(tmp_path):
    from rlhf_cli.runs.checkpoint import SEAL, unsealed_reason

    target = _sealed_directory(tmp_path)
    sealed = json.loads((target / SEAL).read_text())["files"]
    assert sorted(sealed) == ["deepspeed/shard.pt", "model.safetensors"] and sealed["deepspeed/shard.pt"]["size"] == 10
    assert unsealed_reason(target) is None

    with (target / "model.safetensors").open("r+b") as handle:  # a byte flipped in place: same size
        handle.write(b"\x00")
    assert unsealed_reason(target) == "model.safetensors does not match its sha256"
    assert unsealed_reason(target, checksums=False) is None  # what the size-only check cannot see

    os.truncate(target / "model.safetensors", 500)
    assert unsealed_reason(target, checksums=False) == "model.safetensors has 500 bytes, 1000 when written"
    (target / "deepspeed/shard.pt").unlink()
    assert unsealed_reason(target) == "deepspeed/shard.pt is missing"
    (target / SEAL).write_text("{")
    assert unsealed_reason(target) == f"{SEAL} is unreadable"
    (target / SEAL).unlink()
    assert unsealed_reason(target) == f"no {SEAL}: it was never finished"


def test_the_temporaries_of_a_killed_run_are_removed_and_nothing_else(tmp_path):
    run = RunDir(tmp_path)
    for name in ("checkpoints/step-2", "checkpoints/.step-4.tmp-123", ".final.tmp-77", ".final.old-5", "final"):
        (tmp_path / name).mkdir(parents=True)
    for name in (".manifest.json.tmp-9", "manifest.json", ".notes", "checkpoints/.step-6.tmp-x"):
        (tmp_path / name).write_text("")
    run.remove_leftovers()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        ".notes", "checkpoints", "checkpoints/.step-6.tmp-x", "checkpoints/step-2", "final", "manifest.json"]

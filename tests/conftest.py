import os
import sys

# Set before torch or wandb are imported anywhere in the test session.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed compiles its CPU communication op once per environment; keep it with this one.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

import json
from pathlib import Path
from typing import NamedTuple

import pytest
from typer.testing import CliRunner


@pytest.fixture
def rlhf(tmp_path, monkeypatch):
    """Run the `rlhf` CLI in-process from a fresh working directory; returns click's Result."""
    monkeypatch.chdir(tmp_path)

    def invoke(*args: str):
        from rlhf_cli.cli import app

        return CliRunner().invoke(app, list(args))

    return invoke


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """runs/default/{sft,rm} of three steps each (rm keeps its step-2 checkpoint), a from_run for the later stages
    (trained once per test module)."""
    from rlhf_cli.cli import app

    root = tmp_path_factory.mktemp("chain")
    here = os.getcwd()
    os.chdir(root)
    try:
        for args in (["sft", "train.max_steps=3", "train.batch_size=4", "eval.generate=0", "eval.max_samples=8"],
                     ["train-rm", "train.max_steps=3", "train.batch_size=4", "eval.max_samples=8", "rm.stats_samples=8",
                      "train.save_every=2"]):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, result.output
    finally:
        os.chdir(here)
    return root / "runs/default"


# Tiny, fast settings for a stage run on the built-in model.
QUICK = ["train.max_steps=3", "train.batch_size=4", "train.log_every=1", "eval.generate=0", "eval.max_samples=8"]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def saved_tiny(tmp_path):
    """The tiny model with seed-0 weights saved as a model directory, as a hub download would be."""
    from rlhf_cli.config.schema import ModelConfig
    from rlhf_cli.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(path="tiny"))
    load_causal_lm(ModelConfig(path="tiny"), tokenizer, seed=0).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


class Finished(NamedTuple):
    returncode: int
    stderr: str


def signal_after_first_step(command: list[str], cwd, sig) -> Finished:
    """Run `command` and send it `sig` once its first metrics line appears."""
    import signal
    import subprocess

    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    seen = []
    try:
        for line in process.stderr:
            seen.append(line)
            if line.startswith("step 1/"):
                process.send_signal(sig)
                break
        _, rest = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return Finished(process.wait(), "".join(seen) + rest)

"""Several processes under DeepSpeed ZeRO on this CPU (gloo): every stage finishes at ZeRO-2 and
ZeRO-3 with two processes, two processes at ZeRO-0 take the same steps as one, ZeRO-3 checkpoints
resume exactly, and a ZeRO-3 final/ is a plain transformers model."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import read_jsonl

QUICK = ["train.log_every=1", "eval.max_samples=4", "train.eval_every=0"]
STAGE_QUICK = {
    "sft": ["eval.generate=0"],
    "train-rm": [],
    "dpo": ["eval.generate=0"],
    "grpo": ["eval.generate=0", "grpo.num_generations=2", "rollout.max_new_tokens=4", "grpo.beta=0.1"],
    "ppo": ["eval.generate=0", "rollout.max_new_tokens=4", "ppo.num_mini_batches=2", "ppo.critic_warmup_steps=0"],
}


def _rlhf(cwd, stage, *args):
    command = [sys.executable, "-m", "rlhf_cli", stage, *QUICK, *STAGE_QUICK[stage], *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """sft and train-rm runs (one process) the later stages chain from."""
    root = tmp_path_factory.mktemp("chain")
    for stage in ("sft", "train-rm"):
        result = _rlhf(root, stage, "train.max_steps=2", "train.batch_size=4", f"output_dir=runs/default/{'rm' if stage == 'train-rm' else stage}")
        assert result.returncode == 0, result.stderr
    return root


def _losses(run) -> list[float]:
    return [m["loss"] for m in read_jsonl(run / "metrics.jsonl") if "loss" in m]


# grpo scores with the chain's reward model (rewards that vary within a group); ppo takes each
# process's rollouts as one mini-batch (with several, every process shuffles only its own rows).
EQUAL_STEPS = {"grpo": ["grpo.rewards=[{name:model,path:runs/default/rm/final}]"], "ppo": ["ppo.num_mini_batches=1"]}


# The default suite runs grpo (rollouts split over processes, gradients averaged); `make test-distributed`
# (CI runs it too) the rest of this file.
@pytest.mark.parametrize("stage", ["grpo"] + [pytest.param(s, marks=pytest.mark.distributed) for s in ("sft", "train-rm", "dpo", "ppo")])
def test_two_processes_at_zero0_take_the_steps_of_one_process(chain, stage):
    extra = EQUAL_STEPS.get(stage, [])
    one = _rlhf(chain, stage, "train.max_steps=3", "train.batch_size=8", f"output_dir=one-{stage}", *extra)
    assert one.returncode == 0, one.stderr
    two = _rlhf(chain, stage, "train.max_steps=3", "train.batch_size=4", "launcher.nproc=2", "deepspeed=zero0",
                f"output_dir=two-{stage}", *extra)
    assert two.returncode == 0, two.stderr
    assert two.stderr.count("\nstep ") == one.stderr.count("\nstep ") > 0  # process 0 alone reports
    single, double = read_jsonl(chain / f"one-{stage}/metrics.jsonl"), read_jsonl(chain / f"two-{stage}/metrics.jsonl")
    assert [m["step"] for m in single] == [m["step"] for m in double] and len(single) >= 3
    logged = {k for m in single for k in m}
    assert {"loss", "grad_norm"} <= logged or {"loss/policy", "loss/value", "reward/mean", "kl"} <= logged
    for a, b in zip(single, double):
        figures = [k for k, v in a.items() if isinstance(v, float) and k not in ("tokens_per_s", "rss_mib")]  # the machine's, not training's
        for key in figures:
            assert abs(a[key] - b[key]) < 1e-4, (a["step"], key, a[key], b[key])


# By default ppo at ZeRO-3 (two engines, actor and critic, each partitioned); `make test-distributed`
# runs the whole matrix and the ZeRO-3 checkpoint tests below, which would take the default suite past
# its 15 minutes.
STAGE_ZERO = [("ppo", "zero3")] + [
    pytest.param(stage, zero, marks=pytest.mark.distributed)
    for stage, zero in [("sft", "zero2"), ("train-rm", "zero2"), ("dpo", "zero2"), ("grpo", "zero2"), ("ppo", "zero2"),
                        ("sft", "zero3"), ("train-rm", "zero3"), ("dpo", "zero3"), ("grpo", "zero3")]]


@pytest.mark.parametrize("stage, zero", STAGE_ZERO)
def test_every_stage_finishes_with_two_processes(chain, stage, zero):
    output = f"{zero}-{stage}"
    result = _rlhf(chain, stage, "train.max_steps=2", "train.batch_size=2", "train.save_every=1", "launcher.nproc=2",
                   f"deepspeed={zero}", f"output_dir={output}")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((chain / output / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["config"]["deepspeed"]["stage"] == int(zero[-1])
    assert (chain / output / "checkpoints/step-1/rng-rank1.pt").is_file()  # each process's RNG state is kept
    assert len(_losses(chain / output) if stage in ("sft", "train-rm", "dpo", "grpo") else read_jsonl(chain / output / "metrics.jsonl")) >= 2


@pytest.mark.distributed
def test_zero3_final_is_a_plain_model_the_next_stage_starts_from(chain):
    from transformers import AutoModelForCausalLM

    result = _rlhf(chain, "sft", "train.max_steps=2", "train.batch_size=2", "launcher.nproc=2", "deepspeed=zero3", "output_dir=z3/sft")
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(chain / "z3/sft/final")
    assert all(p.numel() > 0 and torch.isfinite(p).all() for p in model.parameters())  # gathered, not ZeRO-3 shards
    nxt = _rlhf(chain, "dpo", "train.max_steps=1", "train.batch_size=4", "from_run=z3", "output_dir=z3/dpo")
    assert nxt.returncode == 0, nxt.stderr
    assert json.loads((chain / "z3/dpo/manifest.json").read_text())["parents"]["model"]["stage"] == "sft"


@pytest.mark.distributed
def test_zero3_checkpoint_resumes_to_the_same_weights(chain):
    args = ["train.max_steps=4", "train.batch_size=2", "train.save_every=2", "train.keep_checkpoints=2", "launcher.nproc=2", "deepspeed=zero3"]
    straight = _rlhf(chain, "sft", *args, "output_dir=straight")
    assert straight.returncode == 0, straight.stderr
    resumed = _rlhf(chain, "sft", *args, "output_dir=resumed", f"resume={chain / 'straight/checkpoints/step-2'}")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    a, b = load_file(chain / "straight/final/model.safetensors"), load_file(chain / "resumed/final/model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0)
    assert _losses(chain / "resumed")[-2:] == pytest.approx(_losses(chain / "straight")[-2:], abs=1e-6)


@pytest.mark.distributed
def test_lora_trains_under_zero_and_its_final_feeds_the_next_stage(chain):
    # LoRA matrices leave the no-decay parameter group empty; DeepSpeed drops it, the schedule must too.
    result = _rlhf(chain, "dpo", "train.max_steps=2", "train.batch_size=2", "launcher.nproc=2", "deepspeed=zero3",
                   "model.lora.r=4", "output_dir=lora/dpo")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((chain / "lora/dpo/manifest.json").read_text())
    assert manifest["final_format"] == "merged" and manifest["parameters"]["trainable"] < manifest["parameters"]["total"]


@pytest.mark.distributed
def test_a_sweep_of_multi_process_jobs_runs_every_job(chain):
    result = _rlhf(chain, "sft", "-m", "train.max_steps=1", "train.batch_size=2", "launcher.nproc=2", "deepspeed=zero0",
                   "train.lr=1e-3,2e-3", "output_dir=sweep")
    assert result.returncode == 0, result.stderr
    (sweep,) = (chain / "sweep-sweep").iterdir()  # both processes chose the same sweep directory
    for job in ("0_train.lr=0.001", "1_train.lr=0.002"):
        assert json.loads((sweep / job / "manifest.json").read_text())["status"] == "completed"


def test_several_processes_need_deepspeed_and_say_so(rlhf):
    result = rlhf("sft", "launcher.nproc=2")
    assert result.exit_code == 2
    assert "launcher.nproc: 2 more than one process needs DeepSpeed" in result.output
    result = rlhf("sft", "deepspeed=zero2", "deepspeed.offload_params=true")
    assert result.exit_code == 2 and "deepspeed.offload_params: True needs deepspeed.stage 3" in result.output
    result = rlhf("sft", "deepspeed=zero7")
    assert result.exit_code == 2 and "zero7" in result.output and "Traceback" not in result.output


def test_deepspeed_json_comes_from_the_config_and_a_users_json_is_checked(tmp_path):
    from rlhf_cli.config.schema import DeepSpeedKeys, TrainConfig
    from rlhf_cli.engine.zero import deepspeed_config
    from rlhf_cli.errors import UserError

    train = TrainConfig(batch_size=4, grad_accum=3, max_grad_norm=0.5)
    generated = deepspeed_config(train, DeepSpeedKeys(stage=3, offload_params=True), torch.bfloat16, world_size=2)
    assert generated["train_batch_size"] == 24 and generated["gradient_accumulation_steps"] == 3
    assert generated["gradient_clipping"] == 0.5 and generated["bf16"]["enabled"] and not generated["fp16"]["enabled"]
    assert generated["zero_optimization"]["stage"] == 3 and generated["zero_optimization"]["offload_param"] == {"device": "cpu"}

    mine = tmp_path / "ds.json"
    mine.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}}))
    merged = deepspeed_config(train, DeepSpeedKeys(stage=3, config=str(mine)), torch.float32, world_size=2)
    assert merged["train_micro_batch_size_per_gpu"] == 4 and merged["zero_optimization"]["reduce_bucket_size"] == 1000

    mine.write_text(json.dumps({"gradient_accumulation_steps": 8}))
    with pytest.raises(UserError, match="gradient_accumulation_steps=8 disagrees with the config's 3"):
        deepspeed_config(train, DeepSpeedKeys(stage=2, config=str(mine)), torch.float32, world_size=1)
    mine.write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    with pytest.raises(UserError, match="remove 'optimizer'"):
        deepspeed_config(train, DeepSpeedKeys(stage=2, config=str(mine)), torch.float32, world_size=1)
    mine.write_text("{not json")
    with pytest.raises(UserError, match="not JSON"):
        deepspeed_config(train, DeepSpeedKeys(stage=2, config=str(mine)), torch.float32, world_size=1)


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_bad_data_that_fails_every_process_shows_one_error_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": \n')
    result = _rlhf(tmp_path, "sft", "data.train=d.jsonl", "data.eval=null", "train.max_steps=2", "train.batch_size=2",
                   "launcher.nproc=2", "deepspeed=zero0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = _error_lines(result)
    assert line.startswith("error: d.jsonl:2: malformed JSON"), result.stderr


def test_the_error_shown_is_the_first_left_even_when_its_process_ends_after_a_peers(tmp_path):
    import os

    from rlhf_cli.cli import _first_to_fail

    def leave(rank: int, at_ns: int) -> None:
        (tmp_path / f"rank-{rank}").write_text("error: ...\n")
        os.utime(tmp_path / f"rank-{rank}", ns=(at_ns, at_ns))

    leave(1, 1_000)
    leave(0, 2_000)  # process 0's complaint of the closed connection, after process 1's error
    assert _first_to_fail([1, None], str(tmp_path)) == 1  # process 1 is still ending
    assert _first_to_fail([1, 2], str(tmp_path)) == 1
    assert _first_to_fail([None, 2, None], str(tmp_path)) == 1
    (tmp_path / "rank-1").unlink()  # killed: it left no line
    assert _first_to_fail([None, -9], str(tmp_path)) == 1  # process 0's line is about the killed process 1
    assert _first_to_fail([1, -9], str(tmp_path)) == 1
    assert _first_to_fail([None, -9, 1], str(tmp_path / "no-lines")) == 1  # --debug leaves no lines: the first to end


@pytest.mark.faults
def test_an_error_of_process_1_alone_is_shown(tmp_path):
    (tmp_path / "rank_reward.py").write_text(
        "import os\n\n\ndef fail_on_rank_1(prompts, completions, examples):\n"
        "    if os.environ['RANK'] == '1':\n        raise ValueError('rank 1 cannot score')\n"
        "    return [0.0] * len(completions)\n")
    result = _rlhf(tmp_path, "grpo", "model.path=tiny", "grpo.rewards=[{name:'rank_reward:fail_on_rank_1'}]",
                   "train.max_steps=2", "train.batch_size=2", "launcher.nproc=2", "deepspeed=zero0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert _error_lines(result) == ["error: reward 'rank_reward:fail_on_rank_1' failed: ValueError: rank 1 cannot score"], result.stderr


@pytest.mark.parametrize("deepspeed, dtype, expected", [("none", "bf16", torch.float32), ("zero0", "bf16", torch.bfloat16),
                                                         ("zero2", "fp16", torch.float16), ("zero2", "fp32", torch.float32)])
def test_a_frozen_model_takes_the_dtype_deepspeed_holds_the_policy_in(deepspeed, dtype, expected):
    # Under ZeRO-0/1/2 DeepSpeed keeps the policy's weights in the compute dtype: a float32 reference
    # would score differently from the policy at the same weights. The plain engine autocasts both.
    from rlhf_cli.config.compose import load_config, register_schemas
    from rlhf_cli.engine.zero import frozen_for_inference

    register_schemas()
    cfg = load_config("grpo", [f"deepspeed={deepspeed}", f"model.dtype={dtype}"])
    frozen = frozen_for_inference(torch.nn.Linear(2, 2), cfg)
    assert frozen.weight.dtype == expected

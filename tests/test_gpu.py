"""On a CUDA GPU (skipped without one): every stage of the chain trains there, in bf16 and in fp32 and
under DeepSpeed ZeRO-3 in one process, the padding-free forward gives there the log-probabilities it
gives on the CPU, and its forward and backward never make the host wait. bench/device.sh runs this
file on a GPU machine after the benchmark."""

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rlhf_cli.algos.losses import token_logprobs
from rlhf_cli.models import TINY_DIR
from rlhf_cli.models.padding_free import use_segment_attention
from rlhf_cli.models.shared_prompt import collate_responses, response_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

QUICK = ["train.max_steps=2", "train.batch_size=4", "train.log_every=1", "eval.max_samples=4"]
ROLLOUT = ["rollout.max_new_tokens=4", "eval.generate=0"]
CHAIN = (  # stage, its own settings, the metric its loss is logged as
    ("sft", ["eval.generate=0"], "loss"),
    ("train-rm", ["rm.stats_samples=8"], "loss"),
    ("dpo", ["eval.generate=0"], "loss"),
    ("grpo", ["grpo.num_generations=4", *ROLLOUT], "loss"),
    ("ppo", ["ppo.critic_warmup_steps=0", *ROLLOUT], "loss/policy"),
)


@pytest.mark.parametrize("deepspeed, dtype", [("none", "bf16"), ("none", "fp32"), ("zero3", "bf16")])
def test_every_stage_trains_on_the_gpu(rlhf, tmp_path, deepspeed, dtype):
    runs = tmp_path / "runs/default"
    for stage, extra, metric in CHAIN:
        result = rlhf(stage, *QUICK, *extra, f"model.dtype={dtype}", f"deepspeed={deepspeed}")
        assert result.exit_code == 0, f"{stage}: {result.output[-3000:]}"
        logged = [json.loads(line) for line in (runs / stage.replace("train-", "") / "metrics.jsonl").read_text().splitlines()]
        losses = [row[metric] for row in logged if metric in row]
        assert losses and all(math.isfinite(loss) for loss in losses), (stage, losses)


def test_padding_free_logprobs_on_the_gpu_equal_the_cpu():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_DIR, num_key_value_heads=2), attn_implementation="sdpa")
    assert use_segment_attention(model) is None
    prompts = [[5, 6, 7, 8, 9], [10, 11], [5, 6, 7, 12]]
    responses = [[20, 21, 2], [22, 2], [20, 21, 25, 26, 2], [27, 2], [28, 29, 30, 31, 2]]
    batch = collate_responses(prompts, responses, [0, 1, 0, 2, 1], pad_id=0)
    on_cpu = token_logprobs(response_logits(model, batch), batch.input_ids)
    on_gpu = token_logprobs(response_logits(model.cuda(), batch.to("cuda")), batch.input_ids.cuda())
    mask = batch.response_mask[:, 1:]
    torch.testing.assert_close(on_gpu.cpu()[mask], on_cpu[mask], atol=1e-4, rtol=1e-4)


def test_a_planned_micro_batchs_forward_and_backward_never_wait_for_the_gpu():
    """What tests/test_device_syncs.py shows on the meta device, on the GPU itself: CUDA's sync debug
    mode raises at any operation that makes the host wait (a read of a value, a blocking copy)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_DIR, num_key_value_heads=2), attn_implementation="sdpa")
    assert use_segment_attention(model) is None
    model.cuda().train()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [5, 6, 7, 12]]
    responses = [[20, 21, 2], [22, 2], [20, 21, 25, 26, 2], [27, 2], [20, 21, 2]]

    def step() -> None:
        batch = collate_responses(prompts, responses, [0, 1, 0, 2, 0], pad_id=0).to("cuda")
        logprobs = token_logprobs(response_logits(model, batch), batch.input_ids)
        (logprobs * batch.loss_mask[:, 1:]).sum().backward()

    step()  # kernels load and caches fill before the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")

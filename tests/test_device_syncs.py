"""The training forwards read nothing back from the device: on a GPU such a read waits for every queued
kernel, so the host cannot prepare the next micro-batch while the device computes this one.

They run here on PyTorch's meta device, which holds shapes and no values: any read of a value
(`.item()`, `bool(t)`, a boolean mask's count, `nonzero`, `unique`) raises there. The batches are
planned on the host before they move, as the stages do."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_cli.algos.losses import sequence_logprobs, sft_loss, token_logprobs
from rlhf_cli.data.batches import collate
from rlhf_cli.data.tokenize import TokenizedSample
from rlhf_cli.models import TINY_DIR, kept_logits
from rlhf_cli.models.padding_free import use_segment_attention
from rlhf_cli.models.shared_prompt import collate_responses, response_logits, response_scores, response_values
from rlhf_cli.stages.sft import _planned

META = torch.device("meta")
# Prompts and responses that begin alike (two responses are copies): shared prefixes, and
# positions that no kept output reads, are planned as in training.
PROMPTS = [[5, 6, 7, 8, 9], [5, 6, 11], [12, 13, 14]]
RESPONSES = [[20, 21, 2], [22, 2], [23, 24, 2], [20, 21, 2], [20, 29, 2], [22, 3, 4, 2]]
OWNERS = [0, 1, 2, 0, 0, 1]


def _on_meta(factory, segments: bool = True, **extra):
    config = AutoConfig.from_pretrained(TINY_DIR, num_key_value_heads=2, **extra)
    with META:
        model = factory.from_config(config, attn_implementation="sdpa")
    if segments:
        assert use_segment_attention(model) is None
    return model.train()


def test_the_policys_response_logprobs_and_their_gradient_read_nothing_from_the_device():
    model = _on_meta(AutoModelForCausalLM)
    batch = collate_responses(PROMPTS, RESPONSES, OWNERS, pad_id=0).to(META)
    sums, _ = sequence_logprobs(response_logits(model, batch), batch.input_ids, batch.loss_mask)
    sums.sum().backward()
    assert sums.shape == (len(RESPONSES),) and model.lm_head.weight.grad is not None
    assert token_logprobs(response_logits(model, batch), batch.input_ids).shape == (len(RESPONSES), 4)  # the plan, reused


def test_a_critics_values_and_a_reward_models_scores_read_nothing_from_the_device():
    model = _on_meta(AutoModelForSequenceClassification, num_labels=1, pad_token_id=0)
    batch = collate_responses(PROMPTS, RESPONSES, OWNERS, pad_id=0).to(META)
    (response_values(model, batch).sum() + response_scores(model, batch).sum()).backward()
    assert response_scores(model, batch).shape == (len(RESPONSES),)


def test_an_sft_micro_batch_reads_nothing_from_the_device():
    model = _on_meta(AutoModelForCausalLM)
    samples = [TokenizedSample(ids, [False, False] + [True] * (len(ids) - 2), "") for ids in
               ([1, 5, 6, 7, 8, 2], [1, 5, 6, 9, 2], [1, 10, 11, 2])]
    plan, label_ids = _planned(collate(samples, 0, padding_free=True), META)
    sft_loss(kept_logits(model, plan), label_ids, num_tokens=9).backward()
    assert label_ids.shape == (9,)


def test_the_meta_device_catches_a_read():
    """What the tests above rely on: transformers' own SDPA mask reads a padding mask's values."""
    model = _on_meta(AutoModelForCausalLM, segments=False)
    batch = collate([TokenizedSample([1, 5, 6], [False, True, True], ""), TokenizedSample([1, 7], [False, True], "")], 0)
    with pytest.raises(RuntimeError, match="meta"):
        model(input_ids=batch["input_ids"].to(META), attention_mask=batch["attention_mask"].to(META), use_cache=False)

"""Responses that share a prompt: the shared forward equals concatenated prompt + response rows."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_cli.algos.losses import sequence_logprobs, token_logprobs
from rlhf_cli.models import TINY_DIR
from rlhf_cli.models.shared_prompt import collate_responses, response_logits, response_scores

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19]]
RESPONSES = [[20, 21, 2], [22, 2], [23, 24, 25, 26, 2], [27, 2], [28, 29, 2], [30, 31, 32, 2], [33, 2]]
OWNERS = [0, 1, 2, 0, 1, 2, 1]


def _model(factory, **extra):
    torch.manual_seed(0)
    model = factory.from_config(AutoConfig.from_pretrained(TINY_DIR, **extra))
    model.config.pad_token_id = 0
    return model.train()


def _checkpointed(model, on: bool):
    name = "enable" if on else "disable"
    switch = getattr(model, f"activation_checkpointing_{name}", None) or getattr(model, f"gradient_checkpointing_{name}")
    switch()


def _reference_rows(model):
    """The plain way: one right-padded row of prompt + response per response, no cache."""
    from rlhf_cli.data.batches import collate
    from rlhf_cli.data.tokenize import TokenizedSample

    rows = [TokenizedSample(PROMPTS[o] + r, [False] * len(PROMPTS[o]) + [True] * len(r), "") for r, o in zip(RESPONSES, OWNERS)]
    batch = collate(rows, 0)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False), batch


def test_shared_prompt_logprobs_and_gradients_equal_concatenated_rows():
    model = _model(AutoModelForCausalLM)
    batch = collate_responses(PROMPTS, RESPONSES, OWNERS, pad_id=0)
    shared, counts = sequence_logprobs(response_logits(model, batch), batch.input_ids, batch.loss_mask)
    shared.sum().backward()
    shared_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    out, rows = _reference_rows(model)
    plain, plain_counts = sequence_logprobs(out.logits, rows["input_ids"], rows["loss_mask"])
    plain.sum().backward()
    assert torch.allclose(shared, plain, atol=1e-5)
    assert torch.equal(counts, plain_counts)
    assert all(torch.allclose(a, p.grad, atol=1e-5) for a, p in zip(shared_grads, model.parameters()))


def test_checkpointed_model_falls_back_to_rows_with_the_same_layout():
    model = _model(AutoModelForCausalLM)
    batch = collate_responses(PROMPTS, RESPONSES, OWNERS, pad_id=0)
    with torch.no_grad():
        shared = token_logprobs(response_logits(model, batch), batch.input_ids)
    _checkpointed(model, True)
    fallback = token_logprobs(response_logits(model, batch), batch.input_ids)
    mask = batch.loss_mask[:, 1:]
    assert fallback.shape == shared.shape
    assert torch.allclose(fallback[mask], shared[mask], atol=1e-5)


def test_each_prompt_runs_once_when_shared():
    model = _model(AutoModelForCausalLM)
    batch = collate_responses(PROMPTS, RESPONSES, OWNERS, pad_id=0)
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: seen.append(args[0].numel()))
    response_logits(model, batch)
    _checkpointed(model, True)
    response_logits(model, batch)
    prompts, responses, rows = seen
    assert prompts + responses == 3 * max(map(len, PROMPTS)) + len(RESPONSES) * max(map(len, RESPONSES))
    assert rows == len(RESPONSES) * max(len(PROMPTS[o]) + len(r) for r, o in zip(RESPONSES, OWNERS))
    assert batch.num_tokens == sum(len(PROMPTS[o]) + len(r) for r, o in zip(RESPONSES, OWNERS))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["shared", "rows"])
def test_reward_scores_equal_concatenated_rows(checkpointing):
    model = _model(AutoModelForSequenceClassification, num_labels=1)
    _checkpointed(model, checkpointing)
    batch = collate_responses(PROMPTS, RESPONSES, OWNERS, pad_id=0)
    with torch.enable_grad():
        scores = response_scores(model, batch)
    _checkpointed(model, False)
    plain = _reference_rows(model)[0].logits[:, 0]
    assert torch.allclose(scores, plain, atol=1e-5)

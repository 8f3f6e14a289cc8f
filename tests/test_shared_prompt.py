"""Responses that share a prompt: one padding-free row with each prompt once equals concatenated
prompt + response rows, with and without activation checkpointing; models without segment
attention take the rows."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_cli.algos.losses import sequence_logprobs, token_logprobs
from rlhf_cli.models import TINY_DIR, backbone
from rlhf_cli.models.padding_free import use_segment_attention
from rlhf_cli.models.shared_prompt import collate_responses, response_logits, response_outputs, response_scores, response_values

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19]]
RESPONSES = [[20, 21, 2], [22, 2], [23, 24, 25, 26, 2], [27, 2], [28, 29, 2], [30, 31, 32, 2], [33, 2]]
OWNERS = [0, 1, 2, 0, 1, 2, 1]


def _model(factory, segments: bool = True, **extra):
    torch.manual_seed(0)
    model = factory.from_config(AutoConfig.from_pretrained(TINY_DIR, **extra), attn_implementation="sdpa")
    model.config.pad_token_id = 0
    if segments:
        assert use_segment_attention(model) is None
    return model.train()


def _checkpointed(model, on: bool):
    name = "enable" if on else "disable"
    switch = getattr(model, f"activation_checkpointing_{name}", None) or getattr(model, f"gradient_checkpointing_{name}")
    switch()


# Prompts that begin alike and responses that begin alike (two are copies), as a template and a
# policy's samples make them.
ALIKE_PROMPTS = [[5, 6, 7, 8, 9], [5, 6, 11], [12, 13, 14], [5, 6, 7, 10]]
ALIKE_RESPONSES = [[20, 21, 2], [22, 2], [23, 24, 2], [20, 21, 2], [20, 29, 2], [22, 2], [22, 3, 4, 2], [20, 21, 2]]
ALIKE_OWNERS = [0, 1, 2, 0, 0, 1, 1, 3]


def _reference_rows(model, prompts=PROMPTS, responses=RESPONSES, owners=OWNERS):
    """The plain way: one right-padded row of prompt + response per response, no cache."""
    from rlhf_cli.data.batches import collate
    from rlhf_cli.data.tokenize import TokenizedSample

    rows = [TokenizedSample(prompts[o] + r, [False] * len(prompts[o]) + [True] * len(r), "") for r, o in zip(responses, owners)]
    batch = collate(rows, 0)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False), batch


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("extra", [{}, {"num_key_value_heads": 2}], ids=["mha", "gqa"])
def test_shared_prompt_logprobs_and_gradients_equal_concatenated_rows(checkpointing, extra):
    model = _model(AutoModelForCausalLM, **extra)
    _checkpointed(model, checkpointing)
    batch = collate_responses(PROMPTS, RESPONSES, OWNERS, pad_id=0)
    shared, counts = sequence_logprobs(response_logits(model, batch), batch.input_ids, batch.loss_mask)
    shared.sum().backward()
    shared_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    _checkpointed(model, False)
    out, rows = _reference_rows(model)
    plain, plain_counts = sequence_logprobs(out.logits, rows["input_ids"], rows["loss_mask"])
    plain.sum().backward()
    assert torch.allclose(shared, plain, atol=1e-5)
    assert torch.equal(counts, plain_counts)
    assert all(torch.allclose(a, p.grad, atol=1e-5) for a, p in zip(shared_grads, model.parameters()))


def test_a_model_without_segment_attention_takes_rows_with_the_same_layout():
    shared_model, rows_model = _model(AutoModelForCausalLM), _model(AutoModelForCausalLM, segments=False)
    batch = collate_responses(PROMPTS, RESPONSES, OWNERS, pad_id=0)
    with torch.no_grad():
        shared = token_logprobs(response_logits(shared_model, batch), batch.input_ids)
        rows = token_logprobs(response_logits(rows_model, batch), batch.input_ids)
    mask = batch.loss_mask[:, 1:]
    assert rows.shape == shared.shape
    assert torch.allclose(rows[mask], shared[mask], atol=1e-5)


def test_each_prompt_runs_once_in_one_row_without_padding_or_the_responses_last_tokens():
    model = _model(AutoModelForCausalLM)
    batch = collate_responses(PROMPTS, RESPONSES, OWNERS, pad_id=0)
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: seen.append(args[0].clone()))
    response_logits(model, batch)
    # A response's last token scores nothing and no other token reads it.
    expected = [t for p in PROMPTS for t in p] + [t for r in RESPONSES for t in r[:-1]]
    assert [row.tolist() for row in seen] == [[expected]]
    assert batch.num_tokens == sum(len(PROMPTS[o]) + len(r) for r, o in zip(RESPONSES, OWNERS))


@pytest.mark.parametrize("segments", [True, False], ids=["one-row", "rows"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_reward_scores_equal_concatenated_rows(segments, checkpointing):
    model = _model(AutoModelForSequenceClassification, segments, num_labels=1)
    _checkpointed(model, checkpointing)
    batch = collate_responses(PROMPTS, RESPONSES, OWNERS, pad_id=0)
    with torch.enable_grad():
        scores = response_scores(model, batch)
    _checkpointed(model, False)
    plain = _reference_rows(model)[0].logits[:, 0]
    assert torch.allclose(scores, plain, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_prompts_and_responses_that_begin_alike_run_their_shared_tokens_once(checkpointing):
    model = _model(AutoModelForCausalLM)
    _checkpointed(model, checkpointing)
    batch = collate_responses(ALIKE_PROMPTS, ALIKE_RESPONSES, ALIKE_OWNERS, pad_id=0)
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: seen.append(args[0].numel()))
    shared, _ = sequence_logprobs(response_logits(model, batch), batch.input_ids, batch.loss_mask)
    # Prompts: 5 + 1 (after [5, 6]) + 3 + 1 (after [5, 6, 7]). Responses, less their last tokens:
    # prompt 0 runs 20, 21 (twice sampled) and the 29 of [20, 29, 2]; prompt 1 runs 22 (three times
    # sampled), 3 and 4; prompt 2 runs 23, 24; prompt 3 runs 20, 21.
    assert seen == [10 + 3 + 3 + 2 + 2]
    weights = torch.randn_like(shared)
    (shared * weights).sum().backward()
    shared_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    _checkpointed(model, False)
    out, rows = _reference_rows(model, ALIKE_PROMPTS, ALIKE_RESPONSES, ALIKE_OWNERS)
    plain, _ = sequence_logprobs(out.logits, rows["input_ids"], rows["loss_mask"])
    (plain * weights).sum().backward()
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    for a, p in zip(shared_grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)

    scorer = _model(AutoModelForSequenceClassification, num_labels=1)
    scores = response_scores(scorer, batch)
    torch.testing.assert_close(scores, _reference_rows(scorer, ALIKE_PROMPTS, ALIKE_RESPONSES, ALIKE_OWNERS)[0].logits[:, 0],
                               atol=1e-5, rtol=1e-5)


def _before_each_response_token(model, prompts, responses, owners):
    """(R, Tr, H) the last hidden states of concatenated rows at the position before each response token (0 past its end)."""
    rows = _reference_rows(model, prompts, responses, owners)[1]
    hidden = backbone(model)(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).last_hidden_state
    picked = torch.zeros(len(responses), max(len(r) for r in responses), hidden.size(-1))
    for row, (response, owner) in enumerate(zip(responses, owners)):
        start = len(prompts[owner]) - 1
        picked[row, : len(response)] = hidden[row, start : start + len(response)]
    return picked


@pytest.mark.parametrize("segments", [True, False], ids=["one-row", "rows"])
@pytest.mark.parametrize("prompts, responses, owners", [(PROMPTS, RESPONSES, OWNERS), (ALIKE_PROMPTS, ALIKE_RESPONSES, ALIKE_OWNERS)],
                         ids=["distinct", "alike"])
def test_values_and_hidden_states_before_each_response_token_equal_concatenated_rows(segments, prompts, responses, owners):
    batch = collate_responses(prompts, responses, owners, pad_id=0)
    mask = batch.response_mask[:, 1:]
    critic = _model(AutoModelForSequenceClassification, segments, num_labels=1)
    values = response_values(critic, batch)
    plain = critic.score(_before_each_response_token(critic, prompts, responses, owners)).squeeze(-1)
    assert values.shape == plain.shape
    torch.testing.assert_close(values[mask], plain[mask], atol=1e-5, rtol=1e-5)
    # Every value's gradient reaches the critic's body through its prompt and earlier tokens.
    weights = torch.randn_like(values) * mask
    (values * weights).sum().backward()
    grads = [p.grad.clone() for p in critic.parameters()]
    critic.zero_grad()
    (plain * weights).sum().backward()
    for a, p in zip(grads, critic.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)

    actor = _model(AutoModelForCausalLM, segments)
    logits, hidden = response_outputs(actor, batch, hidden_states=True)
    plain_hidden = _before_each_response_token(actor, prompts, responses, owners)
    torch.testing.assert_close(hidden[:, :-1][mask], plain_hidden[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, response_logits(actor, batch))
    assert response_outputs(actor, batch)[1] is None


def test_selected_responses_keep_only_the_prompts_they_follow():
    batch = collate_responses(PROMPTS, RESPONSES, OWNERS, pad_id=0)
    picked = batch.rows(torch.tensor([5, 1, 4]))  # responses of prompts 2, 1, 1
    assert picked.prompt_ids.tolist() == batch.prompt_ids[[1, 2]].tolist()
    assert picked.owners.tolist() == [1, 0, 0]
    assert picked.input_ids.tolist() == batch.input_ids[[5, 1, 4]].tolist()
    assert picked.num_tokens == len(PROMPTS[2]) + len(RESPONSES[5]) + 2 * len(PROMPTS[1]) + len(RESPONSES[1]) + len(RESPONSES[4])


def test_a_batch_is_planned_once_for_every_forward_that_reads_it(monkeypatch):
    import rlhf_cli.models.shared_prompt as shared_prompt

    planned = []
    plan = shared_prompt._PLANS["responses"]
    monkeypatch.setitem(shared_prompt._PLANS, "responses", lambda batch: planned.append(batch) or plan(batch))
    policy, critic = _model(AutoModelForCausalLM), _model(AutoModelForSequenceClassification, num_labels=1, pad_token_id=0)
    batch = collate_responses(ALIKE_PROMPTS, ALIKE_RESPONSES, ALIKE_OWNERS, pad_id=0).to("cpu")
    with torch.no_grad():
        first = response_logits(policy, batch)
        assert torch.equal(response_logits(policy, batch), first)
        response_values(critic, batch)
    assert len(planned) == 1
    mini = batch.rows(torch.tensor([1, 4, 6]))
    response_logits(policy, mini)
    response_values(critic, mini)
    assert len(planned) == 2 and planned[1].input_ids.size(0) == 3

"""Padding-free batches: one row of concatenated samples with segment attention gives the padded
batch's logits and gradients, sft trains the same with and without it, and models whose attention
cannot take it keep padded batches."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from rlhf_cli.algos.losses import scoring_positions, token_nll_sum
from rlhf_cli.data.batches import collate
from rlhf_cli.data.tokenize import TokenizedSample, pack
from rlhf_cli.models import TINY_DIR, forward_inputs, kept_logits, plan_kept
from rlhf_cli.models.padding_free import (ATTENTION, one_query_attention, prefixed_segments, segments_from_positions,
                                          shared_prefixes, use_segment_attention)
from tests.conftest import read_jsonl

SAMPLES = [
    TokenizedSample([5, 6, 7, 8, 20, 21, 2], [False] * 4 + [True] * 3, "a"),
    TokenizedSample([9, 10, 22, 2], [False] * 2 + [True] * 2, "b"),
    TokenizedSample([11, 12, 13, 14, 15, 16, 23, 24, 25, 2], [False] * 6 + [True] * 4, "c"),
    TokenizedSample([17, 26, 2], [False] + [True] * 2, "d"),
]


def _twin_models(**extra):
    """Two models with the same weights: the first padded (sdpa), the second with segment attention."""
    config = AutoConfig.from_pretrained(TINY_DIR, **extra)
    torch.manual_seed(0)
    padded = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    free = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    free.load_state_dict(padded.state_dict())
    assert use_segment_attention(free) is None
    return padded.train(), free.train()


def _loss_and_grads(model, batch):
    loss = token_nll_sum(model(**forward_inputs(batch)).logits, batch["input_ids"], batch["loss_mask"])
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_segments_index_each_sample_within_the_flat_batch():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4, 0, 0]])
    (segments,) = segments_from_positions(positions).groups
    assert segments.key_index is None and segments.mask is None  # causal within each sample
    assert segments.index.tolist() == [[0, 1, 2, 0, 0], [3, 4, 0, 0, 0], [5, 6, 7, 8, 0], [9, 10, 0, 0, 0],
                                       [11, 12, 13, 14, 15], [16, 0, 0, 0, 0], [17, 0, 0, 0, 0]]
    assert segments.valid.sum(-1).tolist() == [3, 2, 4, 2, 5, 1, 1]


def test_responses_attend_to_their_whole_prompt_and_causally_to_themselves():
    # Row: prompt 0 (tokens 0-2), prompt 1 (3-4), response 0 of prompt 1 (5-6), response 1 of prompt 0 (7).
    prompts, responses = prefixed_segments(torch.tensor([0, 3]), torch.tensor([3, 2]), torch.tensor([5, 7]),
                                           torch.tensor([2, 1]), owners=torch.tensor([1, 0])).groups
    assert prompts.index.tolist() == [[0, 1, 2], [3, 4, 0]] and prompts.mask is None
    assert responses.index.tolist() == [[5, 6], [7, 0]]
    assert responses.key_index.tolist() == [[3, 4, 0, 5, 6], [0, 1, 2, 7, 0]]
    assert responses.mask[:, 0].int().tolist() == [
        [[1, 1, 0, 1, 0], [1, 1, 0, 1, 1]],  # prompt 1 has two tokens: key 2 is padding
        [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]],  # the one-token response's second query is padding
    ]


def test_a_position_is_read_by_the_later_positions_of_its_sample_and_a_prompt_by_its_responses():
    causal = segments_from_positions(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]]))
    wanted = torch.tensor([0, 1, 0, 0, 0, 0, 1, 0], dtype=torch.bool)
    assert causal.read_by(wanted).int().tolist() == [1, 1, 0, 0, 0, 1, 1, 0]  # sample 1 is not read at all
    # Row: prompt 0 (tokens 0-2), prompt 1 (3-4), response 0 of prompt 1 (5-6), response 1 of prompt 0 (7).
    prefixed = prefixed_segments(torch.tensor([0, 3]), torch.tensor([3, 2]), torch.tensor([5, 7]), torch.tensor([2, 1]),
                                 owners=torch.tensor([1, 0]))
    assert prefixed.read_by(torch.tensor([0, 0, 0, 0, 0, 1, 0, 0], dtype=torch.bool)).int().tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    assert prefixed.read_by(torch.tensor([0, 0, 1, 0, 0, 0, 0, 0], dtype=torch.bool)).int().tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("rows", [SAMPLES, pack(SAMPLES, max_length=14)], ids=["samples", "packed-rows"])
def test_kept_logits_do_not_run_a_samples_last_token_and_equal_the_whole_rows(rows):
    whole, trimmed = (_twin_models()[1] for _ in range(2))  # equal weights, both with segment attention
    batch = collate(rows, pad_id=0, padding_free=True)
    keep = scoring_positions(batch["loss_mask"])
    seen = []
    trimmed.get_input_embeddings().register_forward_hook(lambda module, args, output: seen.append(args[0].clone()))
    kept = kept_logits(trimmed, plan_kept(forward_inputs(batch), keep))
    kept.sum().backward()
    positions = batch["position_ids"][0]
    last_of_sample = torch.cat([positions[1:] == 0, torch.tensor([True])])
    assert seen[0].tolist() == [batch["input_ids"][0][~last_of_sample].tolist()]

    logits = whole(**forward_inputs(batch)).logits[keep]
    logits.sum().backward()
    torch.testing.assert_close(kept, logits, atol=1e-5, rtol=1e-4)
    for a, b in zip(whole.parameters(), trimmed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=2e-5, rtol=1e-4)


ALIKE = [  # b shares a's first two tokens, c is a's copy, d shares nothing; e shares b's first three
    TokenizedSample([5, 6, 7, 20, 2], [False] * 3 + [True] * 2, "a"),
    TokenizedSample([5, 6, 8, 9, 21, 2], [False] * 4 + [True] * 2, "b"),
    TokenizedSample([5, 6, 7, 20, 2], [False] * 3 + [True] * 2, "c"),
    TokenizedSample([4, 6, 22, 2], [False] * 2 + [True] * 2, "d"),
    TokenizedSample([5, 6, 8, 10, 23, 24, 2], [False] * 4 + [True] * 3, "e"),
]


def test_samples_that_begin_alike_run_their_shared_tokens_once():
    tokens = torch.tensor([5, 6, 7, 5, 6, 8, 9, 5, 6, 7, 4, 6])  # a b c d: b shares 2 tokens with a, c all 3
    shared = shared_prefixes(segments_from_positions(torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 0, 1]])), tokens)
    assert shared.survivors.tolist() == [0, 1, 2, 10, 11, 5, 6]  # a and d whole, then b's own tokens
    assert shared.moved_to.tolist() == [0, 1, 2, 0, 1, 5, 6, 0, 1, 2, 3, 4]
    alone, after_prefix = shared.segments.groups
    assert alone.key_index is None and alone.index.tolist() == [[0, 1, 2], [3, 4, 0]]
    assert after_prefix.index.tolist() == [[5, 6]] and after_prefix.key_index.tolist() == [[0, 1, 5, 6]]
    assert after_prefix.mask[0, 0].int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert shared_prefixes(segments_from_positions(torch.tensor([[0, 1, 0, 1]])), torch.tensor([5, 6, 7, 6])) is None


@pytest.mark.parametrize("rows", [ALIKE, pack(ALIKE, max_length=14)], ids=["samples", "packed-rows"])
def test_kept_logits_of_samples_that_share_a_prefix_equal_the_whole_rows(rows):
    whole, shared = (_twin_models()[1] for _ in range(2))
    batch = collate(rows, pad_id=0, padding_free=True)
    keep = scoring_positions(batch["loss_mask"])
    seen = []
    shared.get_input_embeddings().register_forward_hook(lambda module, args, output: seen.append(args[0].clone()))
    kept = kept_logits(shared, plan_kept(forward_inputs(batch), keep))
    # a: 4 tokens run (not its last), b: 3 after the 2 it shares, c: none, d: 3, e: 3 after the 3 it shares with b
    assert seen[0].numel() == 4 + 3 + 0 + 3 + 3
    weights = torch.randn_like(kept)  # samples that share a position weigh its logits differently
    (kept * weights).sum().backward()

    logits = whole(**forward_inputs(batch)).logits[keep]
    (logits * weights).sum().backward()
    torch.testing.assert_close(kept, logits, atol=1e-5, rtol=1e-4)
    for a, b in zip(whole.parameters(), shared.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=2e-5, rtol=1e-4)


def test_kept_logits_of_a_row_with_nothing_to_keep_are_empty():
    batch = collate(SAMPLES, pad_id=0, padding_free=True)
    keep = torch.zeros_like(batch["loss_mask"])
    assert kept_logits(_twin_models()[1], plan_kept(forward_inputs(batch), keep)).shape == (0, 260)


def test_padding_free_collate_is_one_row_of_real_tokens():
    batch = collate(SAMPLES, pad_id=0, padding_free=True)
    assert batch["input_ids"].tolist() == [[t for s in SAMPLES for t in s.input_ids]]
    assert batch["position_ids"].tolist() == [[i for s in SAMPLES for i in range(len(s.input_ids))]]
    assert batch["loss_mask"].tolist() == [[m for s in SAMPLES for m in s.loss_mask]]
    assert batch["attention_mask"].all()


@pytest.mark.parametrize("rows, extra", [
    (SAMPLES, {}),
    (SAMPLES, {"num_key_value_heads": 2}),
    (pack(SAMPLES, max_length=14), {}),  # data.packing's rows, each of several samples
], ids=["samples", "grouped-query-attention", "packed-rows"])
def test_one_row_with_segment_attention_equals_the_padded_batch(rows, extra):
    padded, free = _twin_models(**extra)
    loss, grads = _loss_and_grads(padded, collate(SAMPLES, pad_id=0))
    free_loss, free_grads = _loss_and_grads(free, collate(rows, pad_id=0, padding_free=True))
    assert free_loss.item() == pytest.approx(loss.item(), abs=1e-4)
    for a, b in zip(grads, free_grads):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)


def test_without_segments_the_attention_is_sdpa_with_its_masks():
    padded, free = _twin_models()
    batch = collate(SAMPLES, pad_id=0)
    with torch.no_grad():
        torch.testing.assert_close(free(**forward_inputs(batch)).logits, padded(**forward_inputs(batch)).logits)


@pytest.mark.parametrize("padded", [True, False])
def test_one_query_attention_equals_sdpa_with_grouped_heads_and_padded_keys(padded):
    torch.manual_seed(0)
    query, key, value = torch.randn(3, 4, 1, 8), torch.randn(3, 2, 6, 8), torch.randn(3, 2, 6, 8)
    key_valid = torch.tensor([[1, 1, 0, 0, 1, 1], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]) if padded else None
    mask = None if key_valid is None else key_valid.bool()[:, None, None, :]
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.3, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(one_query_attention(query, key, value, key_valid, 0.3), expected)


SMALL = {"vocab_size": 260, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.mark.parametrize("attention, config, reason", [
    ("eager", AutoConfig.for_model("llama", **SMALL), "model.attn_implementation=eager"),
    ("sdpa", AutoConfig.for_model("mistral", **SMALL, sliding_window=4), "sliding-window"),
], ids=["eager", "sliding-window"])
def test_a_model_whose_attention_cannot_take_segments_stays_as_it_is(attention, config, reason):
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    assert reason in use_segment_attention(model)
    assert model.config._attn_implementation == attention


QUICK = ["data.train=builtin:arith", "data.eval_size=16", "train.max_steps=3", "train.batch_size=8", "train.log_every=1",
         "train.eval_every=0", "eval.generate=0", "train.save_every=0"]


def test_sft_trains_the_same_with_and_without_padding(rlhf, tmp_path):
    for value in ("true", "false"):
        result = rlhf("sft", *QUICK, f"model.padding_free={value}", f"output_dir=pf-{value}")
        assert result.exit_code == 0, result.output
    free, padded = (read_jsonl(tmp_path / f"pf-{v}/metrics.jsonl") for v in ("true", "false"))
    for a, b in zip(free, padded):
        for key in ("loss", "grad_norm", "eval/loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-4), (key, a, b)
    config = json.loads((tmp_path / "pf-true/final/config.json").read_text())
    assert ATTENTION not in json.dumps(config)  # final/ loads without rlhf installed
    AutoModelForCausalLM.from_pretrained(tmp_path / "pf-true/final")

import math

import torch

from rlhf_cli.algos.losses import count_label_tokens, sft_loss, token_nll_sum


def test_token_nll_sum_matches_hand_computed_values():
    # Vocabulary of 2. Position t predicts token t+1.
    # Row 0: logits at t=0 are (0, 0) -> p(token 1) = 1/2; at t=1 (log 3, 0) -> p(token 0) = 3/4.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 5.0]]])
    input_ids = torch.tensor([[0, 1, 0]])
    loss_mask = torch.tensor([[False, True, True]])
    expected = -(math.log(0.5) + math.log(0.75))
    assert torch.isclose(token_nll_sum(logits, input_ids, loss_mask), torch.tensor(expected))
    # Masking the last token leaves only -log(1/2).
    loss_mask = torch.tensor([[False, True, False]])
    assert torch.isclose(token_nll_sum(logits, input_ids, loss_mask), torch.tensor(math.log(2.0)))


def test_position_zero_is_never_a_label():
    logits = torch.zeros(1, 2, 2)
    input_ids = torch.tensor([[1, 1]])
    assert count_label_tokens(torch.tensor([[True, False]])) == 0
    assert token_nll_sum(logits, input_ids, torch.tensor([[True, False]])) == 0


def test_sft_loss_divides_by_the_steps_token_count_not_the_micro_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 7)
    input_ids = torch.randint(0, 7, (4, 5))
    loss_mask = torch.rand(4, 5) > 0.3
    total = count_label_tokens(loss_mask)
    whole = sft_loss(logits, input_ids, loss_mask, total)
    halves = sft_loss(logits[:2], input_ids[:2], loss_mask[:2], total) + sft_loss(
        logits[2:], input_ids[2:], loss_mask[2:], total
    )
    assert torch.isclose(whole, halves)
    # Averaging per-micro-batch means instead weights tokens unequally when the halves differ in size.
    n1, n2 = count_label_tokens(loss_mask[:2]), count_label_tokens(loss_mask[2:])
    assert n1 != n2
    mean_of_means = (sft_loss(logits[:2], input_ids[:2], loss_mask[:2], n1) + sft_loss(logits[2:], input_ids[2:], loss_mask[2:], n2)) / 2
    assert not torch.isclose(mean_of_means, whole)

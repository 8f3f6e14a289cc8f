import math

import torch

from rlhf_cli.algos.losses import count_label_tokens, label_nll_sum, labels, scoring_positions, sft_loss, token_nll_sum


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


def test_the_labels_logits_alone_give_the_same_sum():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 7)
    input_ids = torch.randint(0, 7, (3, 6))
    loss_mask = torch.rand(3, 6) > 0.4
    positions = scoring_positions(loss_mask)
    assert positions[:, :-1].equal(loss_mask[:, 1:]) and not positions[:, -1].any()
    every_position = -torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    expected = (every_position * loss_mask[:, 1:]).sum()
    assert torch.isclose(label_nll_sum(logits[positions], labels(input_ids, loss_mask)), expected)
    assert torch.isclose(token_nll_sum(logits, input_ids, loss_mask), expected)


def test_sft_loss_divides_by_the_steps_token_count_not_the_micro_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 7)
    input_ids = torch.randint(0, 7, (4, 5))
    loss_mask = torch.rand(4, 5) > 0.3

    def loss(rows: slice, num_tokens: int) -> torch.Tensor:
        return sft_loss(logits[rows][scoring_positions(loss_mask[rows])], labels(input_ids[rows], loss_mask[rows]), num_tokens)

    total = count_label_tokens(loss_mask)
    whole = loss(slice(None), total)
    assert torch.isclose(whole, loss(slice(0, 2), total) + loss(slice(2, 4), total))
    # Averaging per-micro-batch means instead weights tokens unequally when the halves differ in size.
    n1, n2 = count_label_tokens(loss_mask[:2]), count_label_tokens(loss_mask[2:])
    assert n1 != n2
    assert not torch.isclose((loss(slice(0, 2), n1) + loss(slice(2, 4), n2)) / 2, whole)

"""Tokenisation, label masks, truncation, packing (checked against the model), collation and batching."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from rlhf_cli.config.schema import ModelConfig, Truncation
from rlhf_cli.data.batches import StepBatches, collate
from rlhf_cli.data.formats import Message, SFTExample
from rlhf_cli.data.tokenize import (
    TokenizedSample,
    TruncationReport,
    apply_max_length,
    encode_prompt,
    encode_prompt_response,
    pack,
    stop_token_ids,
    tokenize_sft,
)
from rlhf_cli.errors import UserError
from rlhf_cli.models import FALLBACK_CHAT_TEMPLATE, TINY_DIR, load_causal_lm, load_tokenizer

PAD, START, END, ENDOFTEXT = 0, 1, 2, 3


def b(text: str) -> list[int]:
    """Ids of text in the built-in byte-level tokenizer."""
    return [4 + x for x in text.encode("utf-8")]


def turn(role: str, content: str) -> list[int]:
    """One ChatML turn of the built-in template: <|im_start|>role\\ncontent<|im_end|>."""
    return [START] + b(f"{role}\n{content}") + [END]


def header(role: str) -> list[int]:
    return [START] + b(f"{role}\n")


def labels(sample: TokenizedSample) -> list[int]:
    return [t for t, m in zip(sample.input_ids, sample.loss_mask) if m]


def chat(*pairs: tuple[str, str]) -> SFTExample:
    return SFTExample("chat.jsonl:1", tuple(Message(r, c, train=(r == "assistant")) for r, c in pairs))


MULTI = chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "2+2?"), ("assistant", "4"))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig())


@pytest.fixture
def fresh_tok():
    """A tokenizer the test may change (its chat template)."""
    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="module")
def stops(tok):
    return stop_token_ids(tok)


# ---------------------------------------------------------------- the built-in tokenizer


def test_builtin_tokenizer_ids(tok):
    assert (tok.pad_token_id, tok.eos_token_id) == (PAD, END)
    assert tok.convert_tokens_to_ids(["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]) == [0, 1, 2, 3]
    assert tok("Hé")["input_ids"] == b("Hé")
    assert stop_token_ids(tok) == {END}


def test_stop_token_ids_include_generation_config(tok):
    assert stop_token_ids(tok, SimpleNamespace(eos_token_id=ENDOFTEXT)) == {END, ENDOFTEXT}
    assert stop_token_ids(tok, SimpleNamespace(eos_token_id=[ENDOFTEXT, 7])) == {END, ENDOFTEXT, 7}
    assert stop_token_ids(tok, SimpleNamespace(eos_token_id=None)) == {END}


# ---------------------------------------------------------------- conversations


def test_multi_turn_exact_ids_and_mask(tok, stops):
    [sample] = tokenize_sft(tok, [MULTI], stops)
    expected = (
        turn("system", "Be brief.")
        + turn("user", "Hi")
        + turn("assistant", "Hello!")
        + turn("user", "2+2?")
        + turn("assistant", "4")
    )
    assert sample.input_ids == expected
    assert labels(sample) == b("Hello!") + [END] + b("4") + [END]
    assert sample.where == "chat.jsonl:1"
    assert sample.position_ids is None
    # The exact places: everything up to and including "assistant\n" is not trained.
    first = len(turn("system", "Be brief.") + turn("user", "Hi") + header("assistant"))
    second = len(expected) - len(b("4") + [END])
    mask = [False] * len(expected)
    mask[first : first + len(b("Hello!")) + 1] = [True] * (len(b("Hello!")) + 1)
    mask[second:] = [True] * (len(expected) - second)
    assert sample.loss_mask == mask


def test_prompt_completion_messages_train_only_completion(tok, stops):
    example = SFTExample("f:1", (
        Message("user", "q"), Message("assistant", "old"), Message("user", "again"), Message("assistant", "new", True)))
    [sample] = tokenize_sft(tok, [example], stops)
    assert sample.input_ids == turn("user", "q") + turn("assistant", "old") + turn("user", "again") + turn("assistant", "new")
    assert labels(sample) == b("new") + [END]


def test_template_text_after_end_token_is_not_trained(fresh_tok, stops):
    # ChatML with a newline after <|im_end|>: the newline is template text, not what the model produces.
    fresh_tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    [sample] = tokenize_sft(fresh_tok, [chat(("user", "u"), ("assistant", "a"), ("user", "v"), ("assistant", "b"))], stops)
    nl = b("\n")
    assert sample.input_ids == turn("user", "u") + nl + turn("assistant", "a") + nl + turn("user", "v") + nl + turn("assistant", "b") + nl
    assert labels(sample) == b("a") + [END] + b("b") + [END]


def test_template_without_end_token_gets_eos_appended(fresh_tok, stops):
    fresh_tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    [sample] = tokenize_sft(fresh_tok, [chat(("user", "u"), ("assistant", "a"))], stops)
    assert sample.input_ids == b("user: u\nassistant: a\n") + [END]
    assert labels(sample) == b("a\n") + [END]


def test_fallback_template_for_tokenizer_without_one(tmp_path, stops):
    copy = tmp_path / "model"
    shutil.copytree(TINY_DIR, copy)
    (copy / "chat_template.jinja").unlink()
    tokenizer = load_tokenizer(ModelConfig(path=str(copy)))
    assert tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE
    example = chat(("user", "Hi"), ("assistant", "Yo"), ("user", "Bye"), ("assistant", "Ok"))
    [sample] = tokenize_sft(tokenizer, [example], stops)
    nl = b("\n")
    assert sample.input_ids == (
        b("### user:\nHi") + [END] + nl + b("### assistant:\nYo") + [END] + nl
        + b("### user:\nBye") + [END] + nl + b("### assistant:\nOk") + [END] + nl
    )
    # Each assistant turn is trained through its EOS, and nothing else.
    assert labels(sample) == b("Yo") + [END] + b("Ok") + [END]
    prompt = encode_prompt(tokenizer, example)
    assert prompt == b("### user:\nHi") + [END] + nl + b("### assistant:\n")


def test_load_tokenizer_adds_pad_distinct_from_eos(tmp_path):
    import json

    copy = tmp_path / "model"
    shutil.copytree(TINY_DIR, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["pad_token"] = config["eos_token"]
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(ModelConfig(path=str(copy)))
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.mark.parametrize(
    "template",
    [
        pytest.param(  # earlier assistant turns are dropped once a later turn exists
            "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
            "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
            id="drops-earlier-assistant",
        ),
        pytest.param(  # only the last user message is rendered
            "{% for m in messages %}{% if m['role'] == 'assistant' or loop.index0 == messages|length - 1 "
            "or (loop.index0 == messages|length - 2 and messages[-1]['role'] == 'assistant') %}"
            "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
            id="last-user-only",
        ),
        pytest.param(  # the generation prompt is not how an assistant turn starts
            "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}",
            id="generation-prompt-differs",
        ),
    ],
)
def test_non_prefix_preserving_template_is_refused(fresh_tok, stops, template):
    fresh_tok.chat_template = template
    with pytest.raises(UserError) as info:
        tokenize_sft(fresh_tok, [MULTI], stops)
    assert str(info.value).startswith("chat.jsonl:1: ")
    assert "prefix-preserving" in str(info.value)


def test_encode_prompt_response_refuses_non_prefix_preserving(fresh_tok, stops):
    fresh_tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
    )
    with pytest.raises(UserError, match="r.jsonl:2: .*prefix-preserving"):
        encode_prompt_response(fresh_tok, [Message("user", "q")], [Message("assistant", "a")], stops, "r.jsonl:2")


# ---------------------------------------------------------------- plain text


def test_plain_prompt_completion_ids_and_mask(tok, stops):
    examples = [SFTExample("p:1", prompt="Q: 1+2=", completion="3"), SFTExample("p:2", prompt="", completion="xy")]
    first, second = tokenize_sft(tok, examples, stops)
    assert first.input_ids == b("Q: 1+2=") + b("3") + [END]
    assert first.loss_mask == [False] * len(b("Q: 1+2=")) + [True, True]
    assert labels(first) == b("3") + [END]
    assert second.input_ids == b("xy") + [END]
    assert second.loss_mask == [True, True, True]
    assert (first.where, second.where) == ("p:1", "p:2")


def test_mixed_plain_and_conversation_keep_order(tok, stops):
    examples = [SFTExample("a", prompt="P", completion="C"), chat(("user", "u"), ("assistant", "v")),
                SFTExample("c", prompt="Q", completion="D")]
    samples = tokenize_sft(tok, examples, stops)
    assert [s.input_ids for s in samples] == [
        b("PC") + [END], turn("user", "u") + turn("assistant", "v"), b("QD") + [END]]


def test_encode_prompt_and_prompt_response(tok, stops):
    assert encode_prompt(tok, MULTI) == turn("system", "Be brief.") + turn("user", "Hi") + header("assistant")
    assert encode_prompt(tok, SFTExample("p", prompt="Q: 5=", completion="5")) == b("Q: 5=")
    prompt, response = encode_prompt_response(tok, "Q:", "42", stops, "x")
    assert (prompt, response) == (b("Q:"), b("42") + [END])
    prompt, response = encode_prompt_response(tok, [Message("user", "q")], [Message("assistant", "a")], stops, "x")
    assert prompt == turn("user", "q") + header("assistant")
    assert response == b("a") + [END]


# ---------------------------------------------------------------- max length


def _sample(where: str, n: int, trained_from: int) -> TokenizedSample:
    return TokenizedSample(list(range(10, 10 + n)), [i >= trained_from for i in range(n)], where)


@pytest.fixture
def three():
    # fits; too long but keeps trained tokens after the cut; too long with every trained token cut off
    return [_sample("s:1", 8, 4), _sample("s:2", 12, 6), _sample("s:3", 12, 9)]


def test_truncate_policy(three):
    report = TruncationReport()
    kept = apply_max_length(three, 8, Truncation.truncate, report)
    assert [s.where for s in kept] == ["s:1", "s:2"]
    assert kept[0] is three[0]
    assert kept[1].input_ids == three[1].input_ids[:8]
    assert kept[1].loss_mask == three[1].loss_mask[:8] == [False] * 6 + [True, True]
    assert (report.total, report.truncated, report.dropped) == (3, 2, ["s:3"])
    assert report.summary("train", 8) == (
        "train: 2 of 3 samples longer than data.max_length=8 were truncated; 1 dropped (first: s:3)")


def test_truncate_drops_sample_whose_only_trained_token_is_first():
    # A label at position 0 can never be predicted, so such a sample has nothing left to learn.
    report = TruncationReport()
    sample = TokenizedSample([5, 6, 7, 8], [True, False, False, True], "s:1")
    assert apply_max_length([sample], 3, Truncation.truncate, report) == []
    assert report.dropped == ["s:1"]


def test_drop_policy(three):
    report = TruncationReport()
    kept = apply_max_length(three, 8, Truncation.drop, report)
    assert kept == [three[0]]
    assert (report.total, report.truncated, report.dropped) == (3, 0, ["s:2", "s:3"])
    assert report.summary("eval", 8) == "eval: 2 dropped (first: s:2)"


def test_error_policy(three):
    with pytest.raises(UserError) as info:
        apply_max_length(three, 8, Truncation.error, TruncationReport())
    message = str(info.value)
    assert message.startswith("s:2: 12 tokens, over data.max_length=8")


def test_nothing_over_the_limit(three):
    report = TruncationReport()
    assert apply_max_length(three, 12, Truncation.error, report) == three
    assert (report.total, report.truncated, report.dropped) == (3, 0, [])
    assert report.summary("train", 12) is None


def test_report_accumulates_over_calls(three):
    report = TruncationReport()
    apply_max_length(three[:2], 8, Truncation.truncate, report)
    apply_max_length(three[2:], 8, Truncation.truncate, report)
    assert (report.total, report.truncated, report.dropped) == (3, 2, ["s:3"])


# ---------------------------------------------------------------- packing


def _distinct_samples(lengths: list[int]) -> list[TokenizedSample]:
    samples, next_id = [], 4
    for k, n in enumerate(lengths):
        ids = list(range(next_id, next_id + n))
        next_id += n
        samples.append(TokenizedSample(ids, [j % 3 != 0 for j in range(n)], f"s:{k}"))
    return samples


def _segments(row: TokenizedSample) -> list[tuple[list[int], list[bool]]]:
    starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
    return [(row.input_ids[a:b], row.loss_mask[a:b]) for a, b in zip(starts, starts[1:])]


@pytest.mark.parametrize("max_length", [16, 23, 64])
def test_pack_keeps_every_sample_once(max_length):
    lengths = [5, 16, 1, 7, 9, 3, 3, 12, 2, 8, 4, 15, 6, 1, 10]
    samples = _distinct_samples(lengths)
    rows = pack(samples, max_length)
    assert all(len(r.input_ids) <= max_length for r in rows)
    assert len(rows) < len(samples)
    total = sum(lengths)
    assert len(rows) >= -(-total // max_length)
    seen = []
    for row in rows:
        assert len(row.input_ids) == len(row.loss_mask) == len(row.position_ids)
        for ids, mask in _segments(row):
            original = next(s for s in samples if s.input_ids == ids)
            seen.append(original.where)
            assert row.position_ids[row.input_ids.index(ids[0]) : row.input_ids.index(ids[0]) + len(ids)] == list(range(len(ids)))
            assert mask[0] is False
            assert mask[1:] == original.loss_mask[1:]
    assert sorted(seen) == sorted(s.where for s in samples)


def test_pack_best_fit_decreasing_exact():
    samples = _distinct_samples([4, 8, 4, 8, 4, 4])
    rows = pack(samples, 16)
    assert len(rows) == 2
    assert [len(r.input_ids) for r in rows] == [16, 16]
    assert [r.where for r in rows] == ["s:1", "s:0"]  # a row is named after its first (longest) sample
    assert rows[0].input_ids == samples[1].input_ids + samples[3].input_ids
    assert rows[0].position_ids == list(range(8)) * 2


def test_pack_first_token_of_each_sample_untrained():
    samples = [TokenizedSample([5, 6, 7], [True, True, True], "a"), TokenizedSample([8, 9], [True, True], "b")]
    [row] = pack(samples, 8)
    assert row.input_ids == [5, 6, 7, 8, 9]
    assert row.loss_mask == [False, True, True, False, True]
    assert row.position_ids == [0, 1, 2, 0, 1]


# ---------------------------------------------------------------- packing, checked against the model


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return load_causal_lm(ModelConfig(), tok, seed=0)


@pytest.fixture(scope="module")
def packed_three(tok, stops):
    examples = [SFTExample("a", prompt="Q: 12+30=", completion="42"), chat(("user", "hi"), ("assistant", "hello there")),
                SFTExample("c", prompt="xyz", completion="!")]
    samples = tokenize_sft(tok, examples, stops)
    [row] = pack(samples, 128)
    order = sorted(samples, key=lambda s: -len(s.input_ids))  # the order pack lays them out in
    assert row.input_ids == sum((s.input_ids for s in order), [])
    return row, order


def _alone(model, sample: TokenizedSample) -> torch.Tensor:
    return model(input_ids=torch.tensor([sample.input_ids]), use_cache=False).logits[0]


@torch.no_grad()
def test_packed_row_logits_equal_each_sample_alone(model, tok, packed_three):
    row, order = packed_three
    batch = collate([row], tok.pad_token_id)
    assert set(batch) == {"input_ids", "loss_mask", "position_ids"}
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    offset = 0
    for sample in order:
        n = len(sample.input_ids)
        torch.testing.assert_close(logits[offset : offset + n], _alone(model, sample), atol=1e-5, rtol=0)
        offset += n


@torch.no_grad()
def test_padded_batch_of_packed_rows_logits_equal_each_sample_alone(model, tok, stops):
    samples = tokenize_sft(tok, [SFTExample(str(i), prompt=p, completion=c) for i, (p, c) in
                                 enumerate([("a" * 20, "b"), ("cd", "e"), ("f" * 10, "gh"), ("i", "jk"), ("l" * 9, "m")])], stops)
    rows = pack(samples, 24)
    assert len(rows) >= 2 and len({len(r.input_ids) for r in rows}) > 1
    batch = collate(rows, tok.pad_token_id)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    for r, row in enumerate(rows):
        starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
        for a, z in zip(starts, starts[1:]):
            sample = next(s for s in samples if s.input_ids == row.input_ids[a:z])
            torch.testing.assert_close(logits[r, a:z], _alone(model, sample), atol=1e-5, rtol=0)


@torch.no_grad()
def test_without_position_ids_samples_attend_across_boundaries(model, packed_three):
    # The control: plain causal attention over the concatenation changes the second sample's logits.
    row, order = packed_three
    logits = model(input_ids=torch.tensor([row.input_ids]), use_cache=False).logits[0]
    first, second = len(order[0].input_ids), len(order[1].input_ids)
    torch.testing.assert_close(logits[:first], _alone(model, order[0]), atol=1e-5, rtol=0)
    assert not torch.allclose(logits[first : first + second], _alone(model, order[1]), atol=1e-3)


@torch.no_grad()
def test_packed_row_isolated_in_the_call_sft_makes(model, tok, packed_three):
    row, order = packed_three
    from rlhf_cli.models import forward_inputs

    logits = model(**forward_inputs(collate([row], tok.pad_token_id))).logits[0]
    offset = 0
    for sample in order:
        n = len(sample.input_ids)
        torch.testing.assert_close(logits[offset : offset + n], _alone(model, sample), atol=1e-5, rtol=0)
        offset += n


# ---------------------------------------------------------------- collate


def test_collate_right_pads():
    samples = [TokenizedSample([5, 6, 7], [False, True, True], "a"), TokenizedSample([8, 9, 10, 11, 12], [False, False, True, True, True], "b")]
    batch = collate(samples, 0)
    assert set(batch) == {"input_ids", "loss_mask", "attention_mask"}
    assert batch["input_ids"].dtype == torch.long and batch["loss_mask"].dtype == torch.bool
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["loss_mask"].tolist() == [[False, True, True, False, False], [False, False, True, True, True]]


def test_collate_uses_given_pad_id():
    batch = collate([TokenizedSample([5], [True], "a"), TokenizedSample([6, 7], [True, True], "b")], 99)
    assert batch["input_ids"].tolist() == [[5, 99], [6, 7]]
    assert batch["loss_mask"].tolist() == [[True, False], [True, True]]


def test_collate_packed_rows_pass_position_ids_and_no_attention_mask():
    rows = [TokenizedSample([5, 6, 7, 8], [False, True, False, True], "a", [0, 1, 0, 1]),
            TokenizedSample([9, 10], [False, True], "b", [0, 1])]
    batch = collate(rows, 0)
    assert set(batch) == {"input_ids", "loss_mask", "position_ids"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    # Padding restarts at 0: it is a sample of its own and never joins the last real one.
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]
    assert batch["loss_mask"].tolist() == [[False, True, False, True], [False, True, False, False]]


# ---------------------------------------------------------------- StepBatches


def _steps(batches: StepBatches, steps) -> list[list[list]]:
    return [batches.micro_batches(k) for k in steps]


def test_step_batches_shape():
    batches = StepBatches(list(range(24)), batch_size=3, grad_accum=2, seed=0)
    assert batches.samples_per_step == 6
    micro = batches.micro_batches(0)
    assert len(micro) == 2 and all(len(m) == 3 for m in micro)


def test_each_process_takes_its_share_of_the_one_process_step(monkeypatch):
    from rlhf_cli import distributed

    one = StepBatches(list(range(40)), batch_size=4, grad_accum=2, seed=3)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        shares.append(StepBatches(list(range(40)), batch_size=2, grad_accum=2, seed=3))
    assert shares[0].samples_per_step == one.samples_per_step == 8
    for step in range(7):  # across epoch boundaries too
        together = sum(shares[0].micro_batches(step) + shares[1].micro_batches(step), [])
        assert together == sum(one.micro_batches(step), [])


def test_step_batches_deterministic_given_seed():
    a = StepBatches(list(range(20)), batch_size=2, grad_accum=2, seed=7)
    b2 = StepBatches(list(range(20)), batch_size=2, grad_accum=2, seed=7)
    c = StepBatches(list(range(20)), batch_size=2, grad_accum=2, seed=8)
    assert _steps(a, range(12)) == _steps(b2, range(12))
    assert _steps(a, range(12)) != _steps(c, range(12))


def test_step_batches_shuffled_and_each_epoch_reshuffled():
    batches = StepBatches(list(range(12)), batch_size=2, grad_accum=3, seed=0)
    epoch0 = sum(sum(_steps(batches, [0, 1]), []), [])
    epoch1 = sum(sum(_steps(batches, [2, 3]), []), [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != list(range(12))
    assert epoch0 != epoch1


def test_step_batches_every_sample_once_per_epoch_uneven():
    n = 10
    batches = StepBatches([f"s{i}" for i in range(n)], batch_size=2, grad_accum=2, seed=3)  # 4 per step
    flat = [s for step in _steps(batches, range(5)) for micro in step for s in micro]  # 20 positions = 2 epochs
    assert sorted(flat[:n]) == sorted(flat[n:]) == sorted(f"s{i}" for i in range(n))


def test_step_batches_resume_gives_same_step():
    samples = list(range(13))
    straight = _steps(StepBatches(samples, 2, 3, seed=11), range(10))
    for k in (0, 3, 7, 9):
        assert StepBatches(samples, 2, 3, seed=11).micro_batches(k) == straight[k]
    # Order of calls does not matter either (the cached epoch permutation is refreshed when needed).
    shuffled = StepBatches(samples, 2, 3, seed=11)
    for k in (9, 2, 7, 0, 5):
        assert shuffled.micro_batches(k) == straight[k]

import itertools

import pytest

from rlhf_cli.config.schema import DataFormat
from rlhf_cli.data.formats import Message
from rlhf_cli.data.preferences import to_preference_groups
from rlhf_cli.data.sources import Row
from rlhf_cli.errors import UserError


def groups(*rows, fmt=DataFormat.auto, use_margin=False):
    return to_preference_groups([Row(r, f"p.jsonl:{i + 1}") for i, r in enumerate(rows)], fmt, use_margin)


def msg(role, content):
    return {"role": role, "content": content}


def test_explicit_prompt_strings():
    (g,) = groups({"prompt": "Q: 2+2=", "chosen": "4", "rejected": "5", "margin": 1.5}, use_margin=True)
    assert g.prompt == "Q: 2+2=" and g.responses == ("4", "5") and g.pairs == ((0, 1, 1.5),)


def test_margin_is_ignored_unless_asked_for():
    (g,) = groups({"prompt": "x", "chosen": "a", "rejected": "b", "margin": 3})
    assert g.pairs == ((0, 1, 0.0),)


def test_hh_transcripts_split_at_the_last_shared_assistant_turn():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4"
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: five"
    (g,) = groups({"chosen": chosen, "rejected": rejected})
    assert g.prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant:"
    assert g.responses == (" 4", " five")


def test_message_lists_share_their_common_prefix_as_prompt():
    row = {"prompt": "2+2?", "chosen": [msg("user", "2+2?"), msg("assistant", "4")],
           "rejected": [msg("user", "2+2?"), msg("assistant", "5")]}
    (g,) = groups(row)
    assert g.prompt == (Message("user", "2+2?"),)
    assert [r[0].content for r in g.responses] == ["4", "5"]


def test_conversational_explicit_prompt():
    row = {"prompt": [msg("system", "be exact"), msg("user", "2+2?")],
           "chosen": [msg("assistant", "4")], "rejected": [msg("assistant", "5")]}
    (g,) = groups(row)
    assert [m.role for m in g.prompt] == ["system", "user"] and g.responses[0][0].content == "4"


def test_ranked_best_first_forms_every_pair_once():
    (g,) = groups({"prompt": "Q", "responses": ["a", "b", "c", "d"]})
    assert len(g.pairs) == 6
    unordered = {frozenset(p[:2]) for p in g.pairs}
    assert unordered == {frozenset(c) for c in itertools.combinations(range(4), 2)}
    assert all(better < worse for better, worse, _ in g.pairs)  # better = earlier in the list


def test_ranked_with_scores_orders_by_score_skips_ties_and_uses_differences_as_margins():
    (g,) = groups({"prompt": "Q", "responses": ["a", "b", "c"], "scores": [1.0, 3.0, 1.0]}, use_margin=True)
    assert sorted(g.pairs) == [(1, 0, 2.0), (1, 2, 2.0)]  # a and c tie: no pair between them


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": "x", "chosen": "a"}, "p.jsonl:1: missing field 'rejected'"),
        ({"prompt": "x", "chosen": "a", "rejected": "a"}, "p.jsonl:1: chosen and rejected are the same response"),
        ({"prompt": "x"}, "p.jsonl:1: this row has no chosen/rejected responses"),
        ({"prompt": "x", "responses": ["only"]}, "p.jsonl:1: a ranked row needs at least 2 responses, found 1"),
        ({"prompt": "x", "responses": ["a", "a"]}, "same response twice"),
        ({"prompt": "x", "chosen": "a", "rejected": [msg("assistant", "b")]}, "both be strings or both be message lists"),
        ({"prompt": "x", "responses": ["a", "b"], "scores": [1]}, "field 'scores' must be a list of 2 numbers"),
        ({"chosen": [msg("user", "q"), msg("assistant", "a")], "rejected": [msg("user", "other"), msg("assistant", "b")]},
         "share no prompt messages"),
    ],
)
def test_bad_preference_rows(row, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        groups(row)


def test_sft_rows_are_not_preference_data():
    with pytest.raises(UserError, match="no chosen/rejected"):
        groups({"messages": [msg("user", "x"), msg("assistant", "y")]})

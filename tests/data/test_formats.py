"""Format detection and normalisation of rows into SFT examples, and the errors for bad rows."""

from __future__ import annotations

import pytest

from rlhf_cli.config.schema import DataFormat
from rlhf_cli.data.formats import Message, SFTExample, detect_format, to_sft_examples
from rlhf_cli.data.sources import Row
from rlhf_cli.errors import UserError

W = "data.jsonl:7"


def one(data: dict, fmt: DataFormat = DataFormat.auto) -> SFTExample:
    examples = to_sft_examples([Row(data, W)], fmt)
    assert len(examples) == 1
    assert examples[0].where == W
    return examples[0]


def error(data: dict, fmt: DataFormat = DataFormat.auto) -> str:
    with pytest.raises(UserError) as info:
        to_sft_examples([Row(data, W)], fmt)
    message = str(info.value)
    assert message.startswith(f"{W}: "), message
    return message


def trained(example: SFTExample) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in example.messages if m.train]


MESSAGES = {
    "messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
        {"role": "assistant", "content": "A2"},
    ]
}


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        (MESSAGES, DataFormat.messages),
        ({"conversations": []}, DataFormat.sharegpt),
        ({"instruction": "i", "output": "o"}, DataFormat.alpaca),
        ({"instruction": "i", "input": "x", "output": "o"}, DataFormat.alpaca),
        ({"prompt": "p", "completion": "c"}, DataFormat.prompt_completion),
        ({"prompt": [], "completion": [], "answer": "1"}, DataFormat.prompt_completion),
    ],
)
def test_detect_format(data, fmt):
    assert detect_format(Row(data, W)) == fmt


def test_detect_preference_row_refused_for_sft():
    message = error({"prompt": "p", "chosen": "a", "rejected": "b"})
    assert "preference" in message and "chosen/rejected" in message


def test_detect_unrecognised_keys_lists_them():
    message = error({"question": "q", "reply": "r"})
    assert "cannot tell the format" in message
    assert "question, reply" in message


def test_detect_no_keys():
    assert "(none)" in error({})


def test_detect_uses_first_row_and_later_rows_must_match():
    rows = [Row({"prompt": "p", "completion": "c"}, "f.jsonl:1"), Row({"messages": MESSAGES["messages"]}, "f.jsonl:2")]
    with pytest.raises(UserError) as info:
        to_sft_examples(rows, DataFormat.auto)
    assert str(info.value) == "f.jsonl:2: missing field 'prompt'"


@pytest.mark.parametrize("fmt", [DataFormat.preference, DataFormat.ranked])
def test_explicit_preference_format_refused(fmt):
    with pytest.raises(UserError, match=f"data.format: '{fmt.value}' is preference data"):
        to_sft_examples([Row({"prompt": "p", "chosen": "a", "rejected": "b"}, W)], fmt)


def test_explicit_format_overrides_detection():
    # The keys would be detected as messages, but data.format says prompt_completion.
    data = {"messages": [], "prompt": "p", "completion": "c"}
    example = one(data, DataFormat.prompt_completion)
    assert (example.prompt, example.completion, example.messages) == ("p", "c", None)


# ---------------------------------------------------------------- messages


def test_messages_normalised_only_assistant_turns_trained():
    example = one({**MESSAGES, "answer": 42})
    assert example.messages == (
        Message("system", "S", False),
        Message("user", "U1", False),
        Message("assistant", "A1", True),
        Message("user", "U2", False),
        Message("assistant", "A2", True),
    )
    assert example.prompt is None and example.completion is None
    assert example.answer == "42"
    assert example.prompt_messages == example.messages[:2]


def test_messages_tool_turns_not_trained():
    example = one({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "call"},
                                {"role": "tool", "content": "result"}, {"role": "assistant", "content": "done"}]})
    assert [m.train for m in example.messages] == [False, True, False, True]


def test_messages_missing_field():
    assert error({"messages": None}, DataFormat.messages) == f"{W}: missing field 'messages'"


def test_messages_wrong_type():
    message = error({"messages": "hello"})
    assert message == f"{W}: field 'messages' must be a list, found str"


def test_messages_item_not_an_object():
    message = error({"messages": [{"role": "user", "content": "u"}, "assistant: hi"]})
    assert "messages[1]" in message and "must be an object" in message


def test_messages_unknown_role():
    message = error({"messages": [{"role": "user", "content": "u"}, {"role": "bot", "content": "a"}]})
    assert "messages[1].role" in message and "'bot'" in message
    assert "system, user, assistant, tool" in message


def test_messages_missing_role():
    message = error({"messages": [{"content": "u"}]})
    assert "messages[0].role" in message and "'None'" in message


@pytest.mark.parametrize("role", [["user"], {"name": "user"}])
def test_messages_unhashable_role_is_a_user_error(role):
    message = error({"messages": [{"role": role, "content": "u"}, {"role": "assistant", "content": "a"}]})
    assert "messages[0].role" in message


def test_messages_content_not_a_string():
    message = error({"messages": [{"role": "user", "content": ["u"]}, {"role": "assistant", "content": "a"}]})
    assert message == f"{W}: messages[0].content must be a string, found list"


def test_messages_no_assistant_turn():
    message = error({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]})
    assert message == f"{W}: field 'messages' has no assistant turn to learn from"


def test_messages_empty_list_has_no_assistant_turn():
    assert "no assistant turn" in error({"messages": []})


# ---------------------------------------------------------------- sharegpt


def test_sharegpt_roles_mapped_and_trained():
    example = one({"conversations": [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "H1"},
        {"from": "gpt", "value": "G1"},
        {"from": "human", "value": "H2"},
        {"from": "gpt", "value": "G2"},
    ]})
    assert example.messages == (
        Message("system", "S"),
        Message("user", "H1"),
        Message("assistant", "G1", True),
        Message("user", "H2"),
        Message("assistant", "G2", True),
    )


def test_sharegpt_system_field_prepended():
    example = one({"system": "SYS", "conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]})
    assert example.messages == (Message("system", "SYS"), Message("user", "h"), Message("assistant", "g", True))


def test_sharegpt_tool_roles():
    example = one({"conversations": [
        {"from": "human", "value": "h"},
        {"from": "function_call", "value": "f()"},
        {"from": "observation", "value": "ok"},
        {"from": "gpt", "value": "g"},
    ]})
    assert [(m.role, m.train) for m in example.messages] == [
        ("user", False), ("assistant", True), ("tool", False), ("assistant", True)]


def test_sharegpt_unknown_role():
    message = error({"conversations": [{"from": "human", "value": "h"}, {"from": "bard", "value": "g"}]})
    assert "conversations[1].from" in message and "'bard'" in message


def test_sharegpt_value_not_string():
    message = error({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "g"}]})
    assert message == f"{W}: conversations[0].value must be a string, found int"


def test_sharegpt_wrong_type_and_no_assistant():
    assert error({"conversations": {"from": "gpt"}}) == f"{W}: field 'conversations' must be a list, found dict"
    assert "field 'conversations' has no assistant turn" in error({"conversations": [{"from": "human", "value": "h"}]})


def test_sharegpt_system_wrong_type():
    message = error({"system": ["s"], "conversations": [{"from": "gpt", "value": "g"}]})
    assert message == f"{W}: field 'system' must be a string, found list"


# ---------------------------------------------------------------- alpaca


def test_alpaca_without_input():
    example = one({"instruction": "Do it", "output": "Done"})
    assert example.messages == (Message("user", "Do it"), Message("assistant", "Done", True))


@pytest.mark.parametrize("empty", ["", None])
def test_alpaca_empty_input_ignored(empty):
    example = one({"instruction": "Do it", "input": empty, "output": "Done"})
    assert example.messages[0] == Message("user", "Do it")


def test_alpaca_with_input():
    example = one({"instruction": "Translate", "input": "bonjour", "output": "hello"})
    assert example.messages == (Message("user", "Translate\n\nbonjour"), Message("assistant", "hello", True))


def test_alpaca_with_system_and_history():
    example = one({
        "instruction": "I",
        "input": "X",
        "output": "O",
        "system": "S",
        "history": [["q1", "a1"], ["q2", "a2"]],
        "answer": "O",
    })
    assert example.messages == (
        Message("system", "S"),
        Message("user", "q1"),
        Message("assistant", "a1", True),
        Message("user", "q2"),
        Message("assistant", "a2", True),
        Message("user", "I\n\nX"),
        Message("assistant", "O", True),
    )
    assert trained(example) == [("assistant", "a1"), ("assistant", "a2"), ("assistant", "O")]
    assert example.answer == "O"
    assert example.prompt_messages == example.messages[:2]


def test_alpaca_missing_output_with_explicit_format():
    assert error({"instruction": "I"}, DataFormat.alpaca) == f"{W}: missing field 'output'"


def test_alpaca_wrong_types():
    assert error({"instruction": 5, "output": "o"}) == f"{W}: field 'instruction' must be a string, found int"
    assert error({"instruction": "i", "output": "o", "input": ["x"]}) == f"{W}: field 'input' must be a string, found list"
    assert error({"instruction": "i", "output": "o", "history": "h"}) == f"{W}: field 'history' must be a list, found str"


@pytest.mark.parametrize("turn", [["only one"], ["q", "a", "extra"], ["q", 1], "qa"])
def test_alpaca_bad_history_pair(turn):
    message = error({"instruction": "i", "output": "o", "history": [["q", "a"], turn]})
    assert message == f"{W}: history[1] must be a [question, answer] pair of strings"


# ---------------------------------------------------------------- prompt / completion


def test_prompt_completion_strings():
    example = one({"prompt": "Q: 1+1=", "completion": "2", "answer": "2"})
    assert example == SFTExample(W, None, "Q: 1+1=", "2", "2")


def test_prompt_completion_empty_prompt_allowed():
    assert one({"prompt": "", "completion": "c"}).prompt == ""


def test_prompt_completion_empty_completion_refused():
    assert error({"prompt": "p", "completion": ""}) == f"{W}: field 'completion' is empty"


def test_prompt_completion_message_lists_only_completion_assistant_trained():
    example = one({
        "prompt": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A-in-prompt"},
            {"role": "user", "content": "U2"},
        ],
        "completion": [
            {"role": "assistant", "content": "A1"},
            {"role": "tool", "content": "T"},
            {"role": "assistant", "content": "A2"},
        ],
    })
    assert example.messages == (
        Message("system", "S"),
        Message("user", "U1"),
        Message("assistant", "A-in-prompt", False),
        Message("user", "U2"),
        Message("assistant", "A1", True),
        Message("tool", "T", False),
        Message("assistant", "A2", True),
    )
    assert example.prompt is None and example.completion is None
    assert example.prompt_messages == example.messages[:4]


def test_prompt_completion_missing_field():
    assert error({"prompt": "p", "completion": None}) == f"{W}: missing field 'completion'"


def test_prompt_completion_wrong_type():
    message = error({"prompt": 3, "completion": "c"})
    assert message.startswith(f"{W}: field 'prompt' must be ") and message.endswith(", found int")
    assert "str" in message and "list" in message


def test_prompt_completion_wrong_type_wording():
    assert error({"prompt": 3, "completion": "c"}) == f"{W}: field 'prompt' must be a string or a list, found int"


@pytest.mark.parametrize(
    "data",
    [
        {"prompt": "p", "completion": [{"role": "assistant", "content": "a"}]},
        {"prompt": [{"role": "user", "content": "u"}], "completion": "a"},
    ],
)
def test_prompt_completion_mixed_string_and_list(data):
    message = error(data)
    assert "'prompt' and 'completion' must both be strings or both be message lists" in message


def test_prompt_completion_bad_prompt_message():
    message = error({"prompt": [{"role": "user", "content": "u"}, {"role": "narrator", "content": "x"}],
                     "completion": [{"role": "assistant", "content": "a"}]})
    assert "prompt[1]" in message and "role" in message


def test_prompt_completion_completion_without_assistant():
    message = error({"prompt": [{"role": "user", "content": "u"}], "completion": [{"role": "user", "content": "x"}]})
    assert message == f"{W}: field 'completion' has no assistant turn to learn from"


def test_rows_keep_their_own_where():
    rows = [Row({"prompt": "a", "completion": "b"}, "f.jsonl:1"), Row({"prompt": "c", "completion": "d"}, "f.jsonl:3")]
    assert [e.where for e in to_sft_examples(rows, DataFormat.auto)] == ["f.jsonl:1", "f.jsonl:3"]

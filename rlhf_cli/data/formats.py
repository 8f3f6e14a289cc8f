"""Row formats, detected from a row's keys, normalised into one record type per use.

For supervised fine-tuning every format becomes an `SFTExample`: either a conversation (a list of
messages, each marked as trained or not) or a plain-text prompt and completion. Conversations go
through the tokenizer's chat template; plain text does not (the TRL convention for
"standard" prompt-completion rows).

| format              | keys                                                   |
| ------------------- | ------------------------------------------------------ |
| `messages`          | `messages`: [{role, content}], OpenAI roles            |
| `sharegpt`          | `conversations`: [{from, value}], system/human/gpt     |
| `alpaca`            | `instruction`, `output`, optional `input`, `system`, `history` |
| `prompt_completion` | `prompt`, `completion` (strings, or message lists)     |

Any row may carry an `answer` string: evaluation decodes the prompt greedily and checks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from rlhf_cli.config.schema import DataFormat
from rlhf_cli.data.sources import Row
from rlhf_cli.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool", "function_call": "assistant", "observation": "tool"}


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    train: bool = False  # its tokens are labels (assistant turns of the response)


Text = Union[str, tuple[Message, ...]]  # plain text, or messages


@dataclass(frozen=True)
class SFTExample:
    where: str
    messages: Optional[tuple[Message, ...]] = None  # conversational
    prompt: Optional[str] = None  # plain text
    completion: Optional[str] = None
    answer: Optional[str] = None

    @property
    def prompt_messages(self) -> tuple[Message, ...]:
        """The conversation up to its first trained turn: what a model is asked at evaluation."""
        assert self.messages is not None
        first = next(i for i, m in enumerate(self.messages) if m.train)
        return self.messages[:first]


def detect_format(row: Row) -> DataFormat:
    keys = set(row.data)
    if "messages" in keys:
        return DataFormat.messages
    if "conversations" in keys:
        return DataFormat.sharegpt
    if {"instruction", "output"} <= keys:
        return DataFormat.alpaca
    if {"prompt", "completion"} <= keys:
        return DataFormat.prompt_completion
    if {"chosen", "rejected"} & keys:
        raise UserError(f"{row.where}: this is preference data (chosen/rejected), which sft does not train on")
    shown = ", ".join(sorted(keys)) or "none"
    raise UserError(
        f"{row.where}: cannot tell the format from the keys ({shown}); expected messages, conversations, "
        "instruction+output or prompt+completion, or set data.format"
    )


def to_sft_examples(rows: list[Row], data_format: DataFormat) -> list[SFTExample]:
    fmt = detect_format(rows[0]) if data_format == DataFormat.auto else data_format
    if fmt in (DataFormat.preference, DataFormat.ranked):
        raise UserError(f"data.format: '{fmt.value}' is preference data, which sft does not train on")
    convert = {
        DataFormat.messages: _from_messages,
        DataFormat.sharegpt: _from_sharegpt,
        DataFormat.alpaca: _from_alpaca,
        DataFormat.prompt_completion: _from_prompt_completion,
    }[fmt]
    return [convert(row) for row in rows]


def _field(row: Row, key: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
    value = row.data.get(key)
    if value is None:
        if required:
            raise UserError(f"{row.where}: missing field '{key}'")
        return None
    if not isinstance(value, kind):
        expected = " or ".join(_article(k.__name__) for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise UserError(f"{row.where}: field '{key}' must be {expected}, found {type(value).__name__}")
    return value


def _article(name: str) -> str:
    return {"str": "a string", "list": "a list", "dict": "an object"}.get(name, name)


def _answer(row: Row) -> Optional[str]:
    value = row.data.get("answer")
    return None if value is None else str(value)


def _messages(row: Row, key: str, items: list, role_key: str, content_key: str,
              roles: dict[str, str], trained_roles: set[str]) -> tuple[Message, ...]:
    messages = []
    for i, item in enumerate(items):
        place = f"{row.where}: {key}[{i}]"
        if not isinstance(item, dict):
            raise UserError(f"{place} must be an object with '{role_key}' and '{content_key}'")
        role, content = item.get(role_key), item.get(content_key)
        if not isinstance(role, str) or role not in roles:
            raise UserError(f"{place}.{role_key}: '{role}' is not one of {', '.join(roles)}")
        if not isinstance(content, str):
            raise UserError(f"{place}.{content_key} must be a string, found {type(content).__name__}")
        messages.append(Message(roles[role], content, train=roles[role] in trained_roles))
    if not any(m.train for m in messages):
        raise UserError(f"{row.where}: field '{key}' has no assistant turn to learn from")
    return tuple(messages)


def _from_messages(row: Row) -> SFTExample:
    items = _field(row, "messages", list)
    roles = {r: r for r in ROLES}
    return SFTExample(row.where, _messages(row, "messages", items, "role", "content", roles, {"assistant"}),
                      answer=_answer(row))


def _from_sharegpt(row: Row) -> SFTExample:
    items = _field(row, "conversations", list)
    messages = _messages(row, "conversations", items, "from", "value", SHAREGPT_ROLES, {"assistant"})
    system = _field(row, "system", str, required=False)
    if system:
        messages = (Message("system", system),) + messages
    return SFTExample(row.where, messages, answer=_answer(row))


def _from_alpaca(row: Row) -> SFTExample:
    instruction = _field(row, "instruction", str)
    output = _field(row, "output", str)
    extra = _field(row, "input", str, required=False)
    system = _field(row, "system", str, required=False)
    history = _field(row, "history", list, required=False) or []
    messages = [Message("system", system)] if system else []
    for i, turn in enumerate(history):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise UserError(f"{row.where}: history[{i}] must be a [question, answer] pair of strings")
        messages += [Message("user", turn[0]), Message("assistant", turn[1], train=True)]
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages += [Message("user", user), Message("assistant", output, train=True)]
    return SFTExample(row.where, tuple(messages), answer=_answer(row))


def _from_prompt_completion(row: Row) -> SFTExample:
    prompt = _field(row, "prompt", (str, list))
    completion = _field(row, "completion", (str, list))
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise UserError(f"{row.where}: field 'completion' is empty")
        return SFTExample(row.where, prompt=prompt, completion=completion, answer=_answer(row))
    if isinstance(prompt, str) or isinstance(completion, str):
        raise UserError(f"{row.where}: 'prompt' and 'completion' must both be strings or both be message lists")
    roles = {r: r for r in ROLES}
    head = _messages_untrained(row, prompt, roles)
    tail = _messages(row, "completion", completion, "role", "content", roles, {"assistant"})
    return SFTExample(row.where, head + tail, answer=_answer(row))


def _messages_untrained(row: Row, items: list, roles: dict[str, str]) -> tuple[Message, ...]:
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or item.get("role") not in roles or not isinstance(item.get("content"), str):
            raise UserError(f"{row.where}: prompt[{i}] must be an object with a role ({', '.join(roles)}) and string content")
        out.append(Message(item["role"], item["content"]))
    return tuple(out)


@dataclass(frozen=True)
class PromptExample:
    """A prompt for the RL stages, with its reference answer when the row has one."""

    where: str
    prompt: Text
    answer: Optional[str]
    row: dict


def to_prompt_examples(rows: list[Row]) -> list[PromptExample]:
    """Prompt-only rows: `prompt` (a string or messages) with an optional `answer`, or GSM8K's
    `question` and `answer`. SFT rows (prompt/completion) work too: the completion is ignored."""
    examples = []
    for row in rows:
        if "question" in row.data and "prompt" not in row.data:
            prompt: Text = _field(row, "question", str)
        elif "prompt" in row.data:
            value = _field(row, "prompt", (str, list))
            prompt = value if isinstance(value, str) else _messages_untrained(row, value, {r: r for r in ROLES})
        else:
            shown = ", ".join(sorted(row.data)) or "none"
            raise UserError(f"{row.where}: expected a `prompt` (or GSM8K `question`) field, found keys: {shown}")
        examples.append(PromptExample(row.where, prompt, _answer(row), row.data))
    return examples

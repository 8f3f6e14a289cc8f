"""`conf=PATH.yaml`: a user's YAML turned into Hydra overrides that remember their file and line.

Flattening the file into `key=value` overrides (placed before the command-line ones, so those win)
keeps every Hydra feature working unchanged: multirun sweeps, launchers that re-compose the config
in another process, `--cfg job`. It also lets an error point at `my.yaml:4` rather than at a key.
A `defaults:` list in the file selects config-group options (`- deepspeed: zero2`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from rlhf_cli.errors import UserError


@dataclass(frozen=True)
class FileOverride:
    text: str  # the Hydra override, e.g. "train.lr=1e-5"
    key: str
    origin: str  # "my.yaml:4"


def yaml_overrides(path: str) -> list[FileOverride]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"conf={path}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
        root = yaml.compose(text)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else "?"
        raise UserError(f"{path}:{line}: invalid YAML: {exc.problem}") from None
    if root is None:
        return []
    if not isinstance(root, yaml.MappingNode):
        raise UserError(f"{path}:{root.start_mark.line + 1}: the top level must be a mapping of config keys")
    overrides: list[FileOverride] = []
    for key_node, value_node in root.value:
        origin = f"{path}:{key_node.start_mark.line + 1}"
        if key_node.value == "defaults":
            overrides += _group_choices(value_node, path)
        elif key_node.value == "hydra":
            raise UserError(f"{origin}: set hydra options on the command line (hydra.*), not in conf=")
        else:
            overrides += _flatten(key_node.value, value_node, path)
    return overrides


def _group_choices(node: yaml.Node, path: str) -> list[FileOverride]:
    if not isinstance(node, yaml.SequenceNode):
        raise UserError(f"{path}:{node.start_mark.line + 1}: `defaults` must be a list like `- deepspeed: zero2`")
    choices = []
    for item in node.value:
        origin = f"{path}:{item.start_mark.line + 1}"
        if isinstance(item, yaml.ScalarNode) and item.value == "_self_":
            continue
        if not (isinstance(item, yaml.MappingNode) and len(item.value) == 1):
            raise UserError(f"{origin}: a defaults entry must be `- group: option`")
        group, option = item.value[0]
        choices.append(FileOverride(f"{group.value}={_value(option)}", group.value, origin))
    return choices


def _flatten(key: str, node: yaml.Node, path: str) -> list[FileOverride]:
    if isinstance(node, yaml.MappingNode) and node.value:
        out = []
        for child_key, child in node.value:
            out += _flatten(f"{key}.{child_key.value}", child, path)
        return out
    return [FileOverride(f"{key}={_value(node)}", key, f"{path}:{node.start_mark.line + 1}")]


def _value(node: yaml.Node) -> str:
    """The node in Hydra's override grammar."""
    if isinstance(node, yaml.SequenceNode):
        return "[" + ",".join(_value(item) for item in node.value) + "]"
    if isinstance(node, yaml.MappingNode):
        return "{" + ",".join(f"{k.value}:{_value(v)}" for k, v in node.value) + "}"
    if node.style in ("'", '"'):
        return _quote(node.value)
    if node.tag.endswith(":null"):
        return "null"
    if node.tag.endswith(":bool"):
        return "true" if node.value.lower() in ("true", "yes", "on", "y") else "false"
    if node.tag.endswith((":int", ":float")) or _is_plain(node.value):
        return node.value
    return _quote(node.value)


def _is_plain(text: str) -> bool:
    """True when Hydra parses `text` unquoted as the same scalar YAML gave us."""
    return all(ch.isalnum() or ch in "._-+/:@${}" for ch in text) and not text.startswith("-")


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"

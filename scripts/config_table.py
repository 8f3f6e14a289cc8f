"""Print the README's config-key table of a command (a stage, or eval), from the typed schema and its YAML.

Run: python scripts/config_table.py sft       (print one table)
     python scripts/config_table.py --write   (rewrite every table in README.md)
tests/test_readme.py checks that the README is current.
"""

import re
import sys
from pathlib import Path

from rlhf_cli.config.compose import stage_defaults
from rlhf_cli.config.schema import CONFIG_SCHEMAS, key_help

README = Path(__file__).resolve().parent.parent / "README.md"


def table(stage: str) -> str:
    defaults = stage_defaults(stage)
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, text in key_help(CONFIG_SCHEMAS[stage]):
        if key != "stage":
            lines.append(f"| `{key}` | `{defaults.get(key, default)}` | {text.replace('|', '/')} |")
    return "\n".join(lines)


def table_block(stage: str) -> re.Pattern:
    return re.compile(rf"(<!-- config-table:{re.escape(stage)} -->\n)(.*?)(\n<!-- /config-table:{re.escape(stage)} -->)", re.S)


def write_readme() -> None:
    text = README.read_text()
    for stage in CONFIG_SCHEMAS:
        text = table_block(stage).sub(lambda m: m.group(1) + table(stage) + m.group(3), text)
    README.write_text(text)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_readme()
    else:
        print(table(sys.argv[1] if len(sys.argv) > 1 else "sft"))

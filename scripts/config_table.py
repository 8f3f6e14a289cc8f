"""Print the README's config-key table for a stage, from the typed schema and the stage's YAML.

Run: python scripts/config_table.py sft    (tests/test_readme.py checks the README is current)
"""

import sys

from rlhf_cli.config.compose import stage_defaults
from rlhf_cli.config.schema import STAGE_SCHEMAS, key_help


def table(stage: str) -> str:
    defaults = stage_defaults(stage)
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, text in key_help(STAGE_SCHEMAS[stage]):
        if key != "stage":
            lines.append(f"| `{key}` | `{defaults.get(key, default)}` | {text.replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1] if len(sys.argv) > 1 else "sft"))

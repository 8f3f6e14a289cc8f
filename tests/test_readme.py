"""The README's key tables are generated from the schema; they must be current."""

import sys
from pathlib import Path

import pytest

from rlhf_cli.config.schema import CONFIG_SCHEMAS

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.mark.parametrize("stage", sorted(CONFIG_SCHEMAS))
def test_readme_config_table_is_current(stage):
    from config_table import table, table_block

    found = table_block(stage).search((ROOT / "README.md").read_text())
    assert found, f"README has no config table for {stage}"
    assert found.group(2).strip() == table(stage), "regenerate with: python scripts/config_table.py --write"

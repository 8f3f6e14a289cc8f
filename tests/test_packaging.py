"""Every package directory is listed in pyproject.toml (conf/ is mapped, so setuptools cannot find them)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_for_setuptools():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "rlhf_cli").rglob("__init__.py")}
    assert found | {"rlhf_cli.conf"} == listed


def test_tiny_model_files_are_package_data():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "tiny/*" in data["rlhf_cli.models"]
    assert (ROOT / "rlhf_cli/models/tiny/tokenizer.json").is_file()


def test_every_config_yaml_is_package_data():
    """conf/hydra/launcher/slurm.yaml and the stage YAMLs ship in the wheel (setuptools globs recursively)."""
    import glob

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["rlhf_cli.conf"]
    shipped = {path for pattern in globs for path in glob.glob(pattern, root_dir=ROOT / "conf", recursive=True)}
    present = {str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    assert "hydra/launcher/slurm.yaml" in present
    assert present == shipped

"""The config layer: shipped YAML composes against the schema; conf= files become overrides."""

from pathlib import Path

import pytest

from rlhf_cli.config.compose import fixed_keys, load_config, register_schemas, sweep_jobs
from rlhf_cli.config.schema import CONFIG_SCHEMAS, DataFormat, key_help
from rlhf_cli.config.user_yaml import yaml_overrides
from rlhf_cli.errors import UserError
from rlhf_cli.runs.chain import STAGE_DIRS

CONF = Path(__file__).resolve().parent.parent / "conf"


@pytest.fixture(autouse=True)
def _schemas():
    register_schemas()


@pytest.mark.parametrize("stage", sorted(CONFIG_SCHEMAS))
def test_every_shipped_stage_yaml_composes_into_its_schema(stage):
    assert (CONF / f"{stage}.yaml").is_file()
    cfg = load_config(stage, [])
    assert isinstance(cfg, CONFIG_SCHEMAS[stage]) and cfg.stage == stage
    assert cfg.output_dir == f"runs/default/{STAGE_DIRS.get(stage, stage)}"  # eval's directory sits beside the stages'


def test_every_key_has_help():
    for stage, schema in CONFIG_SCHEMAS.items():
        for key, _, text in key_help(schema):
            assert text, f"{stage}: {key} has no help"


def test_overrides_are_typed():
    cfg = load_config("sft", ["train.lr=3e-4", "data.format=sharegpt", "train.max_steps=null"])
    assert cfg.train.lr == 3e-4 and cfg.data.format is DataFormat.sharegpt and cfg.train.max_steps is None


def test_yaml_overrides_keep_file_and_line(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "defaults:\n  - hydra/launcher: basic\n"
        "train:\n  lr: 1e-5\n  adam_betas: [0.9, 0.95]\n"
        "data:\n  train: 'my data.jsonl'\n  eval: null\n  packing: yes\n"
        "logger: [jsonl, wandb]\n"
    )
    found = {o.key: (o.text, o.origin) for o in yaml_overrides(str(path))}
    assert found["hydra/launcher"] == ("hydra/launcher=basic", f"{path}:2")
    assert found["train.lr"] == ("train.lr=1e-5", f"{path}:4")
    assert found["train.adam_betas"][0] == "train.adam_betas=[0.9,0.95]"
    assert found["data.train"][0] == "data.train='my data.jsonl'"
    assert found["data.eval"][0] == "data.eval=null"
    assert found["data.packing"][0] == "data.packing=true"
    assert found["logger"][0] == "logger=[jsonl,wandb]"


def test_yaml_values_round_trip_through_hydra(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "it's here.jsonl").write_text("{}\n")
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  train: \"it's here.jsonl\"\ntrain:\n  lr: 2.5e-4\n  adam_betas: [0.8, 0.9]\n")
    cfg = load_config("sft", [o.text for o in yaml_overrides(str(path))])
    assert cfg.data.train == "it's here.jsonl" and cfg.train.lr == 2.5e-4 and cfg.train.adam_betas == [0.8, 0.9]


def test_hydra_block_in_conf_is_refused(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("hydra:\n  run:\n    dir: x\n")
    with pytest.raises(UserError, match="exp.yaml:1"):
        yaml_overrides(str(path))


def test_sweeps_expand_into_jobs_and_fixed_keys_are_known():
    jobs = sweep_jobs(["train.lr=1e-4,3e-4", "train.seed=1", "data.packing=true,false"])
    assert len(jobs) == 4 and all("train.seed=1" in job for job in jobs)
    assert fixed_keys(["train.lr=1e-4,3e-4", "train.seed=1", "+x=1"]) == ["train.seed", "x"]


def test_every_job_of_a_sweep_is_checked_before_any_runs():
    from rlhf_cli.config.compose import check_overrides

    with pytest.raises(UserError, match="train.batch_size"):
        check_overrides("sft", ["train.batch_size=4,0"], [])

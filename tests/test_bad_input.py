"""Bad input never gives a traceback: one `error:` line naming the fault, a non-zero exit, and
nothing written that looks complete."""

import json

import pytest

from tests.conftest import QUICK, write_jsonl

GOOD = {"prompt": "Q: 1+1=", "completion": "2"}


def _file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


# (case id, files to create {name: content}, arguments, text the error line must contain)
CASES = [
    ("malformed-json-line", {"d.jsonl": json.dumps(GOOD) + "\n{\"prompt\": \n"}, ["data.train=d.jsonl"], "d.jsonl:2: malformed JSON"),
    ("missing-field", {"d.jsonl": json.dumps(GOOD) + "\n" + json.dumps({"prompt": "x"}) + "\n"}, ["data.train=d.jsonl"], "d.jsonl:2: missing field 'completion'"),
    ("wrong-type-field", {"d.jsonl": json.dumps({"messages": "hello"}) + "\n"}, ["data.train=d.jsonl"], "d.jsonl:1: field 'messages' must be a list"),
    ("unknown-role", {"d.jsonl": json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n"}, ["data.train=d.jsonl"], "messages[0].role: 'robot'"),
    ("no-assistant-turn", {"d.jsonl": json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n"}, ["data.train=d.jsonl"], "no assistant turn"),
    ("empty-file", {"d.jsonl": ""}, ["data.train=d.jsonl"], "d.jsonl: no rows"),
    ("not-utf8", {"d.jsonl": json.dumps(GOOD).encode() + b"\n\xff\xfe\n"}, ["data.train=d.jsonl"], "d.jsonl:2: not UTF-8"),
    ("unrecognised-keys", {"d.jsonl": json.dumps({"text": "x"}) + "\n"}, ["data.train=d.jsonl"], "cannot tell the format"),
    ("preference-data", {"d.jsonl": json.dumps({"prompt": "x", "chosen": "a", "rejected": "b"}) + "\n"}, ["data.train=d.jsonl"], "preference data"),
    ("missing-data-file", {}, ["data.train=nothere.jsonl"], "data.train: 'nothere.jsonl' does not exist"),
    ("unknown-builtin", {}, ["data.train=builtin:nope"], "'builtin:nope' is not a built-in set"),
    ("unknown-key", {}, ["train.lrr=1"], "unknown key 'train.lrr'; did you mean 'train.lr'?"),
    ("unknown-group-key", {}, ["optim.lr=1"], "unknown key 'optim'"),
    ("bad-enum-value", {}, ["data.format=xml"], "data.format: 'xml' is not one of auto, messages"),
    ("wrong-type-value", {}, ["train.batch_size=many"], "train.batch_size"),
    ("out-of-range-value", {}, ["train.lr=0"], "train.lr: 0.0 must be positive"),
    ("bad-warmup", {}, ["train.warmup_ratio=1.5"], "train.warmup_ratio: 1.5 must be in [0, 1)"),
    ("missing-model-dir", {}, ["model.path=./no/such/model"], "model.path: './no/such/model' is not an existing directory"),
    ("model-dir-without-config", {"m/readme.txt": "x"}, ["model.path=./m"], "no config.json here"),
    ("bad-resume", {}, ["resume=sometimes"], "resume: 'sometimes' is not auto, never"),
    ("hub-model-offline", {}, ["model.path=nobody/nothing"], "model.path=nobody/nothing: cannot load (HF_HUB_OFFLINE is set)"),
    ("hub-dataset-offline", {}, ["data.train=nobody/nothing"], "nobody/nothing: cannot load dataset"),
    ("sft-without-model", {}, ["model.path=null"], "model.path: sft needs a model"),
    ("conf-missing", {}, ["conf=none.yaml"], "conf=none.yaml: no such file"),
    ("conf-bad-yaml", {"c.yaml": "train:\n  lr: [1\n"}, ["conf=c.yaml"], "c.yaml:3: invalid YAML"),
    ("conf-unknown-key", {"c.yaml": "train:\n  lr: 1.0e-4\n  lrr: 3\n"}, ["conf=c.yaml"], "c.yaml:3: unknown key 'train.lrr'"),
    ("conf-not-mapping", {"c.yaml": "- a\n- b\n"}, ["conf=c.yaml"], "c.yaml:1: the top level must be a mapping"),
    ("bad-override-syntax", {}, ["train.lr=[1,"], "bad override"),
    ("unknown-launcher", {}, ["hydra/launcher=slurmm"], "hydra/launcher=slurmm: no such option (choose from basic, slurm,"),
    ("unknown-launcher-key", {}, ["hydra/launcher=slurm", "hydra.launcher.partiton=gpu"],
     "unknown key 'hydra.launcher.partiton'; did you mean 'hydra.launcher.partition'?"),
    ("bad-launcher-value", {}, ["hydra/launcher=slurm", "hydra.launcher.timeout_min=soon"], "hydra.launcher.timeout_min: Value 'soon'"),
    ("multirun-with-cfg", {}, ["-m", "--cfg", "job"], "--cfg and -m: use one of -m/--multirun, --cfg, --info at a time"),
    ("all-truncated", {"d.jsonl": json.dumps({"prompt": "Q: " * 40, "completion": "2"}) + "\n"}, ["data.train=d.jsonl", "data.max_length=8"], "no sample left after truncation"),
    ("truncation-error-policy", {"d.jsonl": json.dumps({"prompt": "Q: " * 40, "completion": "2"}) + "\n"}, ["data.train=d.jsonl", "data.max_length=8", "data.truncation=error"], "d.jsonl:1: 122 tokens, over data.max_length=8"),
]


@pytest.mark.parametrize("files,args,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(rlhf, tmp_path, files, args, expected):
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        _file(tmp_path, name, content)
    result = rlhf("sft", "data.eval=null", *QUICK, *args)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.output
    assert expected in error_lines[0], error_lines[0]
    assert not (tmp_path / "runs/default/sft/final").exists()
    manifest = tmp_path / "runs/default/sft/manifest.json"
    assert not manifest.exists() or json.loads(manifest.read_text())["status"] != "completed"


def test_slurm_launcher_without_its_plugin_says_what_to_install(rlhf, monkeypatch):
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # discovery registers the plugins' configs; then hide submitit's as if not installed
    monkeypatch.delitem(ConfigStore.instance().repo["hydra"]["launcher"], "submitit_slurm.yaml")
    result = rlhf("sft", "-m", "hydra/launcher=slurm", "train.lr=1e-3,2e-3")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: hydra/launcher=submitit_slurm: no such option" in result.output
    assert "pip install 'rlhf-cli[slurm]'" in result.output


def test_bad_input_leaves_a_completed_run_untouched(rlhf, tmp_path):
    write_jsonl(tmp_path / "good.jsonl", [GOOD] * 8)
    assert rlhf("sft", "data.train=good.jsonl", "data.eval=null", *QUICK).exit_code == 0
    run = tmp_path / "runs/default/sft"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    result = rlhf("sft", "data.train=bad.jsonl", "data.eval=null", *QUICK, "resume=auto")
    assert result.exit_code != 0
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert before == after


def test_debug_shows_the_traceback(rlhf, tmp_path):
    result = rlhf("sft", "--debug", "data.train=nothere.jsonl")
    assert result.exit_code != 0
    assert result.exception is not None and "nothere.jsonl" in str(result.exception)

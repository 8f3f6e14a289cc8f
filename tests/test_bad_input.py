"""Bad input never gives a traceback: one `error:` line naming the fault, a non-zero exit, nothing
written that looks complete, and the runs a stage chains from unchanged. Tables: sft's data and config
(CASES), every stage's data, models, checkpoints and run directories (CHAIN_CASES), and command-line
misuse (CLI_CASES); the README's "Errors" section counts them by kind."""

import hashlib
import json
import os
import re
import shutil

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
    ("added-unknown-key", {}, ["+train.lrr=1"], "unknown key 'train.lrr'; did you mean 'train.lr'?"),
    ("output-dir-is-a-file", {"taken": "x"}, ["output_dir=taken"], "output_dir=taken: exists and is not a directory"),
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
    _write_files(tmp_path, files)
    result = rlhf("sft", "data.eval=null", *QUICK, *args)
    _assert_one_error_line(result, expected)
    _assert_nothing_looks_complete(tmp_path / "runs/default/sft")


def _write_files(root, files):
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        _file(root, name, content)


def _assert_one_error_line(result, expected):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.output
    assert expected in error_lines[0], error_lines[0]


def _assert_nothing_looks_complete(run):
    assert not (run / "final").exists()
    manifest = run / "manifest.json"
    assert not manifest.exists() or json.loads(manifest.read_text())["status"] != "completed"


def _tree_digest(root):
    """One hash of every file's path and bytes under `root`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


PAIR = {"prompt": "Q: 1+1=", "chosen": "2", "rejected": "3"}
LONG_PAIR = {"prompt": "Q: " * 30, "chosen": "2", "rejected": "3"}
LONG_PROMPT = {"prompt": "Q: " * 30, "answer": "2"}
STEPS = ["train.max_steps=3", "train.batch_size=4", "train.log_every=1"]
# The quick settings of each stage; the later stages chain from the `chain` fixture's sft and rm.
STAGE_ARGS = {
    "sft": [*STEPS, "data.eval=null", "eval.generate=0"],
    "train-rm": [*STEPS, "data.eval=null", "data.eval_size=0"],
    "dpo": [*STEPS, "data.eval=null", "eval.generate=0"],
    "grpo": [*STEPS, "eval.generate=0", "grpo.num_generations=2", "rollout.max_new_tokens=4"],
    "ppo": [*STEPS, "eval.generate=0", "rollout.max_new_tokens=4", "ppo.num_mini_batches=1"],
}


def _jsonl(*rows):
    return "".join(json.dumps(row) + "\n" for row in rows)


# Model directories that are a copy of the chain's sft/final with one thing broken.
def _config_not_json(model):
    (model / "config.json").write_text("{oops")


def _config_a_list(model):
    (model / "config.json").write_text("[]")


def _no_weights(model):
    (model / "model.safetensors").unlink()


def _truncated_weights(model):
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])


def _config_of_another_shape(model):
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"hidden_size": config["hidden_size"] // 2}))


def _tokenizer_of_a_bigger_model(model):
    """Weights with 100 embedding rows beside the built-in tokenizer's 260 tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    config.vocab_size = 100
    AutoModelForCausalLM.from_config(config).save_pretrained(model)


def _tokenizer_not_json(model):
    (model / "tokenizer.json").write_text("{oops")


BROKEN_MODELS = {f.__name__.lstrip("_"): f for f in (_config_not_json, _config_a_list, _no_weights, _truncated_weights,
                                                     _config_of_another_shape, _tokenizer_of_a_bigger_model, _tokenizer_not_json)}


def _run_dir(root, stage, status, final):
    """A run directory of `stage` with a manifest of `status`, and final/ copied from `final` (or none)."""
    root.mkdir(parents=True)
    manifest = {"stage": stage, "status": status, "run_id": "0" * 32}
    (root / "manifest.json").write_text(json.dumps(manifest))
    if final is not None:
        shutil.copytree(final, root / "final")


# (case id, stage, files {name: content}, arguments ({chain} is the chain's runs/default, {broken:NAME} a copy of
# its sft/final broken by BROKEN_MODELS[NAME], {run:STAGE:STATUS:FINAL} a run directory made by _run_dir), text
# the error line must contain)
CHAIN_CASES = [
    # preference data: train-rm and dpo
    ("rm-missing-rejected", "train-rm", {"p.jsonl": _jsonl(PAIR, {"prompt": "x", "chosen": "a"})}, ["data.train=p.jsonl"], "p.jsonl:2: missing field 'rejected'"),
    ("rm-chosen-equals-rejected", "train-rm", {"p.jsonl": _jsonl(PAIR, {"prompt": "x", "chosen": "a", "rejected": "a"})}, ["data.train=p.jsonl"],
     "p.jsonl:2: chosen and rejected are the same response"),
    ("rm-empty-chosen", "train-rm", {"p.jsonl": _jsonl(PAIR, {"prompt": "x", "chosen": "", "rejected": "a"})}, ["data.train=p.jsonl"], "p.jsonl:2: field 'chosen' is empty"),
    ("rm-chosen-a-number", "train-rm", {"p.jsonl": _jsonl(PAIR, {"prompt": "x", "chosen": 3, "rejected": "a"})}, ["data.train=p.jsonl"],
     "p.jsonl:2: 'chosen' and 'rejected' must both be strings or both be message lists"),
    ("rm-sft-rows", "train-rm", {"p.jsonl": _jsonl({"prompt": "x", "completion": "y"})}, ["data.train=p.jsonl"], "p.jsonl:1: this row has no chosen/rejected"),
    ("rm-ranked-scores-short", "train-rm", {"p.jsonl": _jsonl({"prompt": "x", "responses": ["a", "b"], "scores": [1]})}, ["data.train=p.jsonl"],
     "p.jsonl:1: field 'scores' must be a list of 2 numbers"),
    ("rm-ranked-one-response", "train-rm", {"p.jsonl": _jsonl({"prompt": "x", "responses": ["a"]})}, ["data.train=p.jsonl"], "p.jsonl:1: a ranked row needs at least 2 responses"),
    ("rm-pair-over-max-length", "train-rm", {"p.jsonl": _jsonl(LONG_PAIR)}, ["data.train=p.jsonl", "data.max_length=16", "data.truncation=error"],
     "p.jsonl:1: 92 tokens, over data.max_length=16"),
    ("rm-no-prompt-fits", "train-rm", {"p.jsonl": _jsonl(LONG_PAIR)}, ["data.train=p.jsonl", "data.max_length=16"], "data.train: no prompt left after data.max_length=16"),
    ("dpo-missing-chosen", "dpo", {"p.jsonl": _jsonl({"prompt": "x", "rejected": "a"})}, ["data.train=p.jsonl"], "p.jsonl:1: missing field 'chosen'"),
    ("dpo-pair-over-max-length", "dpo", {"p.jsonl": _jsonl(LONG_PAIR)}, ["data.train=p.jsonl", "data.max_length=16", "data.truncation=error"],
     "p.jsonl:1: 92 tokens, over data.max_length=16"),
    ("dpo-no-pair-fits", "dpo", {"p.jsonl": _jsonl(LONG_PAIR)}, ["data.train=p.jsonl", "data.max_length=16"], "data.train: no pair fits data.max_length=16"),
    # prompts and rewards: grpo and ppo
    ("grpo-no-prompt-field", "grpo", {"g.jsonl": _jsonl({"text": "x"})}, ["data.train=g.jsonl"], "g.jsonl:1: expected a `prompt` (or GSM8K `question`) field"),
    ("grpo-row-without-answer", "grpo", {"g.jsonl": _jsonl({"prompt": "1+1="})}, ["data.train=g.jsonl"], "g.jsonl:1: reward 'exact_match' needs an `answer` field"),
    ("grpo-prompt-over-max-length", "grpo", {"g.jsonl": _jsonl(LONG_PROMPT)}, ["data.train=g.jsonl", "data.max_length=16", "data.truncation=error"],
     "g.jsonl:1: prompt of 90 tokens leaves no room for rollout.max_new_tokens"),
    ("grpo-unknown-reward", "grpo", {}, ["grpo.rewards=[{name:nope}]"], "grpo.rewards: unknown reward 'nope'"),
    ("grpo-format-without-pattern", "grpo", {}, ["grpo.rewards=[{name:format}]"], "the format reward needs a `pattern`"),
    ("grpo-pattern-not-a-regex", "grpo", {}, ["grpo.rewards=[{name:format,pattern:'(('}]"], "format pattern '((' is not a regular expression"),
    ("grpo-reward-module-missing", "grpo", {}, ["grpo.rewards=[{name:'nosuch.module:score'}]"], "cannot import reward function 'nosuch.module:score'"),
    ("grpo-http-without-url", "grpo", {}, ["grpo.rewards=[{name:http}]"], "the http reward needs a `url`"),
    ("grpo-reward-key-misspelt", "grpo", {}, ["grpo.rewards=[{name:format,patern:x}]"], "unknown key 'patern'"),
    ("grpo-reward-model-is-a-policy", "grpo", {}, ["grpo.rewards=[{name:model,path:'{chain}/sft/final'}]"], "grpo.rewards[0].path: {chain}/sft/final is a causal lm, not a reward model"),
    ("ppo-prompt-over-max-length", "ppo", {"g.jsonl": _jsonl(LONG_PROMPT)}, ["data.train=g.jsonl", "data.max_length=16", "data.truncation=error"],
     "g.jsonl:1: prompt of 90 tokens leaves no room"),
    ("ppo-empty-prompts", "ppo", {"g.jsonl": ""}, ["data.train=g.jsonl"], "g.jsonl: no rows"),
    ("ppo-reward-is-a-policy", "ppo", {}, ["reward.path={chain}/sft/final"], "reward.path: {chain}/sft/final is a causal lm, not a reward model"),
    # a checkpoint or run directory of another stage, or a broken one
    ("ppo-policy-is-a-reward-model", "ppo", {}, ["model.path={chain}/rm/final"], "model.path: {chain}/rm/final is a reward model, not a causal lm"),
    ("dpo-policy-is-a-reward-model", "dpo", {}, ["model.path={chain}/rm/final"], "model.path: {chain}/rm/final is a reward model, not a causal lm"),
    ("dpo-reference-is-a-reward-model", "dpo", {}, ["ref.path={chain}/rm/final"], "ref.path: {chain}/rm/final is a reward model, not a causal lm"),
    ("rm-from-run-holds-rm-as-sft", "train-rm", {}, ["model.path=null", "from_run={run:train-rm:completed:rm}"], "holds a train-rm run, not sft"),
    ("dpo-from-run-manifest-corrupt", "dpo", {"r/sft/manifest.json": "{oops"}, ["from_run=r"], "r/sft/manifest.json: corrupt manifest (not JSON)"),
    ("dpo-from-run-final-missing", "dpo", {}, ["from_run={run:sft:completed:-}"], "final: missing, though the manifest beside it says completed"),
    ("grpo-from-run-sft-failed", "grpo", {}, ["from_run={run:sft:failed:-}"], "holds a failed run: run `rlhf sft` first"),
    ("resume-from-a-final", "sft", {}, ["resume={chain}/rm/final", "model.path={chain}/sft/final"], "rm/final: not a complete checkpoint"),
    ("resume-from-a-reward-model-checkpoint", "sft", {}, ["resume={chain}/rm/checkpoints/step-2"], "rm/checkpoints/step-2: checkpoint weights do not fit"),
    ("model-config-not-json", "sft", {}, ["model.path={broken:config_not_json}"], "config.json: not valid JSON"),
    ("model-config-a-list", "dpo", {}, ["model.path={broken:config_a_list}"], "config.json: not a JSON object, found list"),
    ("model-without-weights", "sft", {}, ["model.path={broken:no_weights}"], "no file named model.safetensors"),
    ("model-weights-truncated", "sft", {}, ["model.path={broken:truncated_weights}"], "the weights are not a readable safetensors file"),
    ("model-config-of-another-shape", "sft", {}, ["model.path={broken:config_of_another_shape}"], "the weights do not have the shapes its config.json describes"),
    ("model-and-tokenizer-mismatch", "grpo", {}, ["model.path={broken:tokenizer_of_a_bigger_model}"],
     "the tokenizer has 260 tokens but the model embeds only 100"),
    ("tokenizer-not-json", "sft", {}, ["model.path={broken:tokenizer_not_json}"], "the tokenizer files: Expecting property name"),
    # contradictory options
    ("two-processes-without-deepspeed", "sft", {}, ["launcher.nproc=2"], "launcher.nproc: 2 more than one process needs DeepSpeed"),
    ("lora-adapter-of-tiny", "sft", {}, ["model.lora.r=4", "model.lora.merge=false"], "model.lora.merge: False saves only the adapter"),
    ("offload-params-without-zero3", "sft", {}, ["deepspeed=zero2", "deepspeed.offload_params=true"], "deepspeed.offload_params: True needs deepspeed.stage 3"),
    ("offload-frozen-with-zero3", "ppo", {}, ["deepspeed=zero3", "ppo.offload_frozen=true"], "ppo.offload_frozen: True does not combine with ZeRO-3"),
    ("max-length-below-new-tokens", "grpo", {}, ["data.max_length=4"], "data.max_length: 4 must exceed rollout.max_new_tokens=4"),
    ("eval-from-run-without-sft", "eval", {}, ["from_run=nowhere", "output_dir=out"], "model.path is null and nowhere/sft holds no run"),
]


def _placeholders(text, chain, root):
    """`text` with {chain}, {broken:NAME} and {run:STAGE:STATUS:FINAL} made real under `root`."""
    text = text.replace("{chain}", str(chain))
    for name in re.findall(r"\{broken:(\w+)\}", text):
        model = root / f"broken-{name}"
        shutil.copytree(chain / "sft/final", model)
        BROKEN_MODELS[name](model)
        text = text.replace(f"{{broken:{name}}}", str(model))
    for spec in re.findall(r"\{run:([\w-]+:\w+:[\w-]+)\}", text):
        stage, status, final = spec.split(":")
        from_run = root / f"from-{stage}-{status}"
        _run_dir(from_run / "sft", stage, status, None if final == "-" else chain / final / "final")
        text = text.replace(f"{{run:{spec}}}", str(from_run))
    return text


@pytest.mark.parametrize("stage,files,args,expected", [c[1:] for c in CHAIN_CASES], ids=[c[0] for c in CHAIN_CASES])
def test_bad_input_of_every_stage_is_one_error_line_and_changes_no_run(rlhf, tmp_path, chain, stage, files, args, expected):
    _write_files(tmp_path, files)
    before = {run: _tree_digest(chain / run) for run in ("sft", "rm")}
    chained = [] if stage == "sft" or any(arg.startswith("from_run=") for arg in args) else [f"from_run={chain}"]
    quick = [] if stage == "eval" else [*STAGE_ARGS[stage], *chained, "output_dir=out"]
    result = rlhf(stage, *quick, *[_placeholders(arg, chain, tmp_path) for arg in args])
    _assert_one_error_line(result, expected.replace("{chain}", str(chain)))
    _assert_nothing_looks_complete(tmp_path / "out")
    assert {run: _tree_digest(chain / run) for run in ("sft", "rm")} == before


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


def test_debug_shows_the_traceback_of_its_own_command_only(rlhf, tmp_path):
    from rlhf_cli.cli import DEBUG_ENV

    result = rlhf("sft", "--debug", "data.train=nothere.jsonl")
    assert result.exit_code != 0
    assert result.exception is not None and "nothere.jsonl" in str(result.exception)
    # The stages read --debug from the environment; the next command in this process must not.
    assert DEBUG_ENV not in os.environ and "HYDRA_FULL_ERROR" not in os.environ


# (case id, files {name: content}, arguments, text the error line must contain): misuse of the verbs, and
# what click's or Hydra's own parser catches
CLI_CASES = [
    ("unknown-command", {}, ["frobnicate"], "No such command 'frobnicate'."),
    ("misspelt-command", {}, ["srt"], "No such command 'srt'. Did you mean 'sft'?"),
    ("unknown-stage-flag", {}, ["sft", "--bogus"], "--bogus: not an option of rlhf sft (see rlhf sft --help)"),
    ("bad-cfg-value", {}, ["dpo", "--cfg", "nope"], "rlhf dpo: argument --cfg/-c: invalid choice: 'nope'"),
    ("unknown-report-option", {}, ["report", "--bogus", "runs"], "No such option: --bogus"),
    ("report-without-run-dir", {}, ["report"], "Missing argument 'RUN_DIR'."),
    ("report-negative-samples", {}, ["report", "--samples", "-1", "runs"], "Invalid value for '--samples'"),
    ("report-of-nothing", {}, ["report", "nowhere"], "nowhere: no such directory"),
    ("report-corrupt-manifest", {"r/sft/manifest.json": "{oops"}, ["report", "r", "--samples", "0"], "r/sft/manifest.json: corrupt manifest (not JSON)"),
    ("report-corrupt-metrics-line", {"r/sft/manifest.json": json.dumps({"stage": "sft", "status": "completed"}),
                                     "r/sft/metrics.jsonl": '{"step": 1, "loss": 1.0}\n{oops\n{"step": 2, "loss": 0.5}\n'},
     ["report", "r", "--samples", "0"], "r/sft/metrics.jsonl:2: not a JSON object"),
    ("unknown-pipeline-flag", {}, ["pipeline", "--bogus"], "pipeline: --bogus is not an option of the pipeline"),
    ("unknown-pipeline-preset", {}, ["pipeline", "pipeline=nope"], "pipeline: 'nope' is not a preset"),
    ("misspelt-pipeline-stage-key", {}, ["pipeline", "sft.train.lrr=1"], "pipeline stage sft: unknown key 'train.lrr'; did you mean"),
]


@pytest.mark.parametrize("files,args,expected", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_command_line_misuse_is_one_error_line(rlhf, tmp_path, files, args, expected):
    _write_files(tmp_path, files)
    _assert_one_error_line(rlhf(*args), expected)


HUGE_LINE = 20 * 2**20  # characters


@pytest.mark.faults
def test_a_malformed_20_mb_line_is_named_not_echoed(rlhf, tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(GOOD) + "\n" + '{"prompt": "' + "x" * HUGE_LINE + '", "completion": 2\n')
    result = rlhf("sft", "data.train=d.jsonl", "data.eval=null", *QUICK)
    _assert_one_error_line(result, "d.jsonl:2: malformed JSON")
    assert len(result.output) < 1000


@pytest.mark.faults
def test_a_20_mb_prompt_over_max_length_is_refused_by_row(rlhf, tmp_path):
    """Tokenising 20 MB takes about 40 s and 4 GB here: the row is refused, not the machine."""
    write_jsonl(tmp_path / "d.jsonl", [GOOD, {"prompt": "x" * HUGE_LINE, "completion": "2"}])
    result = rlhf("sft", "data.train=d.jsonl", "data.eval=null", "data.truncation=error", *QUICK)
    _assert_one_error_line(result, f"d.jsonl:2: {HUGE_LINE + 2} tokens, over data.max_length=")

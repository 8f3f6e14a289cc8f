# Development and CI entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU torch for development and CI; GPU users install their own torch first (see README).
# The tests pin OMP_NUM_THREADS=1 themselves (tests/conftest.py); the demo uses every core.
CONSTRAINTS ?= constraints-cpu.txt
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export DS_ACCELERATOR ?= cpu
# DeepSpeed's one compiled CPU op, kept with this environment (two venvs sharing one cache rebuild it).
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: install demo test test-faults test-distributed test-slow test-slurm bench clean

$(BIN)/rlhf: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

install: $(BIN)/rlhf

demo: install
	$(BIN)/rlhf pipeline

test: install
	$(BIN)/pytest -q -m "not slow and not slurm and not faults and not distributed"

# Every fault case: the default suite's, every stage's kill, seeded random kills of every stage and the
# pipeline, killed pipelines, a real full disk (a tmpfs: needs root, skipped otherwise), NaN steps under
# DeepSpeed; CI runs it after `make test`.
test-faults: install
	$(BIN)/pytest -q tests/test_faults.py tests/test_nonfinite.py tests/test_resume.py tests/test_preemption.py \
		tests/test_pipeline.py::test_a_pipeline_killed_in_any_stage_finishes_with_the_same_models

# Every stage at ZeRO-0, 2 and 3 with two processes, and ZeRO-3's final, resume and LoRA (the default
# suite runs grpo at ZeRO-0 and ppo at ZeRO-3); CI runs it after `make test`.
test-distributed: install
	$(BIN)/pytest -q tests/test_distributed.py

test-slow: install
	OMP_NUM_THREADS=2 $(BIN)/pytest -q -m slow

# Starts a one-node SLURM cluster on this machine (as root; installs slurm and munge with apt the
# first time, about 20 s), then runs the tests that submit jobs to it. scripts/slurm-local.sh stop ends it.
test-slurm: install
	bash scripts/slurm-local.sh start
	$(BIN)/pytest -q -m slurm

# bench/vs_trl.py needs TRL, a benchmark-only extra; the rest needs only the package.
bench: install
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[bench]"
	$(BIN)/python bench/vs_trl.py
	OMP_NUM_THREADS=2 $(BIN)/python bench/dpo_reference_memory.py
	$(BIN)/python bench/zero_throughput.py
	OMP_NUM_THREADS=2 $(BIN)/python bench/lora_memory.py

clean:
	rm -rf runs outputs multirun wandb .pytest_cache

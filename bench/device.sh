#!/usr/bin/env bash
# bench/vs_trl.py on a GPU machine that cannot reach a package index: installs the wheels of .whl/
# (made here by bench/device_wheels.sh) and this checkout into /tmp/site, shows what it runs on, runs
# the side by side under bf16 on the GPU, by default with the Qwen2.5-0.5B-shaped model and one run a
# side, then tests/test_gpu.py (every stage on the GPU; stopped after TEST_SECONDS, 240). Each stage's
# line is printed as it finishes; both outputs are kept in $OUT (vs_trl.txt, test_gpu.txt).
#
#   bash bench/device.sh [vs_trl.py arguments, e.g. --stages grpo --reps 3]
# Through this project's device tool: carry [".whl"], command "bash bench/device.sh".
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site .
export HF_HUB_OFFLINE=1 WANDB_MODE=offline DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, trl, deepspeed, rlhf_cli.cli
print('torch', torch.__version__, '- cuda', torch.cuda.is_available(), '- transformers', transformers.__version__,
      '- trl', trl.__version__, '- deepspeed', deepspeed.__version__)"
mkdir -p "${OUT:=/tmp/bench-out}"
python3 bench/vs_trl.py --device cuda --models llama500m --reps 1 "$@" 2>&1 | tee "$OUT/vs_trl.txt" || echo "vs_trl.py failed"
timeout "${TEST_SECONDS:-240}" python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.txt"

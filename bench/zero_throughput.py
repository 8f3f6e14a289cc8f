"""Optimizer steps per second of `rlhf sft` on the tiny model: one process (plain PyTorch, and
DeepSpeed ZeRO 0/2/3) against two processes (ZeRO 0/2/3), at the same global batch.

Every setting trains on the same samples (same global batch and seed). The clock runs between the
log line of step WARMUP and that of the last step, read as the run prints them, so process start,
imports, DeepSpeed's set-up and the final save are left out. Figures are ratios to the one-process
plain PyTorch run measured in the same invocation. Usage: python bench/zero_throughput.py [--batch 32]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

WARMUP, STEPS = 10, 60
SETTINGS = [  # (processes, deepspeed)
    (1, "none"), (1, "zero0"), (1, "zero2"), (1, "zero3"),
    (2, "zero0"), (2, "zero2"), (2, "zero3"),
]


def steps_per_second(nproc: int, deepspeed: str, batch: int, workdir: str) -> float:
    out = os.path.join(workdir, f"{nproc}-{deepspeed}")
    command = [sys.executable, "-m", "rlhf_cli", "sft", f"output_dir={out}", f"train.max_steps={STEPS}",
               f"train.batch_size={batch // nproc}", f"train.log_every={WARMUP}", "train.eval_every=0", "train.save_every=0",
               "eval.generate=0", "eval.max_samples=4", f"deepspeed={deepspeed}", f"launcher.nproc={nproc}"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=workdir)
    seen: dict[int, float] = {}
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("step ") and " loss " in line:
            seen[int(line.split()[1].split("/")[0])] = time.perf_counter()
    if process.wait() != 0 or WARMUP not in seen or STEPS not in seen:
        sys.exit(f"{' '.join(command)} failed:\n{''.join(lines[-20:])}")
    shutil.rmtree(out, ignore_errors=True)
    return (STEPS - WARMUP) / (seen[STEPS] - seen[WARMUP])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="global batch (sequences per optimizer step)")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread per process: 2 processes use the machine's 2 cores
    print(f"# rlhf sft, tiny model, global batch {args.batch}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, OMP_NUM_THREADS=1 per process")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for nproc, deepspeed in SETTINGS:
            rows.append((nproc, deepspeed, steps_per_second(nproc, deepspeed, args.batch, workdir)))
    base = rows[0][2]
    print("| processes | deepspeed | steps/s | vs 1 process, plain PyTorch |")
    print("| --- | --- | --- | --- |")
    for nproc, deepspeed, rate in rows:
        print(f"| {nproc} | {deepspeed} | {rate:.2f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()

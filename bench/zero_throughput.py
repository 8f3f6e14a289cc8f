"""Optimizer steps per second of `rlhf sft` on the tiny model: one process (plain PyTorch, and
DeepSpeed ZeRO 0/2/3) against two processes (ZeRO 0/2/3), at the same global batch.

Each setting runs twice, for SHORT and LONG steps; steps/s = (LONG - SHORT) / (wall LONG - wall SHORT),
so process start, imports and the final save cancel out. Figures are ratios to the one-process plain
PyTorch run measured in the same invocation. Usage: python bench/zero_throughput.py [--batch 32]
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

SHORT, LONG = 5, 25
SETTINGS = [  # (processes, deepspeed)
    (1, "none"), (1, "zero0"), (1, "zero2"), (1, "zero3"),
    (2, "zero0"), (2, "zero2"), (2, "zero3"),
]


def wall(steps: int, nproc: int, deepspeed: str, batch: int, workdir: str) -> float:
    out = os.path.join(workdir, f"{nproc}-{deepspeed}-{steps}")
    command = [sys.executable, "-m", "rlhf_cli", "sft", f"output_dir={out}", f"train.max_steps={steps}",
               f"train.batch_size={batch // nproc}", "train.log_every=1000", "train.eval_every=0", "train.save_every=0",
               "eval.generate=0", "eval.max_samples=4", f"deepspeed={deepspeed}", f"launcher.nproc={nproc}"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return elapsed


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
        wall(2, 1, "zero0", args.batch, workdir)  # DeepSpeed compiles its CPU op once, outside the figures
        for nproc, deepspeed in SETTINGS:
            short = wall(SHORT, nproc, deepspeed, args.batch, workdir)
            long = wall(LONG, nproc, deepspeed, args.batch, workdir)
            rows.append((nproc, deepspeed, (LONG - SHORT) / max(long - short, 1e-9)))
    base = rows[0][2]
    print("| processes | deepspeed | steps/s | vs 1 process, plain PyTorch |")
    print("| --- | --- | --- | --- |")
    for nproc, deepspeed, rate in rows:
        print(f"| {nproc} | {deepspeed} | {rate:.2f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()

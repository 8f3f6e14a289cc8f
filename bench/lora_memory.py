"""Peak memory of LoRA against full fine-tuning in `rlhf dpo` and `rlhf grpo`.

The built-in tiny model is too small to show a difference: its weights, gradients and AdamW state
are a few MB beside the ~600 MB that torch and transformers take. So a 34M-parameter Llama (hidden
512, 8 layers, random weights, the built-in tokenizer: the model of dpo_reference_memory.py) is saved
to a temporary directory, and each stage trains it for a few steps twice, with every weight and with
LoRA (r=16 on every linear layer), each run in a fresh process. The figure is that process's peak
resident memory (ru_maxrss from wait4); the trainable parameters are what its manifest records.

This process imports neither torch nor transformers, and a child writes the model: Linux carries a
parent's resident memory into a child's ru_maxrss when the child execs, so a heavy parent would
raise every figure to its own size. The runs fix glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_):
by default it rises as large blocks are freed, later tensors then come from the heap, and freed
memory stays resident in fragments, which made the same run's peak vary by 200 MB between repeats.

Run: python bench/lora_memory.py  (or `make bench`)
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS = 5
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # glibc's initial value, kept: see the docstring
LORA = ["model.lora.r=16", "model.lora.alpha=32"]
STAGES = {
    "dpo": ["data.train=builtin:arith_prefs", "data.eval=null", "train.batch_size=16"],  # a live reference model
    "grpo": ["data.train=builtin:arith", "train.batch_size=8", "grpo.num_generations=8"],  # grpo.beta=0: no reference
}


def write_model(directory: Path) -> None:
    """Runs in a child process (see the module docstring); prints the parameter count."""
    from dpo_reference_memory import save_model

    print(save_model(directory))


def peak_rss_mib(args: list[str], cwd: Path) -> float:
    """Peak resident memory of one `rlhf` run in a fresh process. (No wall time: a fixed mmap threshold slows it.)"""
    process = subprocess.Popen([sys.executable, "-m", "rlhf_cli", *args], cwd=cwd, env=os.environ | FIXED_MMAP_THRESHOLD,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench run failed: {' '.join(args)}\n{process.stderr.read()}")
    return usage.ru_maxrss / 1024


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        written = subprocess.run([sys.executable, __file__, "write-model", str(root / "model")],
                                 check=True, capture_output=True, text=True)
        parameters = int(written.stdout.split()[-1])
        for stage, stage_args in STAGES.items():
            peaks = {}
            for mode, mode_args in (("full", []), ("LoRA r=16", LORA)):
                output_dir = f"{stage}-{mode.split()[0].lower()}"
                args = [stage, f"model.path={root / 'model'}", *stage_args, *mode_args, f"train.max_steps={STEPS}",
                        f"train.log_every={STEPS}", "train.save_every=0", "eval.generate=0", f"output_dir={output_dir}"]
                peak = peak_rss_mib(args, root)
                manifest = json.loads((root / output_dir / "manifest.json").read_text())
                peaks[mode] = peak
                rows.append((stage, mode, manifest["parameters"]["trainable"], peak, peak / peaks["full"]))
    print(f"LoRA vs full fine-tuning, peak memory: {parameters / 1e6:.1f}M-parameter Llama (hidden 512, 8 layers), "
          f"{STEPS} steps, fp32, CPU")
    print("| stage | mode | trainable parameters | peak RSS (MiB) | LoRA / full |")
    print("| --- | --- | --- | --- | --- |")
    for stage, mode, trainable, peak, ratio in rows:
        print(f"| {stage} | {mode} | {trainable:,} | {peak:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["write-model"]:
        write_model(Path(sys.argv[2]))
    else:
        main()

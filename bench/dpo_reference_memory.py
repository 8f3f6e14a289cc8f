"""Peak memory of `rlhf dpo` with a live reference model against `dpo.precompute_ref=true`.

A 34M-parameter Llama (random weights, the built-in tokenizer) is saved to a temporary directory
and trained for 10 DPO steps on 160 built-in pairs twice, each run in its own process; the figure
is each process's peak resident memory (the cached run's includes scoring the pairs once). Run: python bench/dpo_reference_memory.py  (or `make bench`)
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def save_model(directory: Path) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    from rlhf_cli.models import TINY_DIR

    tokenizer = AutoTokenizer.from_pretrained(TINY_DIR)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def write_pairs(path: Path, count: int) -> None:
    import json

    from rlhf_cli.data.builtin import builtin_rows

    path.write_text("".join(json.dumps(row.data) + "\n" for row in builtin_rows("arith_prefs")[:count]))


def peak_rss_mib(args: list[str], cwd: Path) -> tuple[float, float]:
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "rlhf_cli", *args], cwd=cwd,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench run failed: {' '.join(args)}\n{process.stderr.read()}")
    return usage.ru_maxrss / 1024, time.perf_counter() - started


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        parameters = save_model(root / "model")
        write_pairs(root / "pairs.jsonl", 160)
        common = ["dpo", f"model.path={root / 'model'}", f"data.train={root / 'pairs.jsonl'}", "data.eval=null",
                  "eval.generate=0", "train.max_steps=10", "train.batch_size=16", "train.log_every=10", "train.save_every=0"]
        live, live_s = peak_rss_mib([*common, "output_dir=live"], root)
        cached, cached_s = peak_rss_mib([*common, "output_dir=cached", "dpo.precompute_ref=true"], root)
    print(f"dpo reference memory: {parameters / 1e6:.1f}M-parameter model, 10 steps of 16 pairs, fp32, CPU")
    print("| reference | peak RSS (MiB) | wall (s) |")
    print("| --- | --- | --- |")
    print(f"| live (a second model in memory) | {live:.0f} | {live_s:.1f} |")
    print(f"| dpo.precompute_ref=true (cached, freed) | {cached:.0f} | {cached_s:.1f} |")
    print(f"precompute_ref / live peak memory: {cached / live:.2f}")


if __name__ == "__main__":
    main()

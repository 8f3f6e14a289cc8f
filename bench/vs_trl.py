"""Side by side with Hugging Face TRL: the same work through `rlhf` and through TRL's trainers.

For each stage (sft, train-rm, dpo, grpo; TRL has no PPO trainer since 1.0) and each model (the
tiny preset and a 27M-parameter Llama for the CPU; on a GPU, a Llama of Qwen2.5-0.5B's shape), both
sides start from the same saved weights, read the same rows in the same order, with the same batch
size, learning rate, clipping, steps and generation settings. Each run is its own process; the two
sides alternate, several times.

Both sides are measured by the same instruments, installed in the worker process before the model
is built: a global optimizer-step hook stamps the end of every step, and a wrapper around each
side's generation entry point (`rlhf_cli.rollout.generate`; transformers' `generate`, which TRL
calls) times generation and counts the tokens it produced. The clock runs from the end of
step WARMUP to the end of the last step, so imports, set-up, tokenisation, the final save and the
first steps' one-off costs are left out. Training tokens are the tokens of the rows trained on,
counted once from the data (prompt + response + EOS; a pair counts its prompt twice), so padding
and work one side saves (a prompt run once for both responses) are not counted as tokens; for
grpo, the prompt and completion tokens of the rollouts. Peak memory is the worker's peak resident
set (ru_maxrss), imports included; on a GPU, the GPU memory its tensors took at most
(max_memory_allocated). On a GPU the clock waits for the queued GPU work at each step's end and
after each generation call. The work each side does is counted too: the token positions its
models run (every embedding lookup: padding, a prompt run once per response, generation's steps),
per training token, and of those the ones in forward passes kept for a backward. Two sides with the
same positions per token differ only in how fast they run them.

The table's ours/TRL is the ratio of the two sides' medians; in brackets, the lowest and highest
ratio within one repetition (the two sides' runs next to each other), which shows how far the
machine moved during the invocation.

The first-step loss is compared in separate one-step runs (the formulas are the same for sft,
train-rm and dpo; grpo samples different completions on each side, so its loss is not compared);
the benchmark fails when they differ by more than LOSS_TOLERANCE (on a GPU, under bf16 autocast, by
more than BF16_LOSS_TOLERANCE of the loss).

sft's FLOP/s: 6 x (parameters in matmuls) + 12 x layers x hidden x sequence length per training
token, against the peak of a square torch matmul (float32 on a CPU, bf16 on a GPU) measured in the
same invocation.

Usage: python bench/vs_trl.py [--threads N] [--reps 3] [--models tiny,llama27m] [--stages sft,train-rm,dpo,grpo]
                              [--device cuda --models llama500m]
Needs the bench extra: pip install -c constraints-cpu.txt -e ".[bench]". bench/device.sh runs it on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

STAGES = ("sft", "train-rm", "dpo", "grpo")
MODELS = {
    # name: (Llama config overrides of the tiny preset, or None for the preset itself; steps; warm-up steps)
    "tiny": (None, 60, 10),
    "llama27m": ({"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
                  "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 64}, 16, 4),
    # For a GPU: Qwen2.5-0.5B's shape (grouped-query attention, 2 key/value heads) as a Llama, with the
    # tiny tokenizer's vocabulary, so that an untrained model's completions decode to text the reward
    # can score (with Qwen's 151,936 tokens almost none would, and every group would score alike).
    "llama500m": ({"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                   "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 2048}, 20, 5),
}
CPU_MODELS = ("tiny", "llama27m")
BATCH = {"sft": 32, "train-rm": 32, "dpo": 32, "grpo": 8}  # rows (pairs; grpo: prompts) per step
GROUP, MAX_NEW_TOKENS, LR, SEED = 8, 8, 1e-5, 0
LOSS_TOLERANCE = 1e-4  # first-step losses of the same formula on the same inputs (sft, train-rm, dpo)
# bf16 autocast rounds each side's matmuls and reductions in its own order: relative to the loss.
BF16_LOSS_TOLERANCE = 5e-3
DATA = {"sft": "builtin:arith", "train-rm": "builtin:arith_prefs_mixed", "dpo": "builtin:arith_prefs_mixed",
        "grpo": "builtin:arith"}


# ---------------------------------------------------------------------------------------------
# Set-up: the saved models both sides load.

def save_models(name: str, workdir: Path) -> Path:
    """`name`/causal and `name`/reward: a causal LM and a sequence classifier with a drawn head."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_cli.models import TINY_DIR

    overrides = MODELS[name][0] or {}
    tokenizer = AutoTokenizer.from_pretrained(TINY_DIR)
    root = workdir / name
    for kind, factory, extra in (("causal", AutoModelForCausalLM, {}), ("reward", AutoModelForSequenceClassification, {"num_labels": 1})):
        config = AutoConfig.from_pretrained(TINY_DIR, **overrides, **extra)
        torch.manual_seed(SEED)
        model = factory.from_config(config)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(root / kind)
        tokenizer.save_pretrained(root / kind)
    return root


def matmul_peak(device: str, repeats: int = 20) -> float:
    """FLOP/s of a square matmul in the device's training precision (float32 on a CPU, bf16 on a GPU),
    the best of `repeats`."""
    import torch

    size, dtype = (1536, torch.float32) if device == "cpu" else (8192, torch.bfloat16)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work, so that a clock reading after it counts that work."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# The instruments, the same on both sides.

class Probe:
    def __init__(self, device: str) -> None:
        self.device = device
        self.step_ends: list[float] = []
        # Per step, [k] counting what runs after the end of step k and up to the end of step k + 1 (steps
        # 1-based; the last entry is what runs after the last step): "tokens" (of the rows trained on),
        # "generated" (tokens), "generate_s" (seconds), "positions" (token positions through the model,
        # embedding lookups, padding included) and "trained_positions" (of those, in forward passes that
        # keep a graph for backward).
        self.counts: list[Counter] = [Counter()]
        self.first_loss: float | None = None

    def install(self, side: str, pad_id: int) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def on_step(optimizer, args, kwargs):
            synchronize(self.device)
            self.step_ends.append(time.perf_counter())
            self.counts.append(Counter())

        register_optimizer_step_post_hook(on_step)
        self._count_positions()
        if side == "ours":
            import rlhf_cli.rollout as rollout

            rollout.generate = self._timed(rollout.generate, self._count_ours)
        else:
            from transformers.generation.utils import GenerationMixin

            GenerationMixin.generate = self._timed(GenerationMixin.generate, lambda *a: self._count_transformers(pad_id, *a))

    def _count_positions(self) -> None:
        """Every token embedding looked up, by either side's model: the work each side does per step."""
        import torch

        embed = torch.nn.Embedding.forward

        def counted(module, input_ids):
            self.counts[-1]["positions"] += input_ids.numel()
            if torch.is_grad_enabled():
                self.counts[-1]["trained_positions"] += input_ids.numel()
            return embed(module, input_ids)

        torch.nn.Embedding.forward = counted

    def _timed(self, generate, count):
        """Each side's generation entry point, timed; `count` gives (prompt tokens, generated tokens)."""
        def timed(*args, **kwargs):
            start = time.perf_counter()
            output = generate(*args, **kwargs)
            synchronize(self.device)
            self.counts[-1]["generate_s"] += time.perf_counter() - start
            prompt_tokens, new_tokens = count(args, kwargs, output)
            self.counts[-1]["generated"] += new_tokens
            self.counts[-1]["tokens"] += prompt_tokens + new_tokens  # the rows the step trains on
            return output

        return timed

    @staticmethod
    def _count_ours(args, kwargs, completions):
        return sum(len(p) for p in args[1]), sum(len(c) for c in completions)

    @staticmethod
    def _count_transformers(pad_id, args, kwargs, output):
        sequences = output if hasattr(output, "shape") else output.sequences
        prompt = kwargs["input_ids"]
        return int(kwargs["attention_mask"].sum()), int((sequences[:, prompt.size(1):] != pad_id).sum())

    def result(self, warmup: int) -> dict:
        steps = len(self.step_ends)
        window = slice(warmup, steps)  # steps warmup + 1 .. steps, the ones the clock times
        seconds = self.step_ends[-1] - self.step_ends[warmup - 1]
        timed = sum(self.counts[window], Counter())
        return {"steps": steps, "seconds": seconds,
                **{key: timed[key] for key in ("tokens", "generated", "generate_s", "positions", "trained_positions")},
                "first_loss": self.first_loss, "peak_mib": self.peak_mib()}

    def peak_mib(self) -> float:
        """The run's peak memory: GPU memory allocated on a GPU, else the process's resident set."""
        if self.device == "cuda":
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# The two sides.

def digit_share(prompts: list[str], completions: list[str], examples) -> list[float]:
    """grpo's reward on both sides: the share of digits in a completion. Unlike exact match, it varies
    within a group from the first step, so neither side can skip its update for lack of signal."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def run_ours(stage: str, models: Path, steps: int, out: Path, probe: Probe) -> None:
    from rlhf_cli.cli import app

    model = models / ("reward" if stage == "train-rm" else "causal")
    common = [f"output_dir={out}", f"model.path={model}", f"data.train={DATA[stage]}", "data.eval=null", "data.eval_size=0",
              f"train.max_steps={steps}", f"train.batch_size={BATCH[stage]}", "train.grad_accum=1", f"train.lr={LR}",
              "train.lr_scheduler=constant", "train.warmup_ratio=0", "train.weight_decay=0", "train.max_grad_norm=1.0",
              f"train.seed={SEED}", "train.log_every=10", "train.eval_every=0", "train.save_every=0",
              f"model.dtype={'fp32' if probe.device == 'cpu' else 'bf16'}"]
    extra = {
        "sft": ["eval.generate=0"],
        "train-rm": [],
        "dpo": ["eval.generate=0", "dpo.sft_weight=0", "dpo.beta=0.1", "dpo.loss=sigmoid", "eval.accuracy_data=null"],
        "grpo": [f"grpo.num_generations={GROUP}", "grpo.beta=0", f"rollout.max_new_tokens={MAX_NEW_TOKENS}",
                 "rollout.temperature=1.0", "eval.accuracy_data=null", "grpo.rewards=[{name: 'vs_trl:digit_share'}]"],
    }[stage]
    app([stage, *common, *extra], prog_name="rlhf", standalone_mode=False)
    if steps == 1 and stage != "grpo":
        first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        probe.first_loss = first["loss"]


def trl_rows(stage: str) -> list[dict]:
    """The rows ours reads, in the order our sampler visits them, in TRL's column names."""
    from rlhf_cli.data.batches import StepBatches
    from rlhf_cli.data.builtin import builtin_rows

    rows = [dict(r.data) for r in builtin_rows(DATA[stage].removeprefix("builtin:"))]
    if stage == "grpo":
        return [{"prompt": r["prompt"], "answer": r["completion"]} for r in rows]
    order = StepBatches(list(range(len(rows))), BATCH[stage], 1, SEED)
    steps = min(len(rows), 4096) // BATCH[stage]  # more than any run here takes
    return [rows[i] for step in range(steps) for i in order.micro_batches(step)[0]]


def run_trl(stage: str, models: Path, steps: int, out: Path, probe: Probe) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    import trl

    model_dir = models / ("reward" if stage == "train-rm" else "causal")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    factory = AutoModelForSequenceClassification if stage == "train-rm" else AutoModelForCausalLM
    model = factory.from_pretrained(model_dir)
    common = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=BATCH[stage],
                  gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                  weight_decay=0.0, max_grad_norm=1.0, seed=SEED, logging_steps=10, save_strategy="no",
                  report_to="none", use_cpu=probe.device == "cpu", dataloader_num_workers=0,
                  train_sampling_strategy="sequential", disable_tqdm=True,
                  # The same work on both sides: float32 on a CPU (TRL would autocast to bf16), bf16 autocast
                  # over float32 weights on a GPU; no activation recomputation.
                  bf16=probe.device == "cuda", gradient_checkpointing=False)
    dataset = Dataset.from_list(trl_rows(stage))
    if stage == "sft":
        trainer_cls, config = trl.SFTTrainer, trl.SFTConfig(**common, max_length=512)
    elif stage == "train-rm":
        trainer_cls, config = trl.RewardTrainer, trl.RewardConfig(**common, max_length=512)
    elif stage == "dpo":
        trainer_cls, config = trl.DPOTrainer, trl.DPOConfig(**common, max_length=512, beta=0.1, loss_type=["sigmoid"])
    else:
        per_step = BATCH[stage] * GROUP
        trainer_cls = trl.GRPOTrainer
        config = trl.GRPOConfig(**{**common, "per_device_train_batch_size": per_step}, num_generations=GROUP,
                                steps_per_generation=1, max_completion_length=MAX_NEW_TOKENS, temperature=1.0, beta=0.0)

    class Recording(trainer_cls):
        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            if probe.first_loss is None:
                probe.first_loss = float((loss[0] if isinstance(loss, tuple) else loss).detach())
            return loss

    kwargs = {"reward_funcs": lambda prompts, completions, **_: digit_share(prompts, completions, None)} if stage == "grpo" else {}
    Recording(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, **kwargs).train()


def worker(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    probe = Probe(args.device)
    models = Path(args.models)
    probe.install(args.side, AutoTokenizer.from_pretrained(models / "causal").pad_token_id)
    (run_ours if args.side == "ours" else run_trl)(args.stage, models, args.steps, Path(args.out), probe)
    result = probe.result(args.warmup) if args.steps > args.warmup else {"first_loss": probe.first_loss}
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# The driver.

def launch(side: str, stage: str, models: Path, steps: int, warmup: int, workdir: Path, device: str) -> dict:
    out = tempfile.mkdtemp(dir=workdir, prefix=f"{side}-{stage}-")
    command = [sys.executable, __file__, "--worker", side, "--stage", stage, "--models-dir", str(models),
               "--steps", str(steps), "--warmup", str(warmup), "--out", out, "--threads", os.environ["OMP_NUM_THREADS"],
               "--device", device]
    done = subprocess.run(command, capture_output=True, text=True, cwd=workdir)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{side} {stage} failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def flops_per_token(models: Path, mean_length: float) -> float:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(models / "causal")
    # q and o span every head; k and v only the key/value heads (grouped-query attention).
    attention = 2 * c.hidden_size * (c.num_attention_heads + c.num_key_value_heads) * c.head_dim
    layer = attention + 3 * c.hidden_size * c.intermediate_size
    matmul_params = c.num_hidden_layers * layer + c.hidden_size * c.vocab_size
    return 6 * matmul_params + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * mean_length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--models", default=",".join(CPU_MODELS), help=f"of {', '.join(MODELS)}")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads of every run (1 gives steadier figures on a busy machine)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both sides train: cuda trains under bf16 autocast, and MiB is the GPU's peak")
    parser.add_argument("--worker", choices=("ours", "trl"))
    parser.add_argument("--stage", choices=STAGES)
    parser.add_argument("--models-dir")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--out")
    args = parser.parse_args()
    for key, value in {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "DS_ACCELERATOR": args.device,
                       "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.worker:
        args.side, args.models = args.worker, args.models_dir
        return worker(args)

    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"--models: no model {', '.join(sorted(unknown))}; there are {', '.join(MODELS)}")
    import torch

    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        peak = matmul_peak(args.device)
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        if args.device == "cuda":
            machine = f"{torch.cuda.get_device_name()} ({machine})"
        precision = "float32" if args.device == "cpu" else "bf16"
        print(f"# {machine}, torch {torch.__version__} with {threads} threads; {precision} matmul peak "
              f"{peak / 1e9:.1f} GFLOP/s; MiB: {'peak resident memory' if args.device == 'cpu' else 'peak GPU memory allocated'}",
              flush=True)
        rows = []
        for name in args.models.split(","):
            models = save_models(name, workdir)
            steps, warmup = MODELS[name][1], MODELS[name][2]
            for stage in args.stages.split(","):
                loss = {side: launch(side, stage, models, 1, 1, workdir, args.device)["first_loss"] for side in ("ours", "trl")}
                runs: dict[str, list[dict]] = {"ours": [], "trl": []}
                for rep in range(args.reps):
                    for side in (("ours", "trl") if rep % 2 == 0 else ("trl", "ours")):
                        runs[side].append(launch(side, stage, models, steps, warmup, workdir, args.device))
                if stage != "grpo":
                    tokens = data_tokens(stage, models, warmup, steps)
                    for run in runs["ours"] + runs["trl"]:
                        run["tokens"] = tokens
                rows.append(summarise(name, stage, runs, loss, models, peak, warmup))
                print(rows[-1]["line"], flush=True)
    print_table(rows)
    mismatched = [f"{r['model']} {r['stage']}: {r['loss_ours']:.6f} vs {r['loss_trl']:.6f}" for r in rows
                  if r["loss_ours"] is not None and not losses_agree(r["loss_ours"], r["loss_trl"], args.device)]
    if mismatched:
        bound = LOSS_TOLERANCE if args.device == "cpu" else f"{BF16_LOSS_TOLERANCE} of the loss (bf16)"
        sys.exit(f"first-step losses differ by more than {bound}: " + "; ".join(mismatched))


def losses_agree(ours: float, trl: float, device: str) -> bool:
    if device == "cpu":
        return abs(ours - trl) <= LOSS_TOLERANCE
    return abs(ours - trl) <= BF16_LOSS_TOLERANCE * abs(trl)


def data_tokens(stage: str, models: Path, first_step: int, last_step: int) -> int:
    """Tokens of the rows of steps first_step + 1 .. last_step: prompt + response + EOS, a pair's prompt twice."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models / "causal")

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    rows = trl_rows(stage)[first_step * BATCH[stage] : last_step * BATCH[stage]]
    if stage == "sft":
        return sum(count(r["prompt"]) + count(r["completion"]) + 1 for r in rows)
    return sum(2 * count(r["prompt"]) + count(r["chosen"]) + count(r["rejected"]) + 2 for r in rows)


def summarise(model: str, stage: str, runs: dict, loss: dict, models: Path, peak: float, warmup: int) -> dict:
    def median(side: str, key: str) -> float:
        return statistics.median(r[key] / r["seconds"] if key != "peak_mib" else r[key] for r in runs[side])

    row = {"model": model, "stage": stage}
    for side in ("ours", "trl"):
        row[f"{side}_tps"] = median(side, "tokens")
        row[f"{side}_mib"] = median(side, "peak_mib")
        row[f"{side}_gen_tps"] = median(side, "generated") if stage == "grpo" else None
        row[f"{side}_rollout_share"] = statistics.median(r["generate_s"] / r["seconds"] for r in runs[side]) if stage == "grpo" else None
        for kind in ("positions", "trained_positions"):
            row[f"{side}_{kind}"] = statistics.median(r[kind] / r["tokens"] for r in runs[side])
    for side in ("ours", "trl"):
        run = runs[side][0]
        mean_length = run["tokens"] / (BATCH[stage] * (run["steps"] - warmup))
        row[f"{side}_mfu"] = row[f"{side}_tps"] * flops_per_token(models, mean_length) / peak if stage == "sft" else None
    row["loss_ours"], row["loss_trl"] = loss["ours"], loss["trl"]
    # The ratio within each repetition (the two sides' runs next to each other): its range shows how far the machine moved.
    pairs = [(o["tokens"] / o["seconds"]) / (t["tokens"] / t["seconds"]) for o, t in zip(runs["ours"], runs["trl"])]
    row["pair_ratios"] = (min(pairs), max(pairs))
    row["line"] = (f"{model} {stage}: ours {row['ours_tps']:.0f} tok/s {row['ours_mib']:.0f} MiB; "
                   f"TRL {row['trl_tps']:.0f} tok/s {row['trl_mib']:.0f} MiB; ratio {row['ours_tps'] / row['trl_tps']:.2f}x "
                   f"(pairs {min(pairs):.2f}-{max(pairs):.2f}x)")
    return row


def print_table(rows: list[dict]) -> None:
    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print("\n| model | stage | ours tok/s | TRL tok/s | ours/TRL (pairs) | ours MiB | TRL MiB | first loss ours / TRL "
          "| ours gen tok/s (rollout share) | TRL gen tok/s (rollout share) | sft FLOP/s of matmul peak, ours / TRL "
          "| positions run per token (with grad), ours / TRL |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        loss = "-" if r["loss_ours"] is None else f"{r['loss_ours']:.5f} / {r['loss_trl']:.5f}"
        gen = {side: "-" if r[f"{side}_gen_tps"] is None else f"{r[f'{side}_gen_tps']:.0f} ({r[f'{side}_rollout_share']:.0%})"
               for side in ("ours", "trl")}
        print(f"| {r['model']} | {r['stage']} | {r['ours_tps']:.0f} | {r['trl_tps']:.0f} | {r['ours_tps'] / r['trl_tps']:.2f}x "
              f"({r['pair_ratios'][0]:.2f}-{r['pair_ratios'][1]:.2f}) | {r['ours_mib']:.0f} | {r['trl_mib']:.0f} | {loss} | {gen['ours']} | {gen['trl']} "
              f"| {fmt(r['ours_mfu'], '.0%')} / {fmt(r['trl_mfu'], '.0%')} "
              f"| {r['ours_positions']:.2f} ({r['ours_trained_positions']:.2f}) / {r['trl_positions']:.2f} ({r['trl_trained_positions']:.2f}) |")


if __name__ == "__main__":
    main()

"""Stage name -> the function that runs it (imported only when a stage runs)."""

from rlhf_cli.stages import dpo, grpo, ppo, sft, train_rm

STAGE_RUNNERS = {"sft": sft.run, "train-rm": train_rm.run, "dpo": dpo.run, "grpo": grpo.run, "ppo": ppo.run}

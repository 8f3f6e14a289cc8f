"""rlhf: a config-driven command-line pipeline for RLHF (SFT, reward models, PPO, DPO, GRPO)."""

__version__ = "0.1.0"

"""The RL and fine-tuning math: pure tensor functions, importing torch only.

Vocabulary: `logprobs`, `old_logprobs`, `ref_logprobs`, `values`, `advantages`, `returns`, and
masks such as `loss_mask` (True = this token counts). Shapes are written (B, T).
"""

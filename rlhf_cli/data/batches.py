"""Deterministic, resumable batching and padding.

The samples of optimizer step k depend only on (seed, k): sample position p = k·B·A·W + j reads
element p mod n of the permutation drawn for epoch p div n (B micro-batch, A accumulation steps,
W processes). Resuming at step k therefore needs no saved sampler state, and a resumed run sees
exactly the samples an uninterrupted one would. Process r takes the r-th B·A of the step's
samples, so W processes with micro-batch B see the same steps as one process with B·W.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rlhf_cli.data.tokenize import TokenizedSample


class StepBatches:
    def __init__(self, samples: Sequence, batch_size: int, grad_accum: int, seed: int):
        from rlhf_cli import distributed

        self.samples = samples
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self._epoch = -1
        self._order: list[int] = []

    @property
    def samples_per_step(self) -> int:
        """Samples of one optimizer step, all processes together."""
        return self.batch_size * self.grad_accum * self.world_size

    def micro_batches(self, step: int) -> list[list]:
        """This process's grad_accum micro-batches of optimizer step `step` (0-based)."""
        share = self.batch_size * self.grad_accum
        start = step * self.samples_per_step + self.rank * share
        chosen = [self.samples[self._index(p)] for p in range(start, start + share)]
        return [chosen[i : i + self.batch_size] for i in range(0, len(chosen), self.batch_size)]

    def first_position(self, micro_batch: int) -> int:
        """Where this process's micro-batch `micro_batch` starts among the samples of a step."""
        return self.rank * self.batch_size * self.grad_accum + micro_batch * self.batch_size

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.samples))
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(len(self.samples), generator=generator).tolist()
            self._epoch = epoch
        return self._order[offset]


def collate(samples: list[TokenizedSample], pad_id: int, padding_free: bool = False) -> dict:
    """Right-padded (B, T) tensors: input_ids, loss_mask, and attention_mask or, for packed rows, position_ids.

    Packed rows pass no attention mask: transformers then derives per-sample attention from the
    position ids, which restart at each sample boundary.

    padding_free: every sample (or packed row) in one (1, N) row of N real tokens, with position ids
    restarting at each sample and the `segments` that keep attention inside each sample (the model
    must use `rlhf_cli.models.padding_free.segment_attention`).
    """
    if padding_free:
        return _one_row(samples)
    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(samples), width), dtype=torch.bool)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    packed = samples[0].position_ids is not None
    position_ids = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = torch.tensor(sample.input_ids)
        loss_mask[row, :n] = torch.tensor(sample.loss_mask)
        attention_mask[row, :n] = 1
        if packed:
            position_ids[row, :n] = torch.tensor(sample.position_ids)
            # Padding continues as one more "sample" so it never joins the last real one.
            position_ids[row, n:] = torch.arange(width - n)
    batch = {"input_ids": input_ids, "loss_mask": loss_mask}
    if packed:
        batch["position_ids"] = position_ids
    else:
        batch["attention_mask"] = attention_mask
    return batch


def _one_row(samples: list[TokenizedSample]) -> dict:
    from rlhf_cli.models.padding_free import segments_from_positions

    input_ids = torch.tensor([t for s in samples for t in s.input_ids])[None]
    # A sample's first token is never a label: in the row it would be predicted from the sample before.
    loss_mask = torch.tensor([m and i > 0 for s in samples for i, m in enumerate(s.loss_mask)])[None]
    position_ids = torch.cat([torch.tensor(s.position_ids) if s.position_ids is not None else torch.arange(len(s.input_ids))
                              for s in samples])[None]
    # All ones: SDPA's mask is then skipped, and segment_attention keeps each sample to itself.
    return {"input_ids": input_ids, "loss_mask": loss_mask, "position_ids": position_ids,
            "attention_mask": torch.ones_like(input_ids), "segments": segments_from_positions(position_ids)}

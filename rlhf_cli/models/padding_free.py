"""Padding-free batches: the samples of a micro-batch concatenated into one row, with attention
kept inside each sample.

Every matmul of a transformer layer runs per token, so a row of concatenated samples costs their
real tokens only, where padding a micro-batch to its longest sample costs that width times the
batch size. Attention is the one per-sample operation: `segment_attention` gathers each sample's
queries, keys and values into a row of its own, runs SDPA with causal masking there (each row is
padded at its end only, and no real query reaches a later key), and scatters the outputs back to
their tokens. Position ids restart at 0 for every sample, so RoPE sees each sample as if alone.
This is the work flash-attention's variable-length kernels do on a GPU, in torch ops that run on
any device, with SDPA's own kernels. Samples that begin with the same tokens run them once
(`shared_prefixes`): the later ones attend to the shared tokens where they run, as a response
attends to its prompt.

The attention is registered with transformers' AttentionInterface; without `segments` (padded
batches, generation with a KV cache) it is transformers' SDPA. Its mask function hands the padding
mask through as it is, as flash-attention's does, and `segment_attention` builds SDPA's mask itself
when it needs one: transformers' SDPA mask function reads the mask's values to decide whether a
mask is needed, which on a GPU waits for every queued kernel, once a forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

ATTENTION = "rlhf_segments"


@dataclass
class SampleGroup:
    """Samples whose tokens follow one another in the row, each attending within itself, or after a prefix.

    A sample's queries are its own tokens. Its keys are the same tokens (causal attention), or, for a
    response whose prompt runs once elsewhere in the row, the prompt's tokens and then its own, with
    `mask` saying which keys each query sees.
    """

    index: torch.Tensor  # (samples, longest) flat positions (row-major over B x T) of each sample's tokens; 0 past its end
    valid: torch.Tensor  # (samples, longest) True where `index` is one of the sample's tokens
    key_index: Optional[torch.Tensor] = None  # (samples, keys) flat positions of each sample's keys
    mask: Optional[torch.Tensor] = None  # (samples, 1, longest, keys) True where a query sees a key
    # The flat (samples x longest) positions of the real tokens: found once, not in every layer (a device sync).
    real: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.real is None:
            self.real = self.valid.reshape(-1).nonzero().squeeze(-1)

    def to(self, device: torch.device) -> "SampleGroup":
        return SampleGroup(*(t.to(device, non_blocking=True) if t is not None else None
                             for t in (self.index, self.valid, self.key_index, self.mask, self.real)))


@dataclass
class Segments:
    """The samples of a batch, in groups that cover its B x T tokens in order."""

    groups: list[SampleGroup]

    def to(self, device: torch.device) -> "Segments":
        return Segments([g.to(device) for g in self.groups])

    def read_by(self, wanted: torch.Tensor) -> torch.Tensor:
        """(N,) True at the flat positions the outputs at `wanted` (N,) depend on: those positions, the
        keys they attend to, and the keys of those keys, down through the layers.

        A causal LM's logit at the last token of a sample scores nothing, and nothing after it in the
        sample reads it: such positions need not run at all. Groups are walked last to first: a
        group's keys lie in itself or in an earlier group (responses read their prompt)."""
        needed = wanted.clone()
        for group in reversed(self.groups):
            queries = needed[group.index] & group.valid
            if group.key_index is None:  # causal within the sample: every key up to the last needed query
                reads = queries.flip(1).cummax(1).values.flip(1) & group.valid
                needed[group.index[reads]] = True
            else:
                reads = (group.mask[:, 0] & queries[:, :, None]).any(1)
                needed[group.key_index[reads]] = True
        return needed

    def narrowed(self, needed: torch.Tensor) -> "Segments":
        """The segments of the row that keeps the `needed` positions alone (needed as `read_by` gives it:
        a dropped key is seen by dropped queries only, so the masks stay as they are)."""
        position = needed.cumsum(0) - 1

        def moved(index: torch.Tensor) -> torch.Tensor:
            return torch.where(needed[index], position[index], 0)

        return Segments([SampleGroup(moved(g.index), g.valid & needed[g.index],
                                     None if g.key_index is None else moved(g.key_index), g.mask)
                         for g in self.groups])


@dataclass
class SharedPrefixes:
    """A row in which samples that begin with the same tokens run those tokens once.

    Position t of a causal sample holds the same hidden states as position t of any sample that
    starts with the same t + 1 tokens: each attends only to the tokens before it, at the same position
    ids. So a shared prefix runs once, every sample that begins with it reads its keys and values
    there, and the gradients of all those samples add up in it, as they would over their own copies.
    """

    survivors: torch.Tensor  # (M,) the positions of the old row that the new row keeps, in its order
    moved_to: torch.Tensor  # (N,) the new position of each old position (for a dropped one, its copy's)
    segments: Segments


def shared_prefixes(segments: Segments, input_ids: torch.Tensor) -> Optional[SharedPrefixes]:
    """The row that runs once each prefix its samples share; None when no two samples share a token.

    input_ids: (N,) the row's tokens. Two samples of a group share their first t + 1 tokens when they
    read the same keys before them (none for a causal sample, the same prompt for two responses) and
    their tokens 0..t are the same. The later of them keeps only the tokens after what it shares, in a
    group that reads the shared ones as keys. Host tensors in and out (`plan_kept`).
    """
    tokens, groups = input_ids, segments.groups
    alias = torch.arange(tokens.numel())  # the position each position's copy runs at
    plans = []
    for group in groups:
        outside, outside_valid = _keys_before(group)
        # Keys lie in earlier groups, whose positions already alias to the copies that run.
        reads = torch.where(outside_valid, alias[outside], -1)
        start = torch.unique(reads, dim=0, return_inverse=True)[1] if reads.size(1) else torch.zeros(len(reads), dtype=torch.long)
        first = _first_sharers(tokens[group.index], group.valid, start)
        depth = (first != torch.arange(first.size(0))[:, None]).sum(1)  # a sample's shared tokens come first
        alias[group.index[group.valid]] = group.index.gather(0, first)[group.valid]
        plans.append((outside, outside_valid, depth))
    if not any(bool((depth > 0).any()) for _, _, depth in plans):
        return None

    def parts(group: SampleGroup, depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The samples that share nothing, those that share some tokens and own the rest, and the
        (S, L) mask of the tokens each sample runs itself."""
        owned = group.valid & (torch.arange(group.index.size(1))[None, :] >= depth[:, None])
        return (depth == 0).nonzero().squeeze(1), ((depth > 0) & owned.any(1)).nonzero().squeeze(1), owned

    splits = [parts(group, depth) for group, (_, _, depth) in zip(groups, plans)]
    survivors = torch.cat([group.index[rows][owned[rows]] for group, (unshared, sharing, owned) in zip(groups, splits)
                           for rows in (unshared, sharing)])
    new_position = torch.zeros_like(alias)
    new_position[survivors] = torch.arange(survivors.numel())
    moved_to = new_position[alias]

    new_groups = []
    for group, (outside, outside_valid, depth), (unshared, sharing, _) in zip(groups, plans, splits):
        if len(unshared):
            width = int(group.valid[unshared].sum(1).max())  # a sample's tokens come first in its row
            new_groups.append(SampleGroup(
                moved_to[group.index[unshared, :width]], group.valid[unshared, :width],
                None if group.key_index is None else moved_to[group.key_index[unshared]],
                None if group.mask is None else group.mask[unshared, :, :width]))
        if len(sharing):
            new_groups.append(_after_shared_prefix(moved_to[outside[sharing]], outside_valid[sharing],
                                                   moved_to[group.index[sharing]], group.valid[sharing], depth[sharing]))
    return SharedPrefixes(survivors, moved_to, Segments(new_groups))


def _keys_before(group: SampleGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, E) the keys each sample reads before its own tokens (a response's prompt; none for a causal
    sample), and where they are real: the keys its first query sees other than itself."""
    if group.key_index is None:
        return group.index[:, :0], group.valid[:, :0]
    sees = group.mask[:, 0, 0, :] & (group.key_index != group.index[:, :1])
    order = sees.int().argsort(dim=1, descending=True, stable=True)[:, : int(sees.sum(1).max())]
    return group.key_index.gather(1, order), sees.gather(1, order)


def _first_sharers(tokens: torch.Tensor, valid: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """(S, L) for each sample and offset t, the first sample with the same `start` (what it reads
    before its tokens) and the same tokens 0..t.

    The prefixes of length t + 1 are told apart by (prefix of length t, token t); the walk stops at the
    first length where no two samples still agree, as no longer prefix can then be shared."""
    count, width = tokens.shape
    samples = torch.arange(count)
    first = samples[:, None].repeat(1, width)
    prefix = start
    # (prefix, token) as one integer: a 1-d unique is many times faster than a row-wise one.
    # Past its end a sample's token is its own number, below every real token.
    token_range = int(tokens.max()) + count + 1
    for offset in range(width):
        token = torch.where(valid[:, offset], tokens[:, offset] + count, samples)
        _, prefix = torch.unique(prefix * token_range + token, return_inverse=True)
        first[:, offset] = torch.full((count,), count).scatter_reduce(0, prefix, samples, "amin")[prefix]
        if bool((first[:, offset] == samples).all()):
            break
    return first


def _after_shared_prefix(outside: torch.Tensor, outside_valid: torch.Tensor, path: torch.Tensor,
                         valid: torch.Tensor, depth: torch.Tensor) -> SampleGroup:
    """Samples whose tokens before offset `depth` run elsewhere: queries from `depth` on, each seeing
    the keys its sample reads before its tokens (outside (S, E)) and its sample's tokens up to itself.
    path (S, L): the positions of each sample's tokens in the new row."""
    count, width = path.shape
    own = torch.arange(width)[None, :] + depth[:, None]  # the sample's offset of each query
    own_valid = own < valid.sum(1, keepdim=True)
    index = torch.where(own_valid, path.gather(1, own.clamp(max=width - 1)), 0)
    keys = torch.cat([torch.where(outside_valid, outside, 0), torch.where(valid, path, 0)], 1)
    sees_own = (torch.arange(width)[None, None, :] <= own[:, :, None]) & valid[:, None, :]
    mask = torch.cat([outside_valid[:, None, :].expand(count, width, -1), sees_own], 2)
    queries = int((valid.sum(1) - depth).max())
    return SampleGroup(index[:, :queries], own_valid[:, :queries], keys, mask[:, None, :queries])


def segments_from_positions(position_ids: torch.Tensor) -> Segments:
    """The samples of (B, T) position ids that restart at 0 for each sample (and at each row)."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().squeeze(-1)
    lengths = torch.diff(starts, append=torch.tensor([flat.numel()], device=flat.device))
    return Segments([SampleGroup(*_runs(starts, lengths))])


def prefixed_segments(prefix_starts, prefix_lengths, starts, lengths, owners) -> Segments:
    """Prefixes (prompts) that attend causally within themselves, then samples (responses) that
    follow prefix owners[i]: each attends to its whole prefix and, causally, to itself. Starts are flat
    token positions; the prefixes' tokens come first in the row."""
    prefix_index, prefix_valid = _runs(prefix_starts, prefix_lengths)
    index, valid = _runs(starts, lengths)
    key_index = torch.cat([prefix_index[owners], index], dim=1)
    prefix_width = prefix_index.size(1)
    # Query i sees every real key of its prefix, and its own keys 0..i.
    own_rank = torch.arange(key_index.size(1), device=index.device) - prefix_width
    sees = own_rank[None, :] <= torch.arange(index.size(1), device=index.device)[:, None]
    mask = sees[None] & torch.cat([prefix_valid[owners], valid], dim=1)[:, None, :]
    return Segments([SampleGroup(prefix_index, prefix_valid), SampleGroup(index, valid, key_index, mask[:, None])])


def _runs(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, longest) positions start..start+length-1 of each run, 0 past its end, and where they are real."""
    offsets = torch.arange(int(lengths.max()), device=starts.device)
    valid = offsets[None, :] < lengths[:, None]
    return torch.where(valid, starts[:, None] + offsets[None, :], 0), valid


def segment_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      segments: Optional[Segments] = None, **kwargs):
    """query (B, H, T, D), key and value (B, H_kv, T, D) -> ((B, T, H, D), None), as transformers' attention functions."""
    if segments is None:
        if query.size(2) == 1 and query.device.type == "cpu" and dropout == 0.0 and (attention_mask is None or attention_mask.dim() == 2):
            return one_query_attention(query, key, value, attention_mask, scaling), None
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = _causal_padding_mask(attention_mask, query.size(2))
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    batch, heads, length, _ = query.shape

    def tokens(x: torch.Tensor) -> torch.Tensor:  # (B, h, T, d) -> (B x T, h, d)
        return x.transpose(1, 2).reshape(batch * length, x.size(1), x.size(3))

    def per_sample(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # (B x T, h, d) -> (samples, h, width, d)
        # index_select, not x[index]: its backward (index_add_) is the cheaper one on a CPU.
        return x.index_select(0, index.reshape(-1)).view(*index.shape, x.size(1), x.size(2)).transpose(1, 2)

    query, key, value = tokens(query), tokens(key), tokens(value)
    outputs = []
    for group in segments.groups:
        keys = group.index if group.key_index is None else group.key_index
        out = F.scaled_dot_product_attention(  # (samples, h, longest, d)
            per_sample(query, group.index), per_sample(key, keys), per_sample(value, keys),
            attn_mask=group.mask, is_causal=group.mask is None, dropout_p=dropout, scale=scaling,
            enable_gqa=key.size(1) != heads)
        outputs.append(out.transpose(1, 2).reshape(-1, heads, out.size(-1)).index_select(0, group.real))
    return torch.cat(outputs).reshape(batch, length, heads, -1), None


def one_query_attention(query, key, value, key_valid: Optional[torch.Tensor], scaling: Optional[float]) -> torch.Tensor:
    """Attention of one query per row (a decoding step, which sees every real key): query (B, H, 1, D),
    key and value (B, H_kv, K, D), key_valid (B, K) or None -> (B, 1, H, D).

    Two matmuls and a softmax: on a CPU they take less time than SDPA's flash kernel on so small a
    problem (a generation call of the tiny preset's 64 rows, 4% less). Query heads that share a key
    head (grouped-query attention) are that key head's rows of queries."""
    batch, heads, _, dim = query.shape
    key_heads = key.size(1)
    grouped = query.reshape(batch, key_heads, heads // key_heads, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)) * (dim ** -0.5 if scaling is None else scaling)
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid.bool()[:, None, None, :], float("-inf"))
    return torch.matmul(scores.softmax(-1), value).reshape(batch, 1, heads, dim)


def _causal_padding_mask(key_valid: torch.Tensor, queries: int) -> torch.Tensor:
    """(B, 1, queries, keys) SDPA mask from a (B, keys) padding mask: the queries are the last `queries`
    keys (a KV cache holds the keys before them), each sees the real keys up to itself."""
    keys = key_valid.size(1)
    key_positions = torch.arange(keys, device=key_valid.device)
    return key_valid.bool()[:, None, None, :] & (key_positions[None, :] <= key_positions[keys - queries :, None])


def _padding_mask(*, kv_length: int, attention_mask: Optional[torch.Tensor] = None,
                  mask_function=causal_mask_function, **kwargs) -> Optional[torch.Tensor]:
    """transformers' mask function for `segment_attention`: the (B, keys) padding mask as it is, its
    values unread on the host (a padding-free row's is all ones and goes unused; a padded batch's is
    shaped into SDPA's mask in the attention). Any other pattern (packed rows told apart by their
    position ids) is transformers' SDPA mask."""
    if mask_function is not causal_mask_function:
        return sdpa_mask(kv_length=kv_length, attention_mask=attention_mask, mask_function=mask_function, **kwargs)
    return None if attention_mask is None else attention_mask[:, -kv_length:]


AttentionInterface.register(ATTENTION, segment_attention)
AttentionMaskInterface.register(ATTENTION, _padding_mask)


def use_segment_attention(model) -> Optional[str]:
    """Switch a transformers model to `segment_attention`; or say why it cannot take it (it stays as it is)."""
    config = model.config
    if not getattr(model, "_supports_attention_backend", False):
        return f"{type(model).__name__} does not take transformers' pluggable attention functions"
    if config._attn_implementation != "sdpa":
        return f"model.attn_implementation={config._attn_implementation} (padding-free batches need sdpa)"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "the model uses sliding-window attention"
    if getattr(config, "attn_logit_softcapping", None):
        return "the model soft-caps its attention logits"
    model.set_attn_implementation(ATTENTION)
    return None


def has_segment_attention(model) -> bool:
    return getattr(model.config, "_attn_implementation", None) == ATTENTION

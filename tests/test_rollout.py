"""Sampling: each row draws from its own seed, so a completion does not depend on its batch."""

import torch

from torch.utils._python_dispatch import TorchDispatchMode

from rlhf_cli.rollout import FilledInPlace, RowSampler, generate, row_seeds, top_p_probabilities


def _tiny():
    from rlhf_cli.config.schema import ModelConfig
    from rlhf_cli.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(path="tiny"))
    return tokenizer, load_causal_lm(ModelConfig(path="tiny"), tokenizer, seed=0)


def test_top_p_keeps_the_smallest_set_that_reaches_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = top_p_probabilities(logits, 0.7)  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: two tokens
    assert torch.allclose(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.allclose(top_p_probabilities(logits, 0.4), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))  # the top token always stays
    assert torch.allclose(top_p_probabilities(logits, 1.0), torch.tensor([[0.5, 0.3, 0.15, 0.05]]))


def test_row_k_th_token_is_drawn_with_the_k_th_uniform_of_its_seed():
    """The stream a sampled run's completions come from: draw k of row i is the k-th float64 of
    Generator(seeds[i]), however the draws are batched (runs resumed across versions sample alike)."""
    seeds, steps, vocab = [3, 1_000_003, 2**62 + 7], 5, 256  # 1/256 and its sums are exact in float32
    sampler = RowSampler(seeds, temperature=1.0, top_p=1.0, steps=steps)
    drawn = torch.stack([sampler(torch.zeros(len(seeds), vocab)) for _ in range(steps)], dim=1)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    for k in range(steps):
        for row, generator in enumerate(generators):
            uniform = torch.rand(1, generator=generator, dtype=torch.float64).float()
            # Uniform logits: the inverse CDF picks token ceil(u * vocab) - 1.
            assert int(drawn[row, k]) == int(torch.ceil(uniform * vocab)) - 1


def test_a_rows_completion_depends_on_its_seed_not_on_its_batch():
    tokenizer, model = _tiny()
    prompts = [tokenizer.encode(text) for text in ("12+7=", "3*4=", "100-1=", "8+8=")]
    seeds = row_seeds(5, step=3, first_row=0, count=4)
    common = dict(max_new_tokens=12, pad_id=tokenizer.pad_token_id, stop_ids={tokenizer.eos_token_id}, temperature=1.0, top_p=0.95)

    together = generate(model, prompts, batch_size=4, seeds=seeds, **common)
    apart = generate(model, prompts[:2], batch_size=2, seeds=seeds[:2], **common) + \
        generate(model, prompts[2:][::-1], batch_size=1, seeds=seeds[2:][::-1], **common)[::-1]
    assert together == apart
    assert generate(model, prompts, batch_size=4, seeds=row_seeds(6, step=3, first_row=0, count=4), **common) != together
    assert row_seeds(5, step=3, first_row=2, count=2) == seeds[2:]



def test_greedy_decoding_equals_transformers_generate():
    tokenizer, model = _tiny()
    prompts = [tokenizer.encode(text) for text in ("12+7=", "3*4=", "Q: 100-1=", "8+8=")]
    ours = generate(model, prompts, max_new_tokens=10, pad_id=tokenizer.pad_token_id,
                    stop_ids={tokenizer.eos_token_id}, batch_size=4)
    for prompt, completion in zip(prompts, ours):
        output = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert output[0, len(prompt):].tolist()[: len(completion)] == completion


def test_rows_sharing_a_prompt_sample_as_if_alone():
    tokenizer, model = _tiny()
    group = [tokenizer.encode("12+7=")] * 4 + [tokenizer.encode("Q: 3*4=")] * 4
    seeds = row_seeds(1, step=0, first_row=0, count=len(group))
    common = dict(max_new_tokens=8, pad_id=tokenizer.pad_token_id, stop_ids={tokenizer.eos_token_id}, temperature=1.0)
    together = generate(model, group, batch_size=len(group), seeds=seeds, **common)
    alone = [generate(model, [prompt], batch_size=1, seeds=[seed], **common)[0] for prompt, seed in zip(group, seeds)]
    assert together == alone
    assert len(set(map(tuple, together[:4]))) > 1  # one prompt, different draws


def test_the_prefill_runs_the_lm_head_at_each_distinct_prompts_last_token_alone():
    tokenizer, model = _tiny()
    prompts = [tokenizer.encode("12+7=")] * 3 + [tokenizer.encode("Q: 100-1=")]
    heads = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, output: heads.append(args[0].shape[:-1]))
    generate(model, prompts, max_new_tokens=3, pad_id=tokenizer.pad_token_id, stop_ids=set(), batch_size=4)
    assert heads[0] == (2,)  # two distinct prompts, one position each
    assert heads[1:] == [(2, 1)] * 2  # greedy copies of a prompt continue alike: they run as one row


def test_decoding_runs_each_distinct_unfinished_history_once():
    tokenizer, model = _tiny()
    prompts = [tokenizer.encode("12+7=")] * 4 + [tokenizer.encode("Q: 3*4=")] * 4
    rows_run = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, output: rows_run.append(args[0].shape[0]))
    stop_ids = {tokenizer.eos_token_id, 101, 122}  # tokens this untrained model draws, so that some rows stop early
    # A low temperature: rows of a prompt agree for a while, then part.
    seeds = row_seeds(2, step=0, first_row=0, count=8)
    completions = generate(model, prompts, max_new_tokens=8, pad_id=tokenizer.pad_token_id, stop_ids=stop_ids,
                           batch_size=8, temperature=0.1, seeds=seeds)
    owners = [0] * 4 + [1] * 4
    expected, alone = [], False
    for k in range(1, max(map(len, completions))):
        # After k tokens: a row per distinct unfinished history, until every row runs alone; from then
        # on nothing can merge or split, and rows that stop run on as padding.
        histories = {(owner, tuple(c[:k])) for owner, c in zip(owners, completions) if len(c) > k and c[k - 1] not in stop_ids}
        expected.append(len(prompts) if alone else len(histories))
        alone = alone or len(histories) == len(prompts)
    assert rows_run == [2] + expected
    assert min(map(len, completions)) < 8 and max(expected) < 8  # some rows stopped, and some shared a history
    assert len({tuple(c) for c in completions[:4]}) > 1  # and some parted
    decoded_alone = [generate(model, [prompt], max_new_tokens=8, pad_id=tokenizer.pad_token_id, stop_ids=stop_ids, batch_size=1,
                              temperature=0.1, seeds=[seed])[0] for prompt, seed in zip(prompts, seeds)]
    assert completions == decoded_alone


def test_decoding_writes_keys_and_values_in_place_not_into_a_new_copy_at_each_token():
    tokenizer, model = _tiny()
    prompts = [tokenizer.encode(text) for text in ("12+7=", "Q: 3*4=")]
    storages = []

    def record(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:  # a decode step (the prefill makes the cache)
            storages.append({layer.keys.untyped_storage().data_ptr() for layer in cache.layers})

    model.register_forward_pre_hook(record, with_kwargs=True)
    generate(model, prompts, max_new_tokens=6, pad_id=tokenizer.pad_token_id, stop_ids=set(), batch_size=2)
    assert len(storages) == 5 and all(s == storages[0] for s in storages)
    assert len(storages[0]) == model.config.num_hidden_layers


def test_a_split_history_copies_only_the_filled_positions_of_the_cache():
    layer = FilledInPlace(torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8), room=5)
    layer.update(torch.randn(2, 4, 1, 8), torch.randn(2, 4, 1, 8))
    keys, values = layer.keys.clone(), layer.values.clone()
    copied = []

    class RecordCopies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.index_select:
                copied.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    with RecordCopies():
        layer.batch_select_indices(torch.tensor([1, 1, 0]))
    assert copied == [(2, 4, 4, 8)] * 2  # the 4 filled positions, not the buffers' 8
    assert torch.equal(layer.keys, keys[[1, 1, 0]]) and torch.equal(layer.values, values[[1, 1, 0]])
    new_keys = torch.randn(3, 4, 1, 8)
    layer.update(new_keys, torch.randn(3, 4, 1, 8))  # the room is still there, after the copied rows
    assert layer.key_buffer.shape == (3, 4, 8, 8) and torch.equal(layer.keys[..., 4:, :], new_keys)
    assert torch.equal(layer.keys[..., :4, :], keys[[1, 1, 0]])


def test_decoding_runs_in_inference_mode_and_each_step_attends_without_sdpa(monkeypatch):
    tokenizer, model = _tiny()
    prompts = [tokenizer.encode(text) for text in ("12+7=", "Q: 3*4=")]
    modes, sdpa_calls = [], []
    model.register_forward_pre_hook(lambda module, args: modes.append(torch.is_inference_mode_enabled()))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: sdpa_calls.append(1) or sdpa(*a, **k))
    greedy = generate(model, prompts, max_new_tokens=4, pad_id=tokenizer.pad_token_id, stop_ids=set(), batch_size=2)
    assert modes == [True] * 4
    assert len(sdpa_calls) == model.config.num_hidden_layers  # the prefill's; each decode step's is two matmuls and a softmax
    for prompt, completion in zip(prompts, greedy):
        output = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert output[0, len(prompt):].tolist() == completion

"""Every function of `batching.kv_cache` run against transformers' own caches and models (the project pins one
transformers version, so this is both the lowest and the newest it supports): the prefix cache broadcast
without copies, the prefix kept alone within `prefix_only`, and the server's row edits."""

import torch
from tiny_models import llama, mistral
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from loratune.batching import keep_rows, padding_first, prefix_cache, stack_rows

PREFIX = torch.arange(3, 13)[None, :]  # ten tokens
ROWS = torch.tensor([[20, 21, 22], [30, 31, 32], [40, 41, 42]])


def joined(rows):
    return torch.cat([PREFIX.expand(rows.shape[0], -1), rows], dim=1)


@torch.no_grad()
def test_the_prefix_runs_once_and_its_cache_is_a_view_per_row():
    model = llama()
    hidden, cache = prefix_cache(model.model, PREFIX, rows=3)
    torch.testing.assert_close(hidden, model.model(input_ids=PREFIX).last_hidden_state)
    for layer in cache.layers:
        assert type(layer) is DynamicLayer and layer.keys.shape[:1] == (3,) and layer.keys.shape[2] == 10
        assert layer.keys.stride(0) == 0 and layer.values.stride(0) == 0  # one copy serves every row
    assert cache.get_seq_length() == 10
    assert prefix_cache(model.model, PREFIX[:, :0], rows=3)[0] is None


@torch.no_grad()
def test_within_prefix_only_the_rows_run_against_the_prefix_and_the_cache_keeps_it_alone():
    model = llama()
    _, cache = prefix_cache(model.model, PREFIX, rows=3)
    positions = torch.arange(10, 13).expand(3, -1)
    with cache.prefix_only():
        rest = model.model(input_ids=ROWS, position_ids=positions, past_key_values=cache, use_cache=True)
    assert all(layer.keys.shape[2] == 10 for layer in cache.layers)  # the rows' keys were not stored
    whole = model.model(input_ids=joined(ROWS)).last_hidden_state[:, 10:]
    torch.testing.assert_close(rest.last_hidden_state, whole, rtol=1e-5, atol=1e-6)
    model.model(input_ids=ROWS, position_ids=positions, past_key_values=cache, use_cache=True)
    assert all(layer.keys.shape[2] == 13 for layer in cache.layers)  # outside the block the cache grows again


@torch.no_grad()
def test_sliding_window_layers_keep_storing_within_prefix_only():
    model = mistral(sliding_window=8)
    _, cache = prefix_cache(model.model, PREFIX, rows=3)
    assert all(type(layer) is DynamicSlidingWindowLayer for layer in cache.layers)
    positions = torch.arange(10, 13).expand(3, -1)
    with cache.prefix_only():
        rest = model.model(input_ids=ROWS, position_ids=positions, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 13
    whole = model.model(input_ids=joined(ROWS)).last_hidden_state[:, 10:]
    torch.testing.assert_close(rest.last_hidden_state, whole, rtol=1e-5, atol=1e-6)


def random_cache(rows, columns, seed):
    generator = torch.Generator().manual_seed(seed)
    return DynamicCache(ddp_cache_data=[(torch.randn(rows, 2, columns, 4, generator=generator),
                                         torch.randn(rows, 2, columns, 4, generator=generator)) for _ in range(2)])


def test_stacked_rows_are_left_padded_and_kept_rows_lose_the_padding_no_row_needs():
    shared, new = random_cache(2, 5, seed=0), random_cache(1, 3, seed=1)
    both = stack_rows(shared, new, 0, 2)
    assert isinstance(both, DynamicCache) and both.get_seq_length() == 5
    for whole, a, b in zip(both.layers, shared.layers, new.layers):
        assert torch.equal(whole.keys[:2], a.keys) and torch.equal(whole.values[2, :, 2:], b.values[0])
        assert not whole.keys[2, :, :2].any()
    kept = keep_rows(both, torch.tensor([2]), trim=2)
    for layer, b in zip(kept.layers, new.layers):
        assert torch.equal(layer.keys, b.keys) and torch.equal(layer.values, b.values)
    grown = stack_rows(new, shared, 2, 0)  # a longer newcomer pads the rows already there
    assert grown.get_seq_length() == 5 and not grown.layers[0].keys[0, :, :2].any()


@torch.no_grad()
def test_a_decode_step_on_stacked_rows_equals_each_row_alone():
    model = llama()
    prompts = [torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[11, 12, 13]])]
    caches, alone = [], []
    for ids in prompts:
        cache = DynamicCache()
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        caches.append(cache)
        alone.append(model(input_ids=torch.tensor([[4]]), past_key_values=cache, use_cache=True).logits[0, -1])
        cache.crop(-1)
    both = stack_rows(caches[0], caches[1], 0, 2)
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    logits = model(input_ids=torch.tensor([[4], [4]]), attention_mask=mask, position_ids=torch.tensor([[5], [3]]),
                   past_key_values=both, use_cache=True).logits[:, -1]
    torch.testing.assert_close(logits, torch.stack(alone), rtol=1e-5, atol=1e-5)


def test_padding_moves_from_after_the_prefix_to_the_front_of_each_row():
    cache = random_cache(3, 7, seed=2)  # a prefix of 2 columns, then rows with 0, 1 and 3 columns of padding
    pads = torch.tensor([0, 1, 3])
    moved = padding_first(cache, 2, pads)
    for before, after in zip(cache.layers, moved.layers):
        for row, pad in enumerate(pads.tolist()):
            for old, new in ((before.keys, after.keys), (before.values, after.values)):
                assert torch.equal(new[row, :, pad:pad + 2], old[row, :, :2])  # the prefix, after the padding
                assert torch.equal(new[row, :, pad + 2:], old[row, :, 2 + pad:])  # the row's own tokens, last
                assert torch.equal(new[row, :, :pad], old[row, :, 2:2 + pad])  # the padding columns, first

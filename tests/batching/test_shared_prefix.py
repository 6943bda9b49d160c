"""Shared-prefix batches against the plain padded batch: the same loss and adapter gradients, the prefix run
once and the remainders packed where a mask of ours means the same."""

import contextlib
import sys
import unittest.mock

import pytest
import torch
from batching_tools import PAD, adapted, assert_same, examples, gpt2_without_dropout, loss_and_grads, with_attention
from storage_refs import held, storage_ref
from tiny_models import bloom, llama, mistral

import loratune.batching.shared_prefix as shared_prefix
from loratune.batching import BatchMaker, collate
from loratune.train.step import batch_loss, causal_lm_loss

CPU = torch.device("cpu")


@pytest.fixture
def against_the_cache(monkeypatch):
    """The prefix's forward, then the remainders against its cache (what batches beyond one row's cap run)."""
    monkeypatch.setattr(shared_prefix, "ONE_ROW_TOKENS", 0)


def shared(batch_examples):
    """The shared-prefix batch of `batch_examples` and its prefix length, as training builds them."""
    return BatchMaker("shared_prefix", "causal-lm", PAD).make(batch_examples, CPU)


@pytest.mark.parametrize("builder", [llama, gpt2_without_dropout, mistral, bloom],
                         ids=["llama", "gpt2", "mistral-window-16", "bloom-alibi"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("answer_only", [True, False], ids=["answer", "every-token"])
@pytest.mark.parametrize("one_row", [512, 0], ids=["one-row", "prefix-cache"])
def test_a_shared_prefix_batch_gives_the_plain_batchs_loss_and_gradients(builder, attention, answer_only, one_row,
                                                                         monkeypatch):
    monkeypatch.setattr(shared_prefix, "ONE_ROW_TOKENS", one_row)
    model = adapted(with_attention(builder, attention))
    batch, prefix = shared(examples([24, 15, 20, 12], prefix=range(5, 15), answer_only=answer_only))
    assert prefix >= 10  # the 10 shared tokens (a random next token may match too)
    assert_same(loss_and_grads(model, batch, prefix), loss_and_grads(model, batch))


def body_input_shapes(model, batch, prefix):
    """The input_ids shape of each body forward one shared-prefix loss makes."""
    shapes = []
    body = getattr(model, model.base_model_prefix)  # the body the loss runs (`split_lm`)
    hook = body.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                          with_kwargs=True)
    try:
        causal_lm_loss(model, batch, prefix=prefix)
    finally:
        hook.remove()
    return shapes


def test_a_batch_within_the_cap_runs_as_one_row_of_one_forward(monkeypatch):
    model = adapted(with_attention(llama, "eager"))
    batch, prefix = shared(examples([24, 15, 20, 12], prefix=range(5, 15)))
    # the prefix once, then every row's remainder but its last token, which no label reads (`read_part`)
    tokens = int(batch["attention_mask"].sum()) - 3 * prefix - 4
    assert body_input_shapes(model, batch, prefix) == [(1, tokens)]
    monkeypatch.setattr(shared_prefix, "ONE_ROW_TOKENS", tokens - 1)
    first, rest = body_input_shapes(model, batch, prefix)  # one over the cap: the prefix, then against its cache
    assert first == (1, prefix) and rest[0] < 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_sdpa_on_the_cpu_keeps_one_mask_for_every_layer(dtype):
    """torch's CPU kernel turns a boolean mask into a float one per call and saves each for the backward pass;
    the one row's block masks are float there, in the queries' dtype, so every layer saves the same two
    tensors (the prefix's block and the packed rows', each repeated for the query heads sharing a key head)."""
    model = adapted(with_attention(llama, "sdpa"))
    batch, prefix = shared(examples([24, 15, 20, 12], prefix=range(5, 15)))
    masks = {}

    def pack(t):
        is_mask = t.dim() == 4 and t.shape[1] == 1 and t.is_floating_point() and (t == torch.finfo(t.dtype).min).any()
        if is_mask:  # (rows, 1, queries, keys), the dtype's minimum where not attended: broadcast over the heads
            masks.setdefault(t.untyped_storage().data_ptr(), set()).add((t.dtype, t.shape[-2:]))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        causal_lm_loss(model, batch, prefix=prefix)
    assert len(masks) == 2 and all(len(seen) == 1 for seen in masks.values())  # one shape each: shared by layers
    assert {dt for seen in masks.values() for dt, _ in seen} == {dtype}
    config = model.config
    groups = config.num_attention_heads // config.num_key_value_heads  # each folded into its key/value head's rows
    assert groups > 1 and (dtype, (groups * prefix, prefix)) in set.union(*masks.values())


@pytest.mark.parametrize("builder", [llama, gpt2_without_dropout], ids=["llama", "gpt2"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("one_row", [512, 0], ids=["one-row", "over-the-cap"])
def test_under_gradient_checkpointing_a_batch_runs_as_one_row_or_padded(builder, attention, one_row, monkeypatch):
    """A checkpointed layer keeps no cache: a batch that fits runs as one row (its attention over the full row,
    which the layer's recomputation repeats), one that does not as the padded batch."""
    monkeypatch.setattr(shared_prefix, "ONE_ROW_TOKENS", one_row)
    model = adapted(with_attention(builder, attention))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch, prefix = shared(examples([24, 15, 20, 12], prefix=range(5, 15)))
    tokens = int(batch["attention_mask"].sum()) - 3 * prefix - 4  # (each row's last token is read by no label)
    expected = [(1, tokens)] if one_row else [(4, batch["input_ids"].shape[1] - 1)]
    assert body_input_shapes(model, batch, prefix) == expected
    attention_module = next(m for name, m in model.named_modules() if name.endswith(("self_attn", "attn")))
    calls = []
    hook = attention_module.register_forward_pre_hook(lambda m, a: calls.append(model.config._attn_implementation))
    try:
        shared_result = loss_and_grads(model, batch, prefix)
    finally:
        hook.remove()
    assert calls == [attention, attention]  # the forward, then its recomputation in the backward pass
    with torch.no_grad():  # still checkpointed for transformers (training mode), so still no cache
        no_grad_loss = causal_lm_loss(model, batch, prefix=prefix)[0]
    model.gradient_checkpointing_disable()
    assert_same(shared_result, loss_and_grads(model, batch))
    torch.testing.assert_close(no_grad_loss, shared_result[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("builder", [llama, gpt2_without_dropout], ids=["llama", "gpt2"])
def test_a_row_longer_than_the_models_positions_runs_against_the_cache(builder):
    """Some families size buffers by their positions (GPT-2's causal mask in older transformers releases):
    the one row never exceeds them, though each row's own positions restart after the prefix."""
    batch, prefix = shared(examples([24, 15, 20, 12], prefix=range(5, 15)))
    tokens = int(batch["attention_mask"].sum()) - 3 * prefix - 4  # (each row's last token is read by no label)
    model = adapted(with_attention(builder, "eager", max_position_embeddings=tokens - 1))
    first, rest = body_input_shapes(model, batch, prefix)
    assert first == (1, prefix) and rest[0] < 4
    assert_same(loss_and_grads(model, batch, prefix), loss_and_grads(model, batch))
    model = adapted(with_attention(builder, "eager", max_position_embeddings=tokens))
    assert body_input_shapes(model, batch, prefix) == [(1, tokens)]


@pytest.mark.parametrize("builder", [llama, gpt2_without_dropout], ids=["llama", "gpt2"])
def test_under_eager_attention_the_one_row_attends_block_by_block_and_restores_the_model(builder, monkeypatch):
    """Block by block: the attention weights of the prefix and of each packed row, never the row's square."""
    model = adapted(with_attention(builder, "eager"))
    lengths = [24, 15, 20, 12]
    batch, prefix = shared(examples(lengths, prefix=range(5, 15)))
    family = sys.modules[type(model.base_model).__module__]
    keys, eager = [], family.eager_attention_forward

    def spy(module, query, key, *args, **kwargs):  # the key length of every attention block
        keys.append(key.shape[-2])
        return eager(module, query, key, *args, **kwargs)

    monkeypatch.setattr(family, "eager_attention_forward", spy)
    seen = []
    attention = next(m for name, m in model.named_modules() if name.endswith(("self_attn", "attn")))
    hook = attention.register_forward_pre_hook(lambda m, a: seen.append(model.config._attn_implementation))
    try:
        shared_result = loss_and_grads(model, batch, prefix)
    finally:
        hook.remove()
    assert seen == [shared_prefix.BLOCK_ATTENTION]
    assert max(keys) == max(lengths) - 1 < sum(lengths) - 3 * prefix  # never the one row's (nor a last token)
    assert model.config._attn_implementation == "eager" and shared_prefix._BLOCKS.get() is None
    assert_same(shared_result, loss_and_grads(model, batch))


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_one_row_blocks_over_several_key_value_heads_give_the_plain_batchs_loss_and_gradients(attention):
    """Four query heads on two key/value heads: each query head must read its own key/value head (SDPA's blocks
    fold the query heads of a key/value head into its rows)."""
    model = adapted(with_attention(llama, attention, num_attention_heads=4, num_key_value_heads=2))
    batch, prefix = shared(examples([24, 15, 20, 12], prefix=range(5, 15)))
    assert_same(loss_and_grads(model, batch, prefix), loss_and_grads(model, batch))


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_sdpa_blocks_keep_neither_the_packed_keys_and_values_nor_the_output_projections_input(attention, monkeypatch):
    """Under SDPA the packed rows' keys and values (copies of the prefix's and the row's own) and the attention
    output the output projection's LoRA saves are kept as recipes inside the training loss: none outlives the
    forward (without the recipes, or under eager attention, which keeps its own copies, all do), and the loss
    and gradients are bit for bit the same."""
    model = adapted(with_attention(llama, attention, num_attention_heads=4, num_key_value_heads=2))
    batch, prefix = shared(examples([24, 15, 20, 12], prefix=range(5, 15)))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    kept = []

    def watched_sdpa(query, key, value, **kwargs):
        if key.shape[0] > 1:  # the packed rows' block
            kept.extend([storage_ref(key), storage_ref(value)])
        return sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(shared_prefix.F, "scaled_dot_product_attention", watched_sdpa)
    for layer in model.model.layers:
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: kept.append(storage_ref(args[0])))

    def run():
        kept.clear()
        loss, _, _ = batch_loss(model, batch, "causal-lm", prefix=prefix)
        alive = held(kept)  # while the graph is
        return (loss, torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])), alive

    recomputed, alive = run()
    with unittest.mock.patch("loratune.train.step.recomputing_saves", contextlib.nullcontext):
        kept_all, alive_without = run()
    layers = len(model.model.layers)
    assert alive_without == (3 if attention == "sdpa" else 1) * layers
    assert alive == (0 if attention == "sdpa" else layers)
    assert torch.equal(recomputed[0], kept_all[0])
    assert all(torch.equal(g, r) for g, r in zip(recomputed[1], kept_all[1]))


def test_a_failing_forward_leaves_the_model_as_it_was():
    model = adapted(with_attention(llama, "eager"))
    batch, prefix = shared(examples([24, 15, 20, 12], prefix=range(5, 15)))
    hook = model.model.layers[0].register_forward_pre_hook(lambda m, a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        causal_lm_loss(model, batch, prefix=prefix)
    hook.remove()
    assert model.config._attn_implementation == "eager" and shared_prefix._BLOCKS.get() is None
    assert_same(loss_and_grads(model, batch, prefix), loss_and_grads(model, batch))


def test_gpt2_upcasting_its_scores_attends_over_the_full_row():
    model = adapted(with_attention(gpt2_without_dropout, "eager"))
    model.config.reorder_and_upcast_attn = True
    for block in model.transformer.h:
        block.attn.reorder_and_upcast_attn = True
    batch, prefix = shared(examples([24, 15, 20, 12], prefix=range(5, 15)))
    seen = []
    hook = model.transformer.h[0].attn.register_forward_pre_hook(
        lambda m, a: seen.append(model.config._attn_implementation))
    try:
        assert_same(loss_and_grads(model, batch, prefix), loss_and_grads(model, batch))
    finally:
        hook.remove()
    assert seen == ["eager", "eager"]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_one_row_within_a_sliding_window_gives_the_plain_batchs_loss_and_gradients(attention):
    model = adapted(with_attention(mistral, attention))  # window 16: the one row (8 + 3 + 2 tokens) fits
    batch, prefix = shared(examples([12, 11], prefix=range(5, 13)))
    assert body_input_shapes(model, batch, prefix) == [(1, 21 - prefix)]  # (no row's last token: `read_part`)
    assert_same(loss_and_grads(model, batch, prefix), loss_and_grads(model, batch))


def test_the_rows_remainders_after_the_prefix_run_packed_into_fewer_rows(against_the_cache):
    model = adapted(with_attention(llama, "eager"))
    batch, prefix = shared(examples([24, 15, 20, 12], prefix=range(5, 15)))
    shapes = body_input_shapes(model, batch, prefix)
    remainders = sorted(n - prefix - 1 for n in (24, 15, 20, 12))  # (no row's last token: `read_part`)
    assert shapes[0] == (1, prefix)  # the prefix, once
    rows, width = shapes[1]
    assert width == remainders[-1] and rows < 4  # packed into fewer rows than the batch has
    assert rows * width - sum(remainders) < width  # less padding than one row


@pytest.mark.parametrize("builder, packs", [(mistral, False), (bloom, False), (llama, True)],
                         ids=["window-shorter-than-rows", "alibi", "rope"])
def test_remainders_run_padded_where_a_packed_mask_would_mean_something_else(builder, packs, against_the_cache):
    model = adapted(with_attention(builder, "eager"))
    batch, prefix = shared(examples([24, 15, 20, 12], prefix=range(5, 15)))  # rows reach 24 > 16
    rows = body_input_shapes(model, batch, prefix)[1][0]
    assert (rows < 4) == packs


def test_with_dropout_the_prefix_draws_one_mask_and_still_trains():
    model = adapted(llama, dropout=0.5)
    batch, prefix = shared(examples([24, 15, 20, 12], prefix=range(5, 15)))
    torch.manual_seed(0)
    loss, _, grads = loss_and_grads(model, batch, prefix)
    assert prefix >= 10 and torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


def test_a_padded_batch_of_the_same_examples_is_the_shared_batch_without_a_prefix():
    data = examples([24, 15, 20, 12], prefix=range(5, 15))
    batch, prefix = shared(data)
    plain, none = BatchMaker("padded", "causal-lm", PAD).make(data, CPU)
    assert none == 0 and prefix >= 10
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[key], plain[key]) and torch.equal(plain[key], collate(data, PAD, "causal-lm")[key])

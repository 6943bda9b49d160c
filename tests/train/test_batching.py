"""Packed and shared-prefix batches against the plain padded batch: the same loss and adapter gradients."""

import pytest
import torch
from tiny_models import bloom, gpt2, llama, mistral

from loratune.core.adapters import add_adapter
from loratune.core.errors import ConfigError
from loratune.core.lora_config import LoraConfig
from loratune.data.collate import collate
from loratune.data.packing import grouped_order, pack_batch
from loratune.tasks import IGNORE_INDEX
from loratune.train.batches import BatchMaker, BatchOrder, order_keys
from loratune.train.run_config import validate_config
from loratune.train.shared_prefix import batch_prefix_length, common_prefix_length
from loratune.train.step import causal_lm_loss

PAD = 0


def gpt2_without_dropout():
    return gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def adapted(builder, dropout=0.0):
    model = builder()
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                  init_lora_weights=False))
    model.train()
    return model


def examples(lengths, prefix=(), seed=0, answer_only=True):
    """Examples of the given total lengths, all starting with `prefix`; labels on the last third (or all)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = list(prefix) + torch.randint(3, 60, (n - len(prefix),), generator=generator).tolist()
        start = 2 * n // 3 if answer_only else 0
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * start + ids[start:]})
    return out


def loss_and_grads(model, batch, prefix=0):
    params = [p for p in model.parameters() if p.requires_grad]
    loss, _, weight = causal_lm_loss(model, batch, prefix=prefix)
    return loss, weight, torch.autograd.grad(loss, params)


def assert_same(got, expected):
    (loss, weight, grads), (loss_ref, weight_ref, grads_ref) = got, expected
    assert weight == weight_ref
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert any(r.abs().max() > 0 for r in grads_ref)


@pytest.mark.parametrize("builder", [llama, gpt2_without_dropout], ids=["llama", "gpt2"])
@pytest.mark.parametrize("answer_only", [True, False], ids=["answer", "every-token"])
def test_a_packed_batch_gives_the_padded_batchs_loss_and_gradients(builder, answer_only):
    model = adapted(builder)
    batch = examples([20, 7, 12, 5, 9, 3], answer_only=answer_only)
    packed = pack_batch(batch, PAD)
    assert packed["input_ids"].shape == (3, 20)  # 56 tokens in 3 rows of the longest, not 6 rows of 20
    assert int(packed["attention_mask"].sum()) == 56
    assert_same(loss_and_grads(model, packed), loss_and_grads(model, collate(batch, PAD, "causal-lm")))


def with_attention(builder, implementation, **overrides):
    def build():
        model = builder(**overrides)
        model.set_attn_implementation(implementation)
        return model
    return build


@pytest.mark.parametrize("builder", [llama, gpt2_without_dropout, mistral, bloom],
                         ids=["llama", "gpt2", "mistral-window-16", "bloom-alibi"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("answer_only", [True, False], ids=["answer", "every-token"])
def test_a_shared_prefix_batch_gives_the_plain_batchs_loss_and_gradients(builder, attention, answer_only):
    model = adapted(with_attention(builder, attention))
    batch = collate(examples([24, 15, 20, 12], prefix=range(5, 15), answer_only=answer_only), PAD, "causal-lm")
    prefix = batch_prefix_length(batch)
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


def test_the_rows_remainders_after_the_prefix_run_packed_into_fewer_rows():
    model = adapted(with_attention(llama, "eager"))
    batch = collate(examples([24, 15, 20, 12], prefix=range(5, 15)), PAD, "causal-lm")
    prefix = batch_prefix_length(batch)
    shapes = body_input_shapes(model, batch, prefix)
    remainders = sorted(n - prefix for n in (24, 15, 20, 12))
    assert shapes[0] == (1, prefix)  # the prefix, once
    rows, width = shapes[1]
    assert width == remainders[-1] and rows < 4  # packed into fewer rows than the batch has
    assert rows * width - sum(remainders) < width  # less padding than one row


@pytest.mark.parametrize("builder, packs", [(mistral, False), (bloom, False), (llama, True)],
                         ids=["window-shorter-than-rows", "alibi", "rope"])
def test_remainders_run_padded_where_a_packed_mask_would_mean_something_else(builder, packs):
    model = adapted(with_attention(builder, "eager"))
    batch = collate(examples([24, 15, 20, 12], prefix=range(5, 15)), PAD, "causal-lm")  # rows reach 24 > 16
    prefix = batch_prefix_length(batch)
    rows = body_input_shapes(model, batch, prefix)[1][0]
    assert (rows < 4) == packs


def test_with_dropout_the_prefix_draws_one_mask_and_still_trains():
    model = adapted(llama, dropout=0.5)
    batch = collate(examples([24, 15, 20, 12], prefix=range(5, 15)), PAD, "causal-lm")
    torch.manual_seed(0)
    loss, _, grads = loss_and_grads(model, batch, batch_prefix_length(batch))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


def test_prefix_lengths_leave_every_row_a_token_of_its_own_and_skip_short_or_packed_batches():
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 5]]) == 1
    assert common_prefix_length([[1, 2, 3]]) == 0
    short = collate(examples([12, 10], prefix=range(5, 9)), PAD, "causal-lm")
    assert batch_prefix_length(short) == 0  # 4 shared tokens: not worth a second forward call
    packed = pack_batch(examples([24, 15], prefix=range(5, 20)), PAD)
    assert batch_prefix_length(packed) == 0
    maker = BatchMaker("shared_prefix", "causal-lm", PAD, checkpointing=True)
    batch = examples([24, 17, 20], prefix=range(5, 20))
    assert maker.make(batch, torch.device("cpu"))[1] == 0  # a checkpointed layer would drop the cache
    assert maker.make(batch, torch.device("cpu"), training=False)[1] >= 15


def test_length_grouped_order_keeps_every_example_once_and_groups_similar_lengths():
    lengths = [5, 50, 7, 48, 6, 49, 8, 47]
    keys = order_keys([{"input_ids": [7] * n} for n in lengths], length_grouped=True, prefix_grouped=False)
    order = grouped_order(list(range(8)), keys, batch_size=2, group=2)
    assert sorted(order) == list(range(8))
    batches = [sorted(lengths[i] for i in order[k:k + 2]) for k in range(0, 8, 2)]
    assert batches == [[48, 50], [5, 7], [47, 49], [6, 8]]


def test_prefix_grouped_batches_hold_one_template_and_compute_its_prefix_once():
    templates = [list(range(5, 25)), list(range(30, 50))]  # two 20-token prompt templates, alternating
    data = [examples([20 + 3 + i % 5], prefix=templates[i % 2], seed=i)[0] for i in range(32)]
    plain = BatchOrder(32, 4, seed=0)
    grouped = BatchOrder(32, 4, seed=0, keys=order_keys(data, length_grouped=False, prefix_grouped=True))
    assert sorted(i for k in range(8) for i in grouped.batch(k)) == list(range(32))
    mixed = sum(len({i % 2 for i in plain.batch(k)}) > 1 for k in range(8))
    assert mixed >= 4  # a shuffled order mixes the templates in most batches
    for k in range(8):
        rows = grouped.batch(k)
        assert len({i % 2 for i in rows}) == 1
        assert batch_prefix_length(collate([data[i] for i in rows], PAD, "causal-lm")) >= 20


def test_batches_are_grouped_one_way(run_config):
    with pytest.raises(ConfigError, match="length_grouped and train.prefix_grouped"):
        validate_config(run_config(train={"length_grouped": True, "prefix_grouped": True}), "run.yaml")

"""The training loss (train/step.py): the chunked output-head loss against the whole cross-entropy, and the
tokens no label reads left out with the same loss and gradients."""

import unittest.mock

import pytest
import torch
import torch.nn.functional as F
from tiny_models import gpt2, llama
from torch import nn

import loratune.train.step as step
from loratune.batching import BatchMaker
from loratune.core.adapters import add_adapter
from loratune.core.lora_config import LoraConfig
from loratune.tasks import IGNORE_INDEX as X
from loratune.train.step import batch_loss, chunked_head_loss, read_part, read_positions


@pytest.mark.parametrize("vocab_block", [7, 2048], ids=["vocabulary-in-blocks", "one-block"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trained-head", "frozen-head"])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_head_loss_equals_the_whole_cross_entropy(chunk, frozen, bias, vocab_block, monkeypatch):
    monkeypatch.setattr(step, "VOCAB_BLOCK", vocab_block)  # 50 logits: 8 blocks, the last one short
    generator = torch.Generator().manual_seed(0)
    head = nn.Linear(16, 50, bias=bias).requires_grad_(not frozen)
    hidden = torch.randn(7, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (7,), generator=generator)
    wrt = [hidden] if frozen else [hidden, head.weight]
    expected = F.cross_entropy(head(hidden), targets, reduction="sum")
    expected_grads = torch.autograd.grad(expected * 0.5, wrt)

    loss = chunked_head_loss(head, hidden, targets, chunk)
    assert loss.dtype == torch.float32
    assert (type(loss.grad_fn).__name__ == "_FrozenHeadLossBackward") == frozen  # a frozen head skips recompute
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(loss * 0.5, wrt), expected_grads):  # 0.5: backward scales
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(chunked_head_loss(head, hidden, targets, chunk), expected, rtol=1e-5, atol=1e-5)


def test_frozen_head_loss_under_bf16_autocast_is_close_to_fp32():
    generator = torch.Generator().manual_seed(0)
    head = nn.Linear(16, 50).requires_grad_(False)
    hidden = torch.randn(9, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (9,), generator=generator)
    expected = F.cross_entropy(head(hidden), targets, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected, [hidden])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_head_loss(head, hidden, targets, 4)
    (grad,) = torch.autograd.grad(loss, [hidden])
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad, expected_grad, rtol=3e-2, atol=3e-2)


def test_a_chunked_loss_over_no_labelled_tokens_still_backpropagates():
    head = nn.Linear(16, 50)
    hidden = torch.randn(0, 16, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.long)
    F.cross_entropy(head(hidden), targets, reduction="sum").backward()  # the unchunked loss can
    chunked_head_loss(head, hidden, targets, 3).backward()
    assert head.weight.grad.abs().max() == 0


def test_read_part_drops_each_rows_tokens_after_its_last_read_position():
    ids = torch.arange(1, 25).view(4, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    labels = torch.tensor([[X, X, X, X, 5, 6],  # read at 3 and 4: token 5 is read by nothing
                           [X, X, 9, X, X, X],  # read at 1 only
                           [X, X, X, X, X, X],  # no label: kept whole (label scoring reads its prompt's end)
                           [X, 20, X, X, X, X]])  # read at 0
    trimmed = read_part({"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert trimmed["input_ids"].tolist() == ids.tolist()  # the unlabelled row keeps every column
    assert trimmed["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                                                  [1, 0, 0, 0, 0, 0]]
    assert trimmed["labels"] is labels  # the loss reads them as they were
    labelled = {"input_ids": ids[[0, 1, 3]], "attention_mask": mask[[0, 1, 3]], "labels": labels[[0, 1, 3]]}
    assert read_part(labelled)["input_ids"].tolist() == ids[[0, 1, 3], :5].tolist()  # no row needs column 5
    assert read_part(labelled, prefix=2)["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0],
                                                                      [1, 1, 1, 0, 0]]  # prefix + 1 at least
    packed = {"input_ids": ids[:1], "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]]),
              "labels": torch.tensor([[X, X, 3, X, 5, X]])}
    assert read_part(packed)["position_ids"].tolist() == [[0, 1, 2, 0]]  # columns only: no mask to trim


def _examples(lengths, prefix=()):
    generator = torch.Generator().manual_seed(0)
    out = []
    for n in lengths:
        tokens = list(prefix) + torch.randint(3, 60, (n - len(prefix),), generator=generator).tolist()
        out.append({"input_ids": tokens, "labels": [X] * (n - 3) + tokens[-3:-1] + [X]})  # the last token unread
    return out


@pytest.mark.parametrize("batching", ["padded", "packed", "shared_prefix"])
@pytest.mark.parametrize("builder", [llama, gpt2], ids=["llama", "gpt2"])
def test_leaving_out_what_no_label_reads_keeps_the_loss_and_gradients(builder, batching):
    model = builder()
    model.eval()  # (GPT-2's dropout)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    params = [p for p in model.parameters() if p.requires_grad]
    batch, prefix = BatchMaker(batching, "causal-lm", 0).make(_examples([24, 15, 20], prefix=range(5, 15)),
                                                             torch.device("cpu"))
    assert (prefix > 0) == (batching == "shared_prefix")
    shapes = []
    body = getattr(model, model.base_model_prefix)
    body.register_forward_pre_hook(lambda m, a, kw: shapes.append(kw["input_ids"].shape[-1]), with_kwargs=True)

    def loss_and_grads():
        loss, _, weight = batch_loss(model, batch, "causal-lm", prefix=prefix)
        return (loss, weight, *torch.autograd.grad(loss, params))

    trimmed = loss_and_grads()
    with unittest.mock.patch.object(step, "read_part", lambda batch, *rest: batch):
        whole = loss_and_grads()
    assert shapes[0] < shapes[-1]  # fewer tokens computed
    assert trimmed[1] == whole[1] == 6
    for got, want in zip(trimmed, whole):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_position_the_caller_reads_is_kept_and_computed():
    """Label scoring reads each prompt's last position, whatever the labels say."""
    ids = torch.arange(1, 13).view(2, 6)
    labels = torch.tensor([[X, X, 3, 4, X, X], [X, X, X, X, 11, X]])  # read at 1, 2 and at 3
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert read_part(batch)["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert read_part(batch, also_read=[4, 0])["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert read_positions(batch, also_read=[4, 0]).tolist() == [[False, True, True, False, True, False],
                                                                 [True, False, False, True, False, False]]


@pytest.mark.parametrize("vocab_block", [7, 2048])
def test_a_block_of_impossible_tokens_leaves_the_frozen_head_loss_finite(vocab_block, monkeypatch):
    monkeypatch.setattr(step, "VOCAB_BLOCK", vocab_block)
    generator = torch.Generator().manual_seed(0)
    head = nn.Linear(16, 50).requires_grad_(False)
    head.bias[:10] = -torch.inf  # the first vocabulary block(s) masked out
    hidden = torch.randn(5, 16, generator=generator, requires_grad=True)
    targets = torch.randint(10, 50, (5,), generator=generator)
    expected = F.cross_entropy(head(hidden), targets, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected, [hidden])
    loss = chunked_head_loss(head, hidden, targets, 1000)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(loss, [hidden])[0], expected_grad, rtol=1e-5, atol=1e-6)

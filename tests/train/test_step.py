"""The chunked output-head loss (train/step.py), against the whole cross-entropy."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loratune.train.step import chunked_head_loss


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trained-head", "frozen-head"])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_head_loss_equals_the_whole_cross_entropy(chunk, frozen, bias):
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

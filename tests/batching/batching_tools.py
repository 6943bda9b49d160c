"""Examples, tiny adapted models and loss-and-gradient comparisons shared by the batching tests."""

import torch

from loratune.core.adapters import add_adapter
from loratune.core.lora_config import LoraConfig
from loratune.tasks import IGNORE_INDEX
from loratune.train.step import batch_loss

PAD = 0


def gpt2_without_dropout(**overrides):
    from tiny_models import gpt2

    return gpt2(**{"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **overrides})


def adapted(builder, dropout=0.0):
    model = builder()
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                  init_lora_weights=False))
    model.train()
    return model


ROW_POSITIONS = 128  # room for a test batch's prefix and every remainder in one row (`max_positions` caps it)


def with_attention(builder, implementation, **overrides):
    def build():
        model = builder(**{"max_position_embeddings": ROW_POSITIONS, **overrides})
        model.set_attn_implementation(implementation)
        return model
    return build


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
    """Through the training loss (so with its recipes for saved activations, `loratune.recompute`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss, _, weight = batch_loss(model, batch, "causal-lm", prefix=prefix)
    return loss, weight, torch.autograd.grad(loss, params)


def assert_same(got, expected):
    (loss, weight, grads), (loss_ref, weight_ref, grads_ref) = got, expected
    assert weight == weight_ref
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert any(r.abs().max() > 0 for r in grads_ref)

"""The last decoder layer's MLP run only where the loss reads (batching/read_rows.py): the same loss and adapter
gradients as the whole layer, on fewer rows."""

import copy

import pytest
import torch
from batching_tools import PAD, adapted, assert_same, examples, gpt2_without_dropout, loss_and_grads, with_attention
from tiny_models import llama

from loratune.batching import BatchMaker
from loratune.batching.read_rows import compute_read_rows_only, last_mlp, only_read_rows
from loratune.tasks import IGNORE_INDEX


def rows_into_last_mlp(model, batch, prefix):
    """The number of positions the last MLP computes in one training loss, and that loss's (loss, weight, grads)."""
    seen = []
    hook = last_mlp(getattr(model, model.base_model_prefix)).register_forward_pre_hook(
        lambda m, args: seen.append(args[0].shape[:-1].numel()))
    try:
        result = loss_and_grads(model, batch, prefix)
    finally:
        hook.remove()
    return seen, result


@pytest.mark.parametrize("batching", ["padded", "packed", "shared_prefix"])
@pytest.mark.parametrize("builder", [llama, gpt2_without_dropout], ids=["llama", "gpt2"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_the_last_mlp_runs_where_labels_read_with_the_same_loss_and_gradients(builder, attention, batching):
    whole = adapted(with_attention(builder, attention))
    model = copy.deepcopy(whole)
    assert compute_read_rows_only(getattr(model, model.base_model_prefix))
    batch, prefix = BatchMaker(batching, "causal-lm", PAD).make(examples([24, 15, 20, 12], prefix=range(5, 15)),
                                                                torch.device("cpu"))
    # labels on each row's last third (for the shortest, in the shared prefix: one position for every row)
    read = len({(0 if t < prefix else b, t) for b, t in (batch["labels"][:, 1:] != IGNORE_INDEX).nonzero().tolist()})
    seen, result = rows_into_last_mlp(model, batch, prefix)
    whole_seen, expected = rows_into_last_mlp(whole, batch, prefix)
    assert seen == [read] and whole_seen[0] > read
    assert_same(result, expected)


def test_a_row_without_labels_runs_whole_for_label_scoring():
    """Label scoring reads a prompt's last position: a row with no label keeps every position."""
    model = adapted(with_attention(llama, "eager"))
    compute_read_rows_only(model.model)
    batch_examples = examples([24, 15], prefix=range(5, 15))
    batch_examples[1]["labels"] = [IGNORE_INDEX] * 15
    batch, prefix = BatchMaker("shared_prefix", "causal-lm", PAD).make(batch_examples, torch.device("cpu"))
    seen, _ = rows_into_last_mlp(model, batch, prefix)
    assert seen == [(24 - 16) + 15]  # the first row's labelled positions (one row: the prefix counted once)


def test_under_gradient_checkpointing_the_last_mlp_runs_whole():
    model = adapted(with_attention(llama, "eager"))
    compute_read_rows_only(model.model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch, prefix = BatchMaker("padded", "causal-lm", PAD).make(examples([24, 15]), torch.device("cpu"))
    seen, result = rows_into_last_mlp(model, batch, prefix)
    assert seen[0] == batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)  # (each row's last token: none)
    assert all(g.abs().sum() > 0 for g in result[2])


def test_only_a_plain_mlp_is_hooked_and_once():
    model = adapted(with_attention(llama, "eager"))
    assert compute_read_rows_only(model.model) and not compute_read_rows_only(model.model)
    experts = adapted(with_attention(llama, "eager"))
    experts.model.layers[-1].mlp.experts = torch.nn.ModuleList([torch.nn.Linear(2, 2)])  # a mixture of experts
    assert not compute_read_rows_only(experts.model)
    assert not compute_read_rows_only(torch.nn.Linear(2, 2))  # no decoder layers


class _TupleMLP(torch.nn.Module):
    """A position-wise MLP that also returns a second value, as mixtures of experts return their router's scores."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x), x.sum()


class _Layer(torch.nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return x + self.mlp(x)[0]


def _body(mlps):
    body = torch.nn.Module()
    body.layers = torch.nn.ModuleList(_Layer(mlp) for mlp in mlps)
    body.forward = lambda x: body.layers[1](body.layers[0](x))
    return body


def test_an_mlp_returning_more_than_one_tensor_runs_whole_from_its_first_call_on():
    torch.manual_seed(0)
    body = _body([_TupleMLP(), _TupleMLP()])
    x = torch.randn(1, 6, 4)
    expected = body(x)
    assert compute_read_rows_only(body)
    calls = []
    body.layers[1].mlp.proj.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[1]))
    with only_read_rows(torch.tensor([1, 4])):
        assert torch.equal(body(x), expected) and torch.equal(body(x), expected)
    assert calls == [2, 6, 6]  # tried on the two rows once, then whole


def test_an_mlp_the_body_uses_twice_is_not_hooked():
    shared = _TupleMLP()
    assert not compute_read_rows_only(_body([shared, shared]))

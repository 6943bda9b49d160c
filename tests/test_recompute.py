"""Saved activations kept as recipes: not kept while the graph is, remade with the same values (views, autocast
included), once for every node that saved them, and never mistaken for a tensor at a reused address."""

import weakref

import pytest
import torch
from storage_refs import storage_ref
from torch.utils.checkpoint import checkpoint

from loratune import recompute
from loratune.recompute import recompute_outputs, recompute_when_saved, recomputing_saves


def leaves(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 5, generator=generator, requires_grad=True) for _ in range(2)]


def forward(a, w, register=True, calls=None):
    """`((a * 3) * w).sum()` with `a * 3` registered: the product's node saves it for `w`'s gradient."""
    h = a * 3
    if register:
        def remake(source):
            if calls is not None:
                calls.append(1)
            return source * 3

        recompute_when_saved(h, remake, a)
    return h, (h * w).sum()


def test_a_registered_tensor_is_not_kept_and_its_gradient_is_the_same():
    a, w = leaves()
    with recomputing_saves():
        h, loss = forward(a, w)
    ref = storage_ref(h)
    del h
    assert ref.expired()  # the graph holds the recipe, not the tensor
    loss.backward()
    torch.testing.assert_close(w.grad, a.detach() * 3, rtol=0, atol=0)


@pytest.mark.parametrize("context", [False, True], ids=["outside-the-context", "not-registered"])
def test_outside_the_context_or_unregistered_the_tensor_is_kept(context):
    a, w = leaves()
    if context:
        with recomputing_saves():
            h, _loss = forward(a, w, register=False)
    else:
        h, _loss = forward(a, w)
    ref = storage_ref(h)
    del h
    assert not ref.expired()


def test_a_saved_view_of_a_registered_tensor_is_remade_as_that_view():
    a, w = leaves()
    with recomputing_saves():
        h = a * 3
        recompute_when_saved(h, lambda source: source * 3, a)
        loss = (h[1:, 2:].t() @ w[1:, 2:]).trace()  # mm saves the transposed slice of `h`
    del h
    loss.backward()
    expected = torch.zeros_like(w)
    expected[1:, 2:] = (a.detach() * 3)[1:, 2:]
    torch.testing.assert_close(w.grad, expected, rtol=0, atol=0)


def test_nodes_saving_the_same_tensor_share_one_remaking():
    a, w = leaves()
    calls = []
    with recomputing_saves():
        h, loss = forward(a, w, calls=calls)
        loss = loss + (h * w * w).sum()  # two more nodes save `h`
    del h
    loss.backward()
    assert len(calls) == 1
    torch.testing.assert_close(w.grad, a.detach() * 3 * (1 + 2 * w.detach()), rtol=1e-6, atol=1e-6)


def test_a_dead_registration_is_not_matched_to_a_tensor_at_its_address():
    gone = torch.ones(3)
    ref = weakref.ref(gone)
    del gone
    saved = torch.zeros(3)
    registry = {saved.untyped_storage().data_ptr(): (ref, 0, recompute._Source(torch.ones_like, (saved,), saved))}
    kept, version = recompute._pack(registry, saved)
    assert kept.data_ptr() == saved.data_ptr() and version == saved._version


def test_the_recipe_runs_under_the_forwards_autocast():
    a, w = leaves()
    b = torch.randn(5, 5, generator=torch.Generator().manual_seed(1))
    results = []
    for recipes in (False, True):
        w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with recomputing_saves() if recipes else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                h = a @ b  # bf16 under autocast
                recompute_when_saved(h, lambda source: source @ b, a)
                loss = (h * w).float().sum()
        del h
        loss.backward()  # outside autocast
        results.append(w.grad.clone())
    assert torch.equal(results[0], results[1])


def test_inside_non_reentrant_checkpointing_the_checkpoint_keeps_its_own_and_gradients_match():
    a, w = leaves()
    with recomputing_saves():
        loss = checkpoint(lambda a, w: forward(a, w)[1], a, w, use_reentrant=False)
    loss.backward()
    torch.testing.assert_close(w.grad, a.detach() * 3, rtol=0, atol=0)
    torch.testing.assert_close(a.grad, 3 * w.detach(), rtol=0, atol=0)


def test_a_modules_output_is_remade_by_its_forward_and_registered_once():
    norm = torch.nn.LayerNorm(5)
    assert recompute_outputs(norm) and not recompute_outputs(norm)
    a, w = leaves()
    with recomputing_saves():
        h = norm(a)
        loss = (h * w).sum()
    expected = h.detach().clone()
    ref = storage_ref(h)
    del h
    assert ref.expired()
    loss.backward()
    torch.testing.assert_close(w.grad, expected, rtol=0, atol=0)


def test_a_remade_value_is_freed_once_the_nodes_that_saved_it_have_run():
    a, w = leaves()
    remade = []

    def remake(source):
        remade.append(storage_ref(value := source.exp()))
        return value

    with recomputing_saves():
        h = a.exp()  # its node saves `h` itself (before the registration) and runs after the product's
        recompute_when_saved(h, remake, a)
        loss = (h * w).sum()  # the product's node saves `h` as the recipe
    freed = []
    h.register_hook(lambda grad: freed.append(remade[0].expired()))  # between the two nodes
    del h
    loss.backward()
    assert freed == [True]


def test_a_registration_ends_with_its_tensor_so_its_recipes_inputs_are_not_held():
    """Under non-reentrant checkpointing (whose hooks, inside ours, save nothing) the registered tensor and its
    recipe's input die with the checkpointed function's locals, before the training loss's context ends."""
    a, w = leaves()
    inputs = []

    def layer(a, w):
        g = a * 2
        inputs.append(storage_ref(g))
        h = g * 3
        recompute_when_saved(h, lambda g: g * 3, g)
        return (h * w).sum()

    with recomputing_saves():
        loss = checkpoint(layer, a, w, use_reentrant=False)
        assert inputs[0].expired()
    loss.backward()
    torch.testing.assert_close(w.grad, a.detach() * 6, rtol=0, atol=0)


def test_a_graph_dropped_without_a_backward_pass_is_freed():
    a, _ = leaves()
    with recomputing_saves():
        y = a.exp()  # its node saves its own output
        loss = y.sum()
    ref = storage_ref(y)
    del y, loss
    assert ref.expired()


def test_a_registered_tensor_changed_in_place_is_saved_as_it_is():
    a, w = leaves()
    with recomputing_saves():
        h = a * 3
        recompute_when_saved(h, lambda source: source * 3, a)
        h = h.mul_(2)  # the recipe would remake the value before this
        loss = (h * w).sum()
    loss.backward()
    torch.testing.assert_close(w.grad, a.detach() * 6, rtol=0, atol=0)


def test_changing_a_saved_tensor_or_a_recipes_input_before_the_backward_pass_is_an_error():
    a, w = leaves()
    with recomputing_saves():
        y = a.exp()
        loss = (y * w).sum()
    y.add_(1)  # saved by exp's node and the product's: autograd's own check, which saved-tensor hooks turn off
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    a, w = leaves()
    with recomputing_saves():
        g = a * 2
        h = g * 3
        recompute_when_saved(h, lambda g: g * 3, g)
        loss = (h * w).sum()
    g.add_(1)  # the recipe's input
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_only_a_childless_module_called_on_one_tensor_gets_its_output_registered():
    assert not recompute_outputs(torch.nn.Sequential(torch.nn.LayerNorm(5)))
    norm = torch.nn.LayerNorm(5)
    assert recompute_outputs(norm)
    a, w = leaves()
    with recomputing_saves():
        h = norm(input=a)  # a keyword call: not registered
        _loss = (h * w).sum()
    ref = storage_ref(h)
    del h
    assert not ref.expired()

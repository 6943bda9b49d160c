"""LoRA layers against hand-written formulas: Linear, Conv1D, Embedding, Conv1d/Conv2d, DoRA, init modes, dtypes."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ConvNet, TokenNet, images, max_diff, token_ids
from torch import nn
from transformers.pytorch_utils import Conv1D

from loratune import LoraConfig, MergeError, TargetError, add_adapter, merge, unmerge
from loratune.core.layers import LoraConv, LoraEmbedding, LoraLinear, ModulesToSave


def _linear_layer(base: nn.Module, rank: int = 3, scaling: float = 0.5, init=False) -> LoraLinear:
    layer = LoraLinear(base)
    layer.create("a", rank, scaling, 0.0, init)
    layer.active = ["a"]
    return layer


def test_linear_forward_is_base_plus_scaled_low_rank():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = _linear_layer(base)
    x = torch.randn(2, 3, 6)
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    expected = base(x) + 0.5 * x @ a.t() @ b.t()
    assert max_diff(layer(x), expected) <= 1e-6
    assert max_diff(layer(x), base(x)) > 1e-3


def test_conv1d_layer_reads_transposed_weight():
    torch.manual_seed(0)
    base = Conv1D(4, 6)  # nf=4 outputs, nx=6 inputs: weight (6, 4)
    nn.init.normal_(base.weight)
    layer = _linear_layer(base)
    assert layer.transposed and layer.to_oi_shape() == (4, 6)
    x = torch.randn(2, 6)
    expected = base(x) + 0.5 * x @ (layer.lora_B["a"].weight @ layer.lora_A["a"].weight).t()
    assert max_diff(layer(x), expected) <= 1e-6
    assert layer.delta_weight("a").shape == base.weight.shape


@pytest.mark.parametrize("make_base", [lambda: nn.Linear(6, 4), lambda: Conv1D(4, 6)])
def test_merge_and_unmerge_linear_layers(make_base):
    torch.manual_seed(0)
    base = make_base()
    layer = _linear_layer(base)
    original = base.weight.detach().clone()
    x = torch.randn(5, 6)
    unmerged = layer(x)
    layer.merge(["a"])
    assert layer.merged == ["a"]
    assert max_diff(base(x), unmerged) <= 1e-5  # the base alone now carries the update
    assert max_diff(layer(x), unmerged) <= 1e-5  # and it is not applied twice
    layer.unmerge()
    assert max_diff(base.weight, original) <= 1e-6


def test_default_init_leaves_outputs_unchanged_exactly():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = _linear_layer(base, init=True)
    assert torch.count_nonzero(layer.lora_B["a"].weight) == 0
    assert torch.count_nonzero(layer.lora_A["a"].weight) == layer.lora_A["a"].weight.numel()
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), base(x))


def test_gaussian_init():
    torch.manual_seed(0)
    base = nn.Linear(400, 300)
    layer = _linear_layer(base, rank=4, init="gaussian")
    a = layer.lora_A["a"].weight
    assert torch.count_nonzero(layer.lora_B["a"].weight) == 0
    assert a.mean().abs() < 0.04 and a.std().item() == pytest.approx(1 / 4, rel=0.1)
    x = torch.randn(3, 400)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("make_base", [lambda: nn.Linear(8, 6), lambda: Conv1D(6, 8)])
def test_pissa_init_keeps_outputs_and_moves_top_directions_into_adapter(make_base):
    torch.manual_seed(0)
    base = make_base()
    nn.init.normal_(base.weight)
    original = base.weight.detach().clone()
    x = torch.randn(4, 8)
    before = base(x)
    layer = _linear_layer(base, rank=2, scaling=2.0, init="pissa")
    assert max_diff(layer(x), before) <= 1e-5
    w_oi = original.t() if isinstance(base, Conv1D) else original
    u, s, vh = torch.linalg.svd(w_oi)
    top2 = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
    assert max_diff(layer.delta_weight("a"), layer.to_weight_layout(top2)) <= 1e-5
    residual_oi = layer.base_weight_oi()
    assert torch.linalg.matrix_norm(residual_oi, ord=2).item() == pytest.approx(s[2].item(), rel=1e-4)


def test_dora_forward_matches_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = _linear_layer(base)
    layer.enable_dora("a")
    with torch.no_grad():
        layer.lora_magnitude_vector["a"].mul_(torch.linspace(0.5, 1.5, 4))
    w = base.weight + 0.5 * layer.lora_B["a"].weight @ layer.lora_A["a"].weight
    m = layer.lora_magnitude_vector["a"]
    x = torch.randn(3, 6)
    expected = (m / w.norm(dim=1)) * (x @ w.t()) + base.bias
    assert max_diff(layer(x), expected) <= 1e-5
    unmerged = layer(x)
    layer.merge(["a"])
    assert max_diff(base(x), unmerged) <= 1e-5
    layer.unmerge()
    assert max_diff(layer(x), unmerged) <= 1e-5


def test_dora_magnitude_starts_at_row_norms():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = _linear_layer(base, init=True)
    layer.enable_dora("a")
    assert max_diff(layer.lora_magnitude_vector["a"], base.weight.norm(dim=1)) <= 1e-6
    x = torch.randn(3, 6)
    assert max_diff(layer(x), base(x)) <= 1e-6


def test_embedding_forward_and_merge():
    torch.manual_seed(0)
    base = nn.Embedding(10, 4)
    layer = LoraEmbedding(base)
    layer.create("a", 2, 2.0, 0.0, False)
    layer.active = ["a"]
    ids = torch.tensor([[1, 2, 9], [0, 0, 3]])
    a, b = layer.lora_embedding_A["a"], layer.lora_embedding_B["a"]
    expected = base(ids) + 2.0 * a.t()[ids] @ b.t()
    out = layer(ids)
    assert max_diff(out, expected) <= 1e-6 and max_diff(out, base(ids)) > 1e-3
    layer.merge(["a"])
    assert max_diff(base(ids), out) <= 1e-5
    assert max_diff(layer(ids), out) <= 1e-5


def test_embedding_default_init_is_identity():
    base = nn.Embedding(10, 4)
    layer = LoraEmbedding(base)
    layer.create("a", 2, 2.0, 0.0, True)
    layer.active = ["a"]
    ids = torch.arange(10)
    assert torch.equal(layer(ids), base(ids))


@pytest.mark.parametrize("base, shape", [
    (nn.Conv2d(3, 5, kernel_size=3, padding=1, stride=2), (2, 3, 7, 7)),
    (nn.Conv1d(3, 5, kernel_size=3, dilation=2), (2, 3, 11)),
])
def test_conv_forward_equals_delta_conv_and_merge(base, shape):
    torch.manual_seed(0)
    layer = LoraConv(base)
    layer.create("a", 2, 0.75, 0.0, False)
    layer.active = ["a"]
    x = torch.randn(*shape)
    out = layer(x)
    conv = F_conv(base)
    expected = conv(x, base.weight + layer.delta_weight("a"), base.bias, base.stride, base.padding, base.dilation)
    assert max_diff(out, expected) <= 1e-5 and max_diff(out, base(x)) > 1e-3
    layer.merge(["a"])
    assert max_diff(base(x), out) <= 1e-5
    layer.unmerge()
    assert max_diff(layer(x), out) <= 1e-5


def F_conv(base):  # noqa: N802
    return torch.nn.functional.conv2d if isinstance(base, nn.Conv2d) else torch.nn.functional.conv1d


def test_grouped_conv_is_refused():
    with pytest.raises(TargetError, match="grouped convolutions"):
        LoraConv(nn.Conv2d(4, 4, 3, groups=2))


def test_conv_model_merge_equals_unmerged():
    model = ConvNet()
    x = images()
    base = model(x).detach()
    add_adapter(model, LoraConfig(r=2, target_modules=["conv1", "conv2"], init_lora_weights=False))
    assert isinstance(model.conv1, LoraConv) and isinstance(model.conv2, LoraConv)
    out = model(x).detach()
    assert max_diff(out, base) > 1e-4
    merge(model)
    assert max_diff(model(x), out) <= 1e-5
    unmerge(model)
    assert max_diff(model(x), out) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_with_fp32_adapter(dtype):
    model = TokenNet().to(dtype)
    ids = token_ids()
    add_adapter(model, LoraConfig(r=2, target_modules=["emb", "proj", "mix"], init_lora_weights=False))
    for layer in (model.emb, model.proj, model.mix):
        assert layer.base_layer.weight.dtype == dtype
        assert all(p.dtype == torch.float32 for p in layer.adapter_tensors("default").values())
    out = model(ids)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert model.proj.lora_A["default"].weight.grad is not None
    assert torch.isfinite(model.proj.lora_B["default"].weight.grad).all()
    assert model.proj.base_layer.weight.grad is None

    originals = {n: getattr(model, n).base_layer.weight.detach().clone() for n in ("emb", "proj", "mix")}
    for name, layer in (("emb", model.emb), ("proj", model.proj), ("mix", model.mix)):
        expected = (originals[name].float() + layer.delta_weight("default")).to(dtype)
        layer.merge(["default"])
        assert layer.base_layer.weight.dtype == dtype
        assert torch.equal(layer.base_layer.weight, expected)  # added in fp32, rounded once
        layer.unmerge()
        eps = torch.finfo(dtype).eps
        tolerance = 4 * eps * (originals[name].float().abs() + layer.delta_weight("default").abs()) + 1e-6
        assert ((layer.base_layer.weight.float() - originals[name].float()).abs() <= tolerance).all()


def test_safe_merge_of_non_finite_adapter_raises_and_changes_nothing():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = _linear_layer(base)
    with torch.no_grad():
        layer.lora_B["a"].weight[1, 0] = float("inf")
    before = base.weight.detach().clone()
    with pytest.raises(MergeError, match="non-finite"):
        layer.merge(["a"], safe=True)
    assert torch.equal(base.weight, before) and layer.merged == []


def test_modules_to_save_routes_to_active_copy():
    original = nn.Linear(3, 2)
    wrapper = ModulesToSave(original)
    copy = nn.Linear(3, 2)
    wrapper.modules_to_save["x"] = copy
    x = torch.randn(1, 3)
    assert torch.equal(wrapper(x), original(x)) and wrapper.weight is original.weight
    wrapper.active = "x"
    assert torch.equal(wrapper(x), copy(x)) and wrapper.weight is copy.weight
    wrapper.disabled = True
    assert torch.equal(wrapper(x), original(x))


def test_dropout_applies_only_in_training():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = LoraLinear(base)
    layer.create("a", 3, 1.0, 0.5, False)
    layer.active = ["a"]
    x = torch.randn(50, 6)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))

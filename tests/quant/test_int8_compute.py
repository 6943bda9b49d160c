"""int8 compute for the frozen base: error bounds against fp32, on random data and on a tiny model's loss."""

import pytest
import torch
from tiny_models import llama

from loratune.core.adapters import add_adapter
from loratune.core.errors import ConfigError
from loratune.core.lora_config import LoraConfig
from loratune.quant.convert import quantize_model
from loratune.quant.int8_compute import Int8Linear, quantize_rows
from loratune.quant.linear import QuantLinear, set_base_compute
from loratune.quant.storage import quantize
from loratune.train.run_config import validate_config
from loratune.train.session import prepare
from loratune.train.step import causal_lm_loss


def rounding_bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Worst case of |Q(a) Q(b)^T - a b^T| elementwise for row-wise absmax int8 rounding of a (m, k) and
    b (n, k): each code is off by at most half its row's scale."""
    _, sa = quantize_rows(a)
    _, sb = quantize_rows(b)
    return (sa[:, None] / 2) * b.abs().sum(1)[None, :] + (sb[None, :] / 2) * a.abs().sum(1)[:, None] \
        + a.shape[1] * sa[:, None] * sb[None, :] / 4


def test_forward_and_input_gradient_stay_within_the_rounding_bound_of_fp32():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=generator, requires_grad=True)
    w = torch.randn(80, 96, generator=generator) / 10
    grad_out = torch.randn(64, 80, generator=generator)
    q = quantize(w, "int8")
    y = Int8Linear.apply(x, q.data, q.scales)
    (grad_x,) = torch.autograd.grad(y, x, grad_out)
    exact_y, exact_grad = x.detach() @ w.t(), grad_out @ w
    assert ((y - exact_y).abs() <= rounding_bound(x.detach(), w) * 1.0001 + 1e-5).all()
    folded = grad_out * q.scales[None, :]  # the weight's scales go into the gradient before it is quantized
    codes = q.data.float().t()  # (in, out)
    assert ((grad_x - exact_grad).abs() <= rounding_bound(folded, codes) * 1.0001 + 1e-5).all()
    for got, exact in ((y, exact_y), (grad_x, exact_grad)):
        assert 1e-4 < ((got - exact).norm() / exact.norm()).item() < 0.02  # int8, so not exact, and close


def test_a_tiny_models_loss_and_adapter_gradients_in_int8_stay_close_to_fp32():
    model = llama(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.train()
    ids = torch.randint(3, 60, (4, 24), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads():
        loss, _, _ = causal_lm_loss(model, batch)
        return loss.item(), torch.autograd.grad(loss, params)

    dense_loss, dense_grads = loss_and_grads()
    quantize_model(model, "int8")
    assert set_base_compute(model, "int8") == 14  # 7 linear layers in each of 2 blocks
    int8_loss, int8_grads = loss_and_grads()
    assert abs(int8_loss - dense_loss) / dense_loss < 0.01
    for got, exact in zip(int8_grads, dense_grads):
        assert (got - exact).norm() / exact.norm() < 0.05


def test_an_int8_base_multiplies_the_way_the_cpu_probe_chose(run_config, monkeypatch):
    for choice in ("int8", "dequantize"):
        monkeypatch.setattr("loratune.train.session.cpu_choice",
                            lambda precision=None, choice=choice: {"precision": "fp32", "int8_base": choice})
        session = prepare(validate_config(run_config(model={"quantize": "int8"}), "test"), quiet=True)
        layers = [m for m in session.model.modules() if isinstance(m, QuantLinear)]
        assert layers and all(m.format == "int8" and m.compute == choice for m in layers)


def test_base_compute_is_no_longer_a_key_and_never_quantizes_a_dense_base(run_config):
    with pytest.raises(ConfigError, match="train.base_compute"):
        validate_config(run_config(train={"base_compute": "int8"}), "test")
    session = prepare(validate_config(run_config(), "test"), quiet=True)
    assert not any(isinstance(m, QuantLinear) for m in session.model.modules())

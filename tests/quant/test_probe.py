"""The CPU probe: which precision and which int8 product it picks from measured rates, and its cache."""

import json

import pytest
import torch
import torch.nn.functional as F

import loratune.precision as precision
from loratune.quant.linear import QuantLinear
from loratune.quant.storage import dequantize

AMX = {"fp32": 60.0, "bf16": 600.0, "int8": 580.0, "codes_layer_fp32": 50.0, "int8_layer_fp32": 150.0,
       "codes_layer_bf16": 360.0, "int8_layer_bf16": 180.0}  # as measured on a Xeon with AMX, one thread


def test_bf16_where_its_products_are_faster_and_int8_products_only_where_they_beat_the_codes():
    assert precision.choose(AMX) == {"precision": "bf16", "int8_base": "dequantize"}
    no_bf16 = {k: v for k, v in AMX.items() if "bf16" not in k}  # a CPU without native bf16: not probed
    assert precision.choose(no_bf16) == {"precision": "fp32", "int8_base": "int8"}
    slow_bf16 = {**AMX, "bf16": 40.0}
    assert precision.choose(slow_bf16) == {"precision": "fp32", "int8_base": "int8"}
    fast_int8 = {**AMX, "int8_layer_bf16": 1.6 * AMX["codes_layer_bf16"]}
    assert precision.choose(fast_int8) == {"precision": "bf16", "int8_base": "int8"}
    # the cached rates that chose int8 x int8 for the 1.1B scale run, which then trained at 0.07x the plain base on
    # two threads: 1.33x on the probe's one thread is within the margin, so the codes are kept
    barely = {**AMX, "codes_layer_bf16": 285.7, "int8_layer_bf16": 381.3}
    assert precision.choose(barely) == {"precision": "bf16", "int8_base": "dequantize"}
    # a run that fixed fp32 on a bf16 machine: the int8 choice compares the fp32 timings
    assert precision.choose(AMX, "fp32") == {"precision": "fp32", "int8_base": "int8"}


def test_the_probe_runs_on_the_threads_it_is_given_and_restores_the_count(monkeypatch):
    seen, real = [], torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n)))
    before = torch.get_num_threads()
    precision.measure_rates(False, shape=(8, 16, 8), repeats=1, threads=1)
    assert seen == [1, before] and torch.get_num_threads() == before


def test_auto_precision_follows_the_probe_on_a_cpu(monkeypatch):
    for rates, expected in ((AMX, "bf16"), ({**AMX, "bf16": 10.0}, "fp32")):
        monkeypatch.setattr(precision, "cpu_rates", lambda rates=rates: rates)
        assert precision.resolve_precision("auto", torch.device("cpu")) == expected
        assert precision.resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_the_rates_are_measured_once_per_cpu_and_kept_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path))
    calls = []

    def measure(bf16):
        calls.append(bf16)
        return dict(AMX)

    assert precision.cpu_rates(measure) == AMX
    assert precision.cpu_rates(measure) == AMX and len(calls) == 1
    stored = json.loads((tmp_path / "probe.json").read_text())
    assert list(stored.values()) == [AMX] and precision.cpu_model() in next(iter(stored))
    assert [p.name for p in tmp_path.iterdir()] == ["probe.json"]  # written atomically: no temporary left
    (tmp_path / "probe.json").write_text("{not json")
    assert precision.cpu_rates(measure) == AMX and len(calls) == 2  # a damaged cache is measured again


def test_a_real_probe_measures_every_product_it_compares(monkeypatch):
    rates = precision.measure_rates(bf16=True, shape=(32, 64, 96), repeats=1)
    assert set(rates) == set(AMX) and all(v > 0 for v in rates.values())
    assert set(precision.choose(rates)) == {"precision", "int8_base"}


@pytest.mark.parametrize("compute", ["dequantize", "int8"])
def test_the_probe_times_an_int8_layer_as_training_uses_it_forward_and_input_gradient(compute):
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(24, 32, generator=gen) / 6, torch.randn(16, 32, generator=gen)
    layer = QuantLinear.from_weight(w, None, "int8")
    grad = precision._layer_case(layer, x, compute)()  # what the probe times
    expected = torch.full((16, 24), 1e-3) @ dequantize(layer.packed, torch.float32)
    assert grad.shape == x.shape and not grad.requires_grad
    assert ((grad - expected).norm() / expected.norm()).item() < 2e-2


@pytest.mark.parametrize("format", ["nf4", "int8"])
def test_bf16_forward_and_input_gradient_stay_within_bf16_rounding_of_the_fp32_layer(format):
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 128, generator=gen) / 10, torch.randn(40, 128, generator=gen)
    upstream = torch.randn(40, 96, generator=gen)
    layer = QuantLinear.from_weight(w, None, format)
    exact_w = dequantize(layer.packed, torch.float32)
    xb = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(xb)
    (grad,) = torch.autograd.grad(out, xb, upstream.bfloat16())
    for got, exact in ((out.float(), F.linear(x, exact_w)), (grad.float(), upstream @ exact_w)):
        # bf16 inputs, codes and scales: each product term off by a few units of 2^-8, accumulated in fp32
        assert ((got - exact).norm() / exact.norm()).item() < 1e-2
        assert (got - exact).abs().max() < 0.05 * exact.abs().max()


def test_the_products_alone_are_measured_without_the_layer_cases():
    assert set(precision.measure_rates(False, shape=(8, 16, 8), repeats=1, layers=False)) == {"fp32", "int8"}
    assert {"codes_layer_fp32", "int8_layer_fp32"} <= set(precision.measure_rates(False, shape=(8, 16, 8), repeats=1))

"""The compiled dequantization kernels (`quant.native`): exact against the torch path's fp32 values rounded
once, in both their AVX-512 and portable builds, and a failed build that falls back to the torch path."""

import warnings

import pytest
import torch

from loratune.quant import native
from loratune.quant.storage import NF4_CODEBOOK, Workspace, _block_scales, dequantize, quantize


def torch_path(monkeypatch, q, dtype):
    monkeypatch.setenv("LORATUNE_NATIVE", "0")
    try:
        return dequantize(q, dtype)
    finally:
        monkeypatch.delenv("LORATUNE_NATIVE")


def test_this_machine_builds_the_kernel_for_its_cpu():
    kernel = native.dequant_kernels()
    assert kernel is not None  # a C++ compiler and ninja are part of the supported set-up
    assert kernel.vectorized() == ("avx512bw" in native.cpu_flags().split())
    assert not native.dequant_kernels(scalar=True).vectorized()


@pytest.mark.parametrize("scalar", [False, True])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(4, 64), (384, 640)])  # 4 blocks; 3840 blocks, several threads' chunks
def test_kernel_equals_the_fp32_dequantization_rounded_once(monkeypatch, scalar, double_quant, shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])) * 0.05
    weight[0, :64] = 0  # a zero block
    q = quantize(weight, "nf4", double_quant)
    kernel = native.dequant_kernels(scalar=scalar)
    reference = torch_path(monkeypatch, q, torch.float32)
    scales = _block_scales(q, Workspace())
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.full(shape, float("nan"), dtype=dtype)
        kernel.nf4_dequantize(q.data, scales, NF4_CODEBOOK, out)
        assert torch.equal(out, reference.to(dtype)), dtype
    assert torch.equal(dequantize(q, torch.bfloat16), reference.to(torch.bfloat16))  # dequantize takes the kernel


@pytest.mark.parametrize("scalar", [False, True])
@pytest.mark.parametrize("shape", [(3, 5), (70, 200)])  # rows shorter than a vector; a ragged tail per row
def test_int8_kernel_equals_codes_times_row_scales_rounded_once(monkeypatch, scalar, shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1])) * torch.rand(shape[0], 1) * 3
    q = quantize(weight, "int8")
    exact = q.data.float() * q.scales[:, None]
    assert torch.equal(torch_path(monkeypatch, q, torch.float32), exact)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.full(shape, float("nan"), dtype=dtype)
        native.dequant_kernels(scalar=scalar).int8_dequantize(q.data, q.scales, out)
        assert torch.equal(out, exact.to(dtype)), dtype
    assert torch.equal(dequantize(q, torch.bfloat16), exact.to(torch.bfloat16))


def test_kernel_is_at_least_as_accurate_as_the_torch_path_in_bf16(monkeypatch):
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(1))
    q = quantize(weight, "nf4")
    exact = torch_path(monkeypatch, q, torch.float32)
    kernel_error = (dequantize(q, torch.bfloat16).float() - exact).abs()
    torch_error = (torch_path(monkeypatch, q, torch.bfloat16).float() - exact).abs()
    assert kernel_error.sum() <= torch_error.sum()
    assert (kernel_error <= exact.abs() * 2**-8).all()  # half a bf16 unit in the last place: rounded once


@pytest.mark.parametrize("format,double_quant", [("nf4", False), ("nf4", True), ("int8", True)])
def test_scales_cast_with_the_model_still_dequantize(monkeypatch, format, double_quant):
    """`model.to(torch.bfloat16)` casts a quantized layer's float buffers, scales included."""
    q = quantize(torch.randn(64, 128, generator=torch.Generator().manual_seed(3)), format, double_quant)
    q.scales = q.scales.to(torch.bfloat16) if q.scales.is_floating_point() else q.scales
    if q.scale_scales is not None:
        q.scale_scales, q.scale_mean = q.scale_scales.to(torch.bfloat16), q.scale_mean.to(torch.bfloat16)
    assert torch.equal(dequantize(q, torch.bfloat16), torch_path(monkeypatch, q, torch.float32).to(torch.bfloat16))


def test_kernel_refuses_mismatched_sizes():
    q = quantize(torch.randn(8, 64), "nf4", double_quant=False)
    with pytest.raises(RuntimeError, match="sizes"):
        native.dequant_kernels().nf4_dequantize(q.data, q.scales, NF4_CODEBOOK, torch.empty(8, 32))


def test_a_failed_build_warns_once_and_dequantization_takes_the_torch_path(monkeypatch):
    from torch.utils import cpp_extension

    calls = []

    def no_compiler(*args, **kwargs):
        calls.append(args[0])
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(native, "_BUILT", {})
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    q = quantize(torch.randn(64, 128, generator=torch.Generator().manual_seed(2)), "nf4")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = dequantize(q, torch.bfloat16)
        second = dequantize(q, torch.bfloat16)
    assert len(calls) == 1 and calls[0].startswith("loratune_dequant_")
    assert [str(w.message) for w in caught] == [
        "loratune: the dequantization kernels could not be built (Error building extension: c++: command not "
        "found); quantized layers use torch's slower dequantization"]
    assert torch.equal(first, second) and torch.equal(first, torch_path(monkeypatch, q, torch.bfloat16))


def test_turned_off_it_is_never_built(monkeypatch):
    monkeypatch.setattr(native, "_BUILT", {})
    monkeypatch.setenv("LORATUNE_NATIVE", "0")
    assert native.dequant_kernels() is None and native._BUILT == {}
    assert native.kernels_for(torch.device("cpu"), torch.bfloat16) is None


def test_a_lock_left_by_a_killed_build_is_cleared_and_a_live_one_kept(tmp_path):
    import os
    import time

    stale, live = tmp_path / "stale" / "lock", tmp_path / "live" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir()
        lock.write_text("")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    native._clear_stale_lock(stale)
    native._clear_stale_lock(live)
    native._clear_stale_lock(tmp_path / "none" / "lock")  # no lock: nothing to do
    assert not stale.exists() and live.exists()

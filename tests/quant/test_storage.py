"""NF4 and int8 storage: accuracy against torchao's reference NF4, exact decoding, sizes and refusals.

(Named test_quant_formats.py, not test_formats.py: tests/data/test_formats.py exists and test folders
have no __init__.py, so equal basenames would collide at collection.)
"""

import pytest
import torch

import loratune.quant.storage as formats
from loratune.errors import QuantizationError
from loratune.quant.storage import (
    NF4_BLOCK,
    NF4_CODEBOOK,
    SCALE_BLOCK,
    bytes_per_weight,
    check_quantizable,
    dequantize,
    quantize,
)


@pytest.fixture(autouse=True, params=["kernel", "torch"])
def dequantization_path(request, monkeypatch):
    """Every test runs with the compiled dequantization kernels (`quant.native`) and with the torch path."""
    if request.param == "torch":
        monkeypatch.setenv("LORATUNE_NATIVE", "0")
    return request.param


def seeded(shape=(512, 256), dtype=torch.bfloat16, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def mean_abs_error(weight: torch.Tensor, restored: torch.Tensor) -> float:
    return (restored.float() - weight.float()).abs().mean().item()


@pytest.fixture(scope="module")
def torchao_nf4_error() -> float:
    """torchao's NF4 (block 64, scales double-quantized per 256 blocks) on the same weight: the reference."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    weight = seeded()
    return mean_abs_error(weight, to_nf4(weight, NF4_BLOCK, SCALE_BLOCK).get_original_weight())


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_round_trip_is_no_worse_than_torchao(torchao_nf4_error, double_quant, dtype):
    weight = seeded()
    error = mean_abs_error(weight, dequantize(quantize(weight, "nf4", double_quant), dtype))
    assert 0.06 < torchao_nf4_error < 0.09  # the reference itself is a 4-bit quantizer on N(0, 1) data
    assert error <= torchao_nf4_error * 1.001


def test_nf4_picks_the_nearest_codebook_value_per_block():
    """Brute-force reference: each weight / block absmax goes to the closest of the 16 codebook values."""
    weight = seeded((32, 128), torch.float32, seed=3)
    blocks = weight.reshape(-1, NF4_BLOCK)
    absmax = blocks.abs().amax(1, keepdim=True)
    nearest = (blocks / absmax)[..., None].sub(NF4_CODEBOOK).abs().argmin(-1)
    expected = (NF4_CODEBOOK[nearest] * absmax).reshape(weight.shape)
    restored = dequantize(quantize(weight, "nf4", double_quant=False), torch.float32)
    assert torch.equal(restored, expected)


def codebook_weight(rows: int, cols: int, scales: torch.Tensor, seed: int = 0):
    """A weight built from codebook values times one scale per block, each block holding -1 or +1."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows * cols // NF4_BLOCK, NF4_BLOCK), generator=generator)
    codes[:, 0] = torch.where(torch.arange(codes.shape[0]) % 2 == 0, 0, 15)  # absmax of each block = its scale
    weight = (NF4_CODEBOOK[codes] * scales[:, None]).reshape(rows, cols)
    return weight, codes.reshape(-1)


def test_codes_decode_exactly_to_codebook_times_block_absmax():
    scales = torch.rand(16, generator=torch.Generator().manual_seed(1)) * 3 + 0.01
    weight, codes = codebook_weight(8, 128, scales)
    q = quantize(weight, "nf4", double_quant=False)
    assert torch.equal(dequantize(q, torch.float32), weight)
    assert torch.equal(q.scales, scales)
    # two codes per byte, the first of each pair in the high nibble
    assert q.data.dtype == torch.uint8 and q.data.numel() == weight.numel() // 2
    assert torch.equal((q.data >> 4).long(), codes[0::2]) and torch.equal((q.data & 15).long(), codes[1::2])


def test_double_quantized_scales_are_exact_when_all_blocks_share_one_scale():
    weight, _ = codebook_weight(8, 128, torch.full((16,), 0.37))
    q = quantize(weight, "nf4", double_quant=True)
    assert q.scales.dtype == torch.int8 and q.scale_scales is not None
    assert torch.equal(dequantize(q, torch.float32), weight)


def test_double_quantization_costs_little_accuracy_with_a_partial_scale_group():
    weight = seeded((100, 192), torch.float32, seed=2)  # 300 blocks: one full group of 256 and one of 44
    plain, double = quantize(weight, "nf4", False), quantize(weight, "nf4", True)
    assert double.scale_scales.shape == (2,) and double.scales.dtype == torch.int8
    plain_error = mean_abs_error(weight, dequantize(plain, torch.float32))
    double_error = mean_abs_error(weight, dequantize(double, torch.float32))
    assert plain_error <= double_error <= plain_error * 1.01
    # the scales come back within half an int8 step of their group; a block's largest weight decodes to
    # +-1 times its scale, so the decoded block absmax is the scale in use
    decoded_scales = dequantize(double, torch.float32).reshape(-1, NF4_BLOCK).abs().amax(1)
    assert torch.equal(dequantize(plain, torch.float32).reshape(-1, NF4_BLOCK).abs().amax(1), plain.scales)
    scale_error = (decoded_scales - plain.scales).abs()
    step = double.scale_scales.repeat_interleave(SCALE_BLOCK)[:300]
    assert (scale_error <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("shape", [(64, 96), (7, 130)])
def test_int8_error_is_at_most_half_a_step_per_row(shape):
    weight = seeded(shape, torch.float32, seed=4) * torch.linspace(0.01, 10, shape[0])[:, None]
    q = quantize(weight, "int8")
    assert q.data.dtype == torch.int8 and q.data.shape == shape
    assert (q.data.abs().amax(1) == 127).all()  # each row's absmax maps to the end of the range
    error = (dequantize(q, torch.float32) - weight).abs()
    row_absmax = weight.abs().amax(1, keepdim=True)
    assert (error <= row_absmax / 254 + 1e-6 * row_absmax).all()
    assert error.max() > 0  # it does quantize


@pytest.mark.parametrize("format,double_quant", [("nf4", True), ("nf4", False), ("int8", True)])
def test_stored_bytes_match_bytes_per_weight(format, double_quant):
    weight = seeded((512, 256), torch.float32)
    q = quantize(weight, format, double_quant)
    extra = {("nf4", True): 4, ("nf4", False): 0, ("int8", True): 4 * 512}[format, double_quant]  # mean; row scales
    assert q.nbytes() == weight.numel() * bytes_per_weight(format, double_quant) + extra
    assert q.nbytes() == sum(t.numel() * t.element_size() for t in q.tensors().values())
    if format == "nf4":
        assert {k: t.dtype for k, t in q.tensors().items()} == (
            {"data": torch.uint8, "scales": torch.int8, "scale_scales": torch.float32, "scale_mean": torch.float32}
            if double_quant else {"data": torch.uint8, "scales": torch.float32})
    assert bytes_per_weight("nf4") * 8 == pytest.approx(4.127, abs=1e-3)  # the documented ~0.127 bits of scales
    assert bytes_per_weight("nf4", double_quant=False) * 8 == 4.5


@pytest.mark.parametrize("format", ["nf4", "int8"])
def test_dequantized_dtypes_agree(format):
    q = quantize(seeded((64, 128), torch.float32, seed=5), format)
    full = dequantize(q, torch.float32)
    # three roundings (codebook value, scale, product), each within the unit roundoff u of the dtype
    for dtype, u in ((torch.bfloat16, 2**-8), (torch.float16, 2**-11)):
        low = dequantize(q, dtype)
        assert low.dtype == dtype and low.shape == (64, 128)
        torch.testing.assert_close(low.float(), full, rtol=3 * u, atol=1e-6)


def test_nf4_refuses_an_unsupported_dequantization_dtype():
    q = quantize(seeded((4, 64), torch.float32), "nf4")
    with pytest.raises(QuantizationError, match="float64"):
        dequantize(q, torch.float64)


def test_quantize_leaves_its_input_untouched_and_accepts_any_float_dtype():
    weight = seeded((64, 64), torch.float16)
    before = weight.clone()
    for format in ("nf4", "int8"):
        restored = dequantize(quantize(weight, format), torch.float32)
        assert torch.equal(weight, before)
        assert (restored - weight.float()).abs().mean() < 0.1


@pytest.mark.parametrize("format,double_quant", [("nf4", True), ("nf4", False), ("int8", True)])
def test_chunked_quantization_gives_the_same_codes(monkeypatch, format, double_quant):
    weight = seeded((96, 320), torch.float32, seed=6)
    whole = quantize(weight, format, double_quant)
    monkeypatch.setattr(formats, "_CHUNK", 700)  # several rows / blocks per chunk, and a ragged last chunk
    chunked = quantize(weight, format, double_quant)
    for key, tensor in whole.tensors().items():
        assert torch.equal(chunked.tensors()[key], tensor), key


def test_sizes_nf4_cannot_store_name_the_layer_and_shape():
    with pytest.raises(QuantizationError, match=r"layer 'model.proj': nf4 needs a weight size divisible by 64, "
                                                r"got shape \(3, 30\)"):
        check_quantizable("nf4", (3, 30), "layer 'model.proj'")
    with pytest.raises(QuantizationError, match=r"weight: .*\(10, 10\)"):
        quantize(torch.randn(10, 10), "nf4")
    check_quantizable("int8", (3, 30), "layer 'model.proj'")  # int8 has no block constraint
    restored = dequantize(quantize(torch.randn(3, 30), "int8"), torch.float32)
    assert restored.shape == (3, 30)


def test_unknown_formats_and_non_matrices_are_refused():
    with pytest.raises(QuantizationError, match=r"unknown format 'nf3'.*nf4, int8"):
        quantize(torch.randn(64, 64), "nf3")
    with pytest.raises(QuantizationError, match=r"layer 'conv': only 2-D weights can be quantized, got shape "
                                                r"\(2, 64, 64\)"):
        check_quantizable("int8", (2, 64, 64), "layer 'conv'")
    with pytest.raises(QuantizationError, match="2-D"):
        quantize(torch.randn(2, 64, 64), "nf4")


@pytest.mark.parametrize("format,double_quant", [("nf4", True), ("nf4", False), ("int8", True)])
def test_zero_blocks_and_rows_decode_to_zero_without_nan(format, double_quant):
    weight = seeded((4, 128), torch.float32, seed=7)
    weight[1] = 0  # a zero row: two zero NF4 blocks, and a zero int8 row
    weight[2, :64] = 0
    restored = dequantize(quantize(weight, format, double_quant), torch.float32)
    assert torch.isfinite(restored).all()
    assert (restored[1] == 0).all() and (restored[2, :64] == 0).all()
    assert restored[0].abs().sum() > 0
    everything_zero = dequantize(quantize(torch.zeros(64, 64), format, double_quant), torch.bfloat16)
    assert torch.equal(everything_zero, torch.zeros(64, 64, dtype=torch.bfloat16))

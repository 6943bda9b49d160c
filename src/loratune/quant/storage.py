"""Storage formats for frozen weights: NF4 (4-bit NormalFloat, QLoRA) and int8, with fast dequantization.

NF4 maps each block of 64 weights, divided by the block's absolute maximum, to the nearest of 16 values
placed at quantiles of a normal distribution (the QLoRA codebook). Two codes share a byte. With double
quantization the per-block scales are themselves stored as int8 (mean removed, one fp32 scale per 256
blocks), which takes the cost of the scales from 0.5 to about 0.127 bits per weight.

int8 stores each output row as int8 codes times one scale (row absmax / 127).

Dequantization is the hot path (it runs in every forward and backward). On the CPU compiled kernels
(`quant.native`) do it in one pass; elsewhere, or where it cannot be built: a byte holds two codes, so a
256-entry table of value pairs turns each byte into two values with one gather, then one multiply applies
the block scales (for bf16 a 65536-entry table turns two bytes into four values). With a `Workspace`
every step writes into buffers kept between calls: a fresh tensor of
tens of megabytes costs more in page faults than the arithmetic that fills it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loratune.errors import QuantizationError
from loratune.quant.native import kernels_for

FORMATS: tuple[str, ...] = ("nf4", "int8")

NF4_BLOCK = 64
SCALE_BLOCK = 256
# QLoRA's NF4 codebook (Dettmers et al. 2023, appendix E): 16 normal quantiles, exact zero included.
NF4_CODEBOOK = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
_MIDPOINTS = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2
# Transient memory while quantizing is bounded by handling this many weights at a time.
_CHUNK = 1 << 22
# Tables of code values viewed as one wide element, so a single gather yields two (fp32) or four values.
_TABLE_VIEW = {torch.bfloat16: torch.int64, torch.float16: torch.int64, torch.float32: torch.int64}
_CODE_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


@dataclass
class QuantizedWeight:
    """A 2-D weight (out, in) in one of the formats; `data` holds codes, the rest the scales."""

    format: str
    shape: tuple[int, int]
    data: torch.Tensor  # nf4: uint8 (numel/2,), two codes per byte; int8: int8 (out, in)
    scales: torch.Tensor  # nf4: fp32 per block, or int8 per block padded to groups of 256; int8: fp32 per row
    scale_scales: torch.Tensor | None = None  # double quantization: fp32 per 256 blocks
    scale_mean: torch.Tensor | None = None  # double quantization: fp32 scalar

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {"data": self.data, "scales": self.scales}
        if self.scale_scales is not None:
            named.update(scale_scales=self.scale_scales, scale_mean=self.scale_mean)
        return named

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def check_quantizable(format: str, shape: tuple[int, ...], where: str) -> None:
    """Refuse, before any weight is read, a layer whose shape the format cannot store."""
    if format not in FORMATS:
        raise QuantizationError(f"quantize: unknown format {format!r}; expected one of none, {', '.join(FORMATS)}")
    if len(shape) != 2:
        raise QuantizationError(f"{where}: only 2-D weights can be quantized, got shape {tuple(shape)}")
    if format == "nf4" and (shape[0] * shape[1]) % NF4_BLOCK:
        raise QuantizationError(f"{where}: nf4 needs a weight size divisible by {NF4_BLOCK}, got shape {tuple(shape)}")


def quantize(weight: torch.Tensor, format: str, double_quant: bool = True) -> QuantizedWeight:
    """Quantize a 2-D (out, in) weight of any float dtype; the input is left untouched."""
    check_quantizable(format, tuple(weight.shape), "weight")
    weight = weight.detach()
    if format == "int8":
        return _quantize_int8(weight)
    return _quantize_nf4(weight, double_quant)


class Workspace:
    """Flat buffers reused across calls, one per role and dtype, grown to the largest request.

    A tensor `dequantize` returns from a workspace is overwritten by the next call: use it at once.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, role: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A `numel`-element view of the buffer for `role`, made or grown as needed."""
        key = (role, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            with torch.inference_mode(False):  # made in inference mode, it could not be written outside it
                buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel]


def dequantize(q: QuantizedWeight, dtype: torch.dtype = torch.bfloat16,
               workspace: Workspace | None = None) -> torch.Tensor:
    """The (out, in) weight in `dtype`; with a `workspace`, written into its buffers (see `Workspace`)."""
    space = workspace or Workspace()
    device = q.data.device
    kernels = kernels_for(device, dtype)
    if q.format == "int8":
        if kernels is None:
            return int8_codes(q, dtype, space).mul_(q.scales[:, None])
        out = space.get("values", q.data.numel(), dtype, device).view(q.shape)
        kernels.int8_dequantize(q.data.contiguous(), q.scales.float().contiguous(), out)
        return out
    if kernels is not None:
        out = space.get("values", q.data.numel() * 2, dtype, device)
        kernels.nf4_dequantize(q.data.contiguous(), _block_scales(q, space).float().contiguous(), NF4_CODEBOOK, out)
        return out.view(q.shape)
    table = _code_table(dtype, device)
    codes = q.data.view(torch.uint16) if table.numel() > 256 else q.data  # a gather per two bytes where it fits
    index = space.get("index", codes.numel(), torch.int32, device).copy_(codes)
    gathered = space.get("values", codes.numel(), table.dtype, device)
    torch.index_select(table, 0, index, out=gathered)
    values = gathered.view(dtype).view(-1, NF4_BLOCK)
    # scales in `dtype`: a bf16 tensor times fp32 scales takes a mixed-dtype path measured 5x slower
    return values.mul_(_block_scales(q, space).to(dtype)[:, None]).view(q.shape)


def int8_codes(q: QuantizedWeight, dtype: torch.dtype, workspace: Workspace) -> torch.Tensor:
    """An int8 weight's codes as (out, in) values in `dtype`, unscaled: exact in bf16 (|code| <= 127), so a
    product with them, scaled per output row afterwards, costs one conversion instead of a dequantization."""
    out = workspace.get("values", q.data.numel(), dtype, q.data.device).view(q.shape)
    return out.copy_(q.data)


def _quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    rows = max(1, _CHUNK // weight.shape[1])
    data = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], rows):
        part = weight[start:start + rows].float()
        scale = part.abs().amax(1).clamp_min(1e-12) / 127
        data[start:start + rows] = torch.round(part / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        scales[start:start + rows] = scale
    return QuantizedWeight("int8", tuple(weight.shape), data, scales)


def _quantize_nf4(weight: torch.Tensor, double_quant: bool) -> QuantizedWeight:
    flat = weight.reshape(-1, NF4_BLOCK)
    blocks = flat.shape[0]
    data = torch.empty(blocks, NF4_BLOCK // 2, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(blocks, dtype=torch.float32, device=weight.device)
    midpoints = _MIDPOINTS.to(weight.device)
    step = max(1, _CHUNK // NF4_BLOCK)
    for start in range(0, blocks, step):
        part = flat[start:start + step].float().contiguous()
        absmax = part.abs().amax(1)
        codes = torch.bucketize(part / absmax.clamp_min(1e-12)[:, None], midpoints).to(torch.uint8)
        data[start:start + step] = (codes[:, 0::2] << 4) | codes[:, 1::2]
        scales[start:start + step] = absmax
    q = QuantizedWeight("nf4", tuple(weight.shape), data.view(-1), scales)
    return _double_quantize(q) if double_quant else q


def _double_quantize(q: QuantizedWeight) -> QuantizedWeight:
    """Scales to int8: subtract their mean, then absmax-quantize each group of 256."""
    scales = q.scales
    mean = scales.mean()
    centred = scales - mean
    pad = (-centred.numel()) % SCALE_BLOCK
    groups = F.pad(centred, (0, pad)).view(-1, SCALE_BLOCK)
    group_scale = groups.abs().amax(1).clamp_min(1e-12) / 127
    codes = torch.round(groups / group_scale[:, None]).clamp_(-127, 127).to(torch.int8).view(-1)
    return QuantizedWeight("nf4", q.shape, q.data, codes, group_scale, mean)


def _block_scales(q: QuantizedWeight, space: Workspace) -> torch.Tensor:
    if q.scale_scales is None:
        return q.scales
    out = space.get("scales", q.scales.numel(), torch.float32, q.scales.device).view(-1, SCALE_BLOCK)
    torch.mul(q.scales.view(-1, SCALE_BLOCK), q.scale_scales[:, None], out=out)
    return out.add_(q.scale_mean).view(-1)[: q.data.numel() * 2 // NF4_BLOCK]


def _code_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The values of every byte's two codes in `dtype`, packed into one element twice as wide: (256,) for
    fp32, and for 2-byte dtypes (65536,) entries of two bytes' four values, a 512 KB table that stays in
    cache and halves the gathers (measured 1.4x faster than a byte at a time)."""
    key = (dtype, device)
    if key not in _CODE_TABLES:
        if dtype not in _TABLE_VIEW:
            raise QuantizationError(f"nf4 dequantization to {dtype} is not supported; use bf16, fp16 or fp32")
        pair_bytes = 2 if dtype.itemsize == 2 else 1
        index = torch.arange(256 ** pair_bytes)
        byte_values = [(index >> (8 * b)) & 0xFF for b in range(pair_bytes)]  # little-endian: first byte lowest
        values = [NF4_CODEBOOK[part] for byte in byte_values for part in (byte >> 4, byte & 15)]
        table = torch.stack(values, dim=1).to(dtype)
        _CODE_TABLES[key] = table.view(_TABLE_VIEW[dtype]).view(-1).to(device)
    return _CODE_TABLES[key]


def bytes_per_weight(format: str, double_quant: bool = True) -> float:
    """Storage per weight, scales included, for memory estimates."""
    if format == "int8":
        return 1.0  # plus 4 bytes per row, negligible
    scale = (1 + 4 / SCALE_BLOCK) if double_quant else 4
    return 0.5 + scale / NF4_BLOCK

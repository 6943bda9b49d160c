"""A frozen linear layer whose weight is stored quantized and dequantized on the fly.

Forward and backward each rebuild the weight once, in the compute dtype (bf16 under autocast); autograd
saves nothing of it, so a quantized layer costs its packed codes in memory, never a full-precision copy
that outlives one matmul. On the CPU the compiled kernels (`quant.native`) rebuild it in one pass. Without
them an int8 weight is not dequantized at all: its codes are exact in bf16, and its per-row scales multiply
the product's columns (forward) or the output gradient (backward), a conversion and a scaling of an
activation-sized tensor instead of a weight-sized one.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from loratune.core.layers import Conv1D
from loratune.errors import QuantizationError
from loratune.quant.int8_compute import Int8Linear
from loratune.quant.native import dequant_kernels, kernels_for
from loratune.quant.storage import QuantizedWeight, Workspace, check_quantizable, dequantize, int8_codes, quantize

# Shared by the quantized layers of a thread: each dequantized weight is used by one matmul, then overwritten.
_LOCAL = threading.local()


def shard_rows(length: int, rank: int, world: int) -> slice:
    """The rows of a tensor `length` rows long that FSDP2 (`Shard(0)`, cut as `torch.chunk` cuts) gives `rank`
    of `world`: ceil(length / world) each, the last ranks fewer or none."""
    size = -(-length // world)
    start = min(rank * size, length)
    return slice(start, min(start + size, length))


def workspace() -> Workspace:
    """This thread's reused buffers for rebuilt (dequantized or widened) weights."""
    if not hasattr(_LOCAL, "workspace"):
        _LOCAL.workspace = Workspace()
    return _LOCAL.workspace


class _DequantizedMatmul(torch.autograd.Function):
    """y = x @ W.T with W rebuilt from its codes in forward and again in backward (W takes no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        q = layer.packed
        if q.format == "int8" and kernels_for(x.device, x.dtype) is None:
            return F.linear(x, int8_codes(q, x.dtype, workspace())).mul_(q.scales.to(x.dtype))
        return F.linear(x, dequantize(q, x.dtype, workspace()))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        q = ctx.layer.packed
        if q.format == "int8" and kernels_for(grad.device, grad.dtype) is None:
            return (grad * q.scales.to(grad.dtype)) @ int8_codes(q, grad.dtype, workspace()), None
        return grad @ dequantize(q, grad.dtype, workspace()), None


class QuantLinear(nn.Linear):
    """`nn.Linear` with its weight in NF4 or int8 buffers. Always frozen; `weight` reads as dequantized.

    It subclasses `nn.Linear` so that code that looks for linear layers (LoRA targeting, `all-linear`)
    finds it, but it holds no weight parameter.
    """

    quantized = True
    compute = "dequantize"  # or "int8": int8 storage multiplied in int8 (see `quant.int8_compute`)

    def __init__(self, q: QuantizedWeight, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = q.shape
        self.format = q.format
        self.dtype = dtype  # what `weight` reads as: the dtype the dense layer had
        self.from_conv1d = False  # made from a transformers Conv1D: adapters record fan_in_fan_out
        self.double_quant = q.scale_scales is not None
        for key, tensor in q.tensors().items():
            self.register_buffer(key, tensor)
        self.full_shapes: dict[str, torch.Size] = {}  # set by `keep_shard`: the tensors holding only some rows
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        if q.data.device.type == "cpu" and not torch.cuda.is_available():  # a GPU run builds them only if used
            dequant_kernels()  # built (once, about 25 s) while the model loads, not in the first training step

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, format: str, double_quant: bool = True,
                    *, conv1d: bool = False, dtype: torch.dtype | None = None, where: str = "layer") -> QuantLinear:
        """Quantize a dense weight, (out, in) or, for a transformers `Conv1D`, (in, out)."""
        weight = weight.detach()
        weight_oi = weight.t() if conv1d else weight
        check_quantizable(format, tuple(weight_oi.shape), where)
        layer = cls(quantize(weight_oi, format, double_quant), bias, dtype or weight.dtype)
        layer.from_conv1d = conv1d
        return layer

    @classmethod
    def from_linear(cls, layer: nn.Module, format: str, double_quant: bool = True, where: str = "layer") -> QuantLinear:
        """Quantize an `nn.Linear` or a transformers `Conv1D`."""
        return cls.from_weight(layer.weight, layer.bias, format, double_quant, conv1d=isinstance(layer, Conv1D),
                               where=where)

    def shardable(self) -> list[str]:
        """The tensors FSDP2 shards (train.distributed): the codes and the per-block or per-row scales; the
        scalar mean of double quantization stays whole."""
        return [key for key in ("data", "scales", "scale_scales")
                if getattr(self, key, None) is not None and getattr(self, key).dim() > 0]

    def keep_shard(self, rank: int, world: int) -> None:
        """Keep only `rank`'s rows (`shard_rows`) of each shardable tensor, for FSDP2 to adopt as that rank's
        shard (`train.distributed.shard_blocks`), so the rank never holds the whole layer for long; the layer
        cannot run or be written until then."""
        for key in self.shardable():
            whole = self._buffers[key]
            self.full_shapes[key] = whole.shape
            self._buffers[key] = whole[shard_rows(whole.shape[0], rank, world)].clone()

    def _check_whole(self) -> None:
        if self.full_shapes:
            raise QuantizationError(f"a quantized layer ({self.out_features}x{self.in_features}) holds only this "
                                    "process's rows of its codes until FSDP2 shards its block")

    @property
    def packed(self) -> QuantizedWeight:
        self._check_whole()
        extra = (self.scale_scales, self.scale_mean) if self.double_quant else (None, None)
        return QuantizedWeight(self.format, (self.out_features, self.in_features), self.data, self.scales, *extra)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return dequantize(self.packed, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the dense layer's dtype, for model code that reads `layer.weight` (e.g. a
        dtype check before a projection); a fresh tensor on each read, so costly in a loop. While the layer holds
        only this process's rows (`keep_shard`), a stand-in of that shape and dtype on the meta device (model
        init code reads it: GPT-2's scales `c_proj.weight` in place)."""
        if self.full_shapes:
            return torch.empty(self.out_features, self.in_features, dtype=self.dtype, device="meta")
        return self.dequantize(self.dtype)

    def store(self, weight: torch.Tensor) -> None:
        """Replace the stored weight with a new (out, in) matrix, quantized in this layer's format."""
        self._check_whole()
        for key, tensor in quantize(weight, self.format, self.double_quant).tensors().items():
            setattr(self, key, tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_whole()
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        elif x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            x = x.float()
        if self.compute == "int8":
            out = Int8Linear.apply(x, self.data, self.scales)
        else:
            out = _DequantizedMatmul.apply(x, self)
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


def set_base_compute(model: nn.Module, compute: str) -> int:
    """Make every int8-stored `QuantLinear` of `model` multiply in int8 ("int8") or dequantize first
    ("dequantize"); returns how many layers changed."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and m.format == "int8"]
    for layer in layers:
        layer.compute = compute
    return len(layers)

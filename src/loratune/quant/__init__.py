"""Quantized frozen base weights (QLoRA): NF4 and int8 storage, quantized layers, low-memory loading."""

from loratune.quant.convert import MergeReport, QuantReport, check_model_quantizable, merge_quantized, quantize_model
from loratune.quant.linear import QuantLinear
from loratune.quant.storage import FORMATS, QuantizedWeight, dequantize, quantize

__all__ = [
    "FORMATS", "MergeReport", "QuantLinear", "QuantReport", "QuantizedWeight", "check_model_quantizable",
    "dequantize", "merge_quantized", "quantize", "quantize_model",
]

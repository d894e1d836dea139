"""Quantization: low-bit weight formats, the Linear layer that computes with them, and the size/quality report."""

from gptlab.quant.formats import SCHEMES, QuantSpec
from gptlab.quant.layers import QuantLinear, dequantize_model, quantize_model

__all__ = ["SCHEMES", "QuantLinear", "QuantSpec", "dequantize_model", "quantize_model"]

"""Inference-only speedups: they change how weights are stored, never what the model computes.

On an x86 CPU, `nn.Linear` with one row of input (decoding one sequence) runs well below the memory bandwidth: BLAS
in float32, oneDNN without a prepacked weight in bfloat16. Handing oneDNN a weight reordered once into its own
blocked layout, as `torch.compile` does when it freezes a model, gives the same products several times faster
(measured on 2 cores, benchmarks/generate.py: the 50257 x 768 head 8.7 ms -> 2.7 ms in float32 and 3.0 ms -> 0.9 ms
in bfloat16). Decoding is bound by reading the weights, so this is where gptlab's decode speed comes from.

A quantized model's layers go to kernels that multiply with their codes directly (`gptlab.quant.kernels`): they read
a quarter or an eighth of the float32 bytes, and compute in bfloat16.
"""

from __future__ import annotations

import platform

import torch
from torch import nn

from gptlab.model import GPT
from gptlab.quant.kernels import fuse_quantized


def packing_available(weight: torch.Tensor) -> bool:
    """oneDNN's prepacked products on an x86 CPU: float32 always, bfloat16 only where the CPU has bf16 instructions
    (AVX-512 BF16 / AMX / AVX-NE-CONVERT); elsewhere oneDNN refuses the bf16 reorder."""
    if weight.device.type != "cpu" or platform.machine().lower() not in ("x86_64", "amd64") or \
            not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if weight.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return weight.dtype == torch.float32


class PackedLinear(nn.Module):
    """`nn.Linear` for inference with its weight prepacked for oneDNN; same inputs, same outputs (B, ..., out)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, 1), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for oneDNN"


def prepare_for_inference(model: GPT, quantized_kernels: bool = True) -> GPT:
    """Put `model` in eval mode, swap its quantized layers for kernels on the CPU and, on an x86 CPU, its Linear
    layers for prepacked ones.

    The swap makes the model inference-only (no gradients through the swapped layers) and gives a tied output head its
    own packed copy. Logits change only by rounding: about 1e-6 in float32 for the packed layers, while the quantized
    kernels compute in bfloat16 (tests bound the logits against the dequantized model). `quantized_kernels=False`
    keeps the quantized layers' own products: slower, but what the dequantized model computes, in its dtype.
    """
    model.eval()
    if quantized_kernels:
        fuse_quantized(model)
    if not packing_available(model.transformer.wte.weight):
        return model
    with torch.no_grad():
        for module in list(model.modules()):
            for name, child in module.named_children():
                if isinstance(child, nn.Linear):
                    setattr(module, name, PackedLinear(child))
    return model

"""`QuantLinear`: a Linear layer whose weight is stored quantized and dequantized on the fly, and the functions that
swap a model's Linear layers for it and back.

The weight is rebuilt in the compute dtype for each product and dropped right after; in training its backward
rebuilds it again rather than keeping it (bitsandbytes' 4-bit layers do the same), so that only the low-bit copy
stays in memory. Computing with the dequantized weight makes a quantized model compute exactly what its dequantized
float copy computes (tests check the greedy tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from gptlab.errors import GptlabError
from gptlab.quant.formats import NESTED_BLOCK, QuantSpec, dequantize, quantize

SKIP = ("lm_head",)  # the output head stays in float, as bitsandbytes and transformers leave it
_SCALES = ("absmax", "nested_absmax", "nested_code", "offset")  # float32 whatever the model's dtype


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the product runs in: autocast's where it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _DequantLinear(torch.autograd.Function):
    """y = x W^T + b with W rebuilt from its codes in forward and again in backward (never saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:  # x (..., in) -> (..., out)
        dtype = compute_dtype(x)
        ctx.layer, ctx.x_dtype, ctx.dtype = layer, x.dtype, dtype
        bias = None if layer.bias is None else layer.bias.to(dtype)
        return nn.functional.linear(x.to(dtype), layer.dequantize(dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # grad (..., out) -> (..., in)
        w = ctx.layer.dequantize(ctx.dtype)  # (out, in)
        return (grad.to(ctx.dtype) @ w).to(ctx.x_dtype), None


class QuantLinear(nn.Module):
    """A frozen Linear stored as `qweight` plus scales (`gptlab.quant.formats`); the bias stays in float."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: QuantSpec,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features, self.spec, self.dtype = in_features, out_features, spec, dtype
        groups = out_features * in_features // spec.group(in_features)
        if spec.bits == 8:
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        else:
            self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                                        device=device))
        if spec.double_quant:
            self.register_buffer("absmax", torch.empty(groups, dtype=torch.uint8, device=device))
            self.register_buffer("nested_absmax", torch.empty(math.ceil(groups / NESTED_BLOCK), device=device))
            self.register_buffer("nested_code", torch.empty(256, device=device))
            self.register_buffer("offset", torch.empty((), device=device))
        else:
            self.register_buffer("absmax", torch.empty(groups, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device, dtype=dtype) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> QuantLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, spec,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        for name, value in quantize(linear.weight, spec).items():
            setattr(layer, name, value)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    def parts(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in ("qweight", *_SCALES) if getattr(self, n, None) is not None}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight (out, in) these codes stand for."""
        return dequantize(self.parts(), self.spec, (self.out_features, self.in_features), dtype or self.dtype)

    def to_linear(self) -> nn.Linear:
        """A plain float Linear with the dequantized weight (for merging adapters, or a float copy)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.qweight.device, dtype=self.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize(self.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return _DequantLinear.apply(x, self)  # without gradients, just its forward

    def _apply(self, fn: Callable, recurse: bool = True) -> QuantLinear:
        """`.to(dtype)` converts the bias and the compute dtype but never the float32 scales (only their device)."""
        scales = {n: self._buffers.pop(n) for n in _SCALES if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.qweight.device))
        self.dtype = probe.dtype
        for name, t in scales.items():
            self._buffers[name] = t.to(probe.device)
        return self

    def extra_repr(self) -> str:
        g = self.spec.group(self.in_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.spec.scheme}, group {g}" + (", double-quantized scales" if self.spec.double_quant else ""))


def quantizable(model: nn.Module, skip: Iterable[str] = SKIP) -> list[tuple[nn.Module, str, str, nn.Linear]]:
    """(parent, attribute, full name, layer) of every Linear that quantization replaces."""
    found = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Linear) and full not in skip:
                found.append((parent, child_name, full, child))
    return found


def quantize_model(model: nn.Module, spec: QuantSpec, skip: Iterable[str] = SKIP) -> nn.Module:
    """Replace every Linear (but the output head) by its quantized form, in place; the model records `spec`."""
    if getattr(model, "quantization", None) is not None:
        raise GptlabError(f"the model is already quantized ({model.quantization.scheme})")
    layers = quantizable(model, skip)
    for _, _, name, linear in layers:
        spec.check(name, linear.in_features)
    for parent, attr, _, linear in layers:
        if linear.weight.is_meta:  # a layout to load stored codes into
            q = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, spec, "meta",
                            linear.weight.dtype)
        else:
            q = QuantLinear.from_linear(linear, spec)
        setattr(parent, attr, q)
    model.quantization = spec
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Put a float Linear back in place of every QuantLinear, in place: the dequantized float copy."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantLinear):
                setattr(parent, name, child.to_linear())
    model.quantization = None
    return model

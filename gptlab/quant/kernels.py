"""Quantized products for inference on the CPU: a `QuantLinear`'s codes handed once, at load, to a kernel that
multiplies with them directly, instead of rebuilding the whole float weight for every product (`QuantLinear`, which
training keeps: it has a backward).

- int8, one scale per row: PyTorch's `_weight_int8pack_mm`, on the stored codes (out, in) with scales absmax / 127.
- int4: PyTorch's tinygemm CPU kernel `_weight_int4pack_mm_for_cpu`, which computes w = (q - 8) * scale + zero for
  codes q in 0..15, one (scale, zero) per group of 32, 64, 128 or 256 weights along the input. Our int4 codes are
  stored as q = c + 8 and stand for c * absmax / 7 (c in -7..7): scale = absmax / 7 and zero = 0 give the very same
  weights. A larger group is several kernel groups with the same scale.
- int8 in groups: a code c in -127..127 is exactly 16 h + l with h in -8..7 and l in 0..15, so the product is two
  tinygemm products: codes h + 8 with scale 16 s, and codes l with scale s and zero 8 s (s = absmax / 127).
- nf4, fp4: bitsandbytes' fused CPU kernel (`gemv_4bit`, registered on CPUs with AVX-512 BF16), on its CPU layout of
  the same codes (the one its own `Linear4bit` converts to for inference).

All three kernels are fast only with bfloat16 activations: in float32 or float16 they are slower than a float32
Linear. So the product runs in bfloat16 whatever the model's dtype (inputs cast to bf16, outputs back, the bias added
in the model's dtype), with each group's scale rounded to bf16 once. They are also matrix-vector kernels, whose time
grows with the rows of input: past `max_rows` rows (a long prompt, a big batch) a layer rebuilds its bf16 weight from
the kernel's layout and multiplies at once, which is faster there. Layers that no kernel takes (a width or group size
outside these, another device, bitsandbytes missing) stay `QuantLinear`.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from gptlab.quant.formats import QuantSpec, bnb, dequantize, has_bnb, scales, unpack_nibbles
from gptlab.quant.layers import QuantLinear

KERNEL_DTYPE = torch.bfloat16
TINYGEMM_GROUPS = (256, 128, 64, 32)  # group sizes `_weight_int4pack_mm_for_cpu` takes
TINYGEMM_BLOCKS = (64, 32)  # rows per block of its CPU layout: 64 where PyTorch runs AVX-512 code, 32 on AVX2
BNB_BLOCK_N = 32  # rows per block of bitsandbytes' CPU layout


class FusedQuantLinear(nn.Module):
    """A quantized Linear for inference only: (..., in) -> (..., out), the product done by `product` in bf16."""

    max_rows = 64  # input rows up to which the kernel beats rebuilding the weight (GPT-2's shapes, 2 cores with AMX)

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        self.in_features, self.out_features, self.spec = layer.in_features, layer.out_features, layer.spec
        self.register_buffer("bias", layer.bias, persistent=False)

    def product(self, x: torch.Tensor) -> torch.Tensor:  # (M, in) bf16 -> (M, out) bf16
        raise NotImplementedError

    def weight(self) -> torch.Tensor:
        """The (out, in) bf16 weight the kernel multiplies with, rebuilt from its layout."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        rows = x.reshape(-1, self.in_features).to(KERNEL_DTYPE).contiguous()  # (M, in)
        if rows.shape[0] <= self.max_rows:
            y = self.product(rows)  # (M, out)
        else:
            y = nn.functional.linear(rows, self.weight())
        y = y.to(x.dtype)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        g = self.spec.group(self.in_features)
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.scheme}, group {g}, " \
               f"{type(self).__name__.removesuffix('Linear').lower()} kernel"


class Int8Linear(FusedQuantLinear):
    """int8 with one scale per row: `_weight_int8pack_mm` reads the stored codes as they are."""

    max_rows = 24  # its weight is the cheapest to rebuild

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__(layer)
        self.register_buffer("codes", layer.qweight, persistent=False)  # (out, in) int8, shared with the checkpoint
        self.register_buffer("row_scales", (scales(layer.parts()) / 127).to(KERNEL_DTYPE), persistent=False)  # (out,)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.codes, self.row_scales)

    def weight(self) -> torch.Tensor:
        return self.codes.to(KERNEL_DTYPE) * self.row_scales[:, None]


class TinygemmLinear(FusedQuantLinear):
    """int4 (one tinygemm product) or int8 in groups (two): each part is tinygemm codes with (scale, zero) per group."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__(layer)
        out_f, in_f = self.out_features, self.in_features
        g = layer.spec.group(in_f)
        self.group = next(k for k in TINYGEMM_GROUPS if g % k == 0)
        s = scales(layer.parts()).view(out_f, in_f // g).repeat_interleave(g // self.group, dim=1)  # (out, in/group)
        zero = torch.zeros_like(s)
        if layer.spec.scheme == "int4":
            parts = [(unpack_nibbles(layer.qweight), s / 7, zero)]  # codes (out, in) 0..15
        else:
            c = layer.qweight  # (out, in) int8 -127..127 = 16 h + l
            s = s / 127
            parts = [((c >> 4) + 8, 16 * s, zero), (c & 15, s, 8 * s)]
        packed = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1) for q, _, _ in parts]
        self.register_buffer("packed", torch.stack(packed), persistent=False)  # (parts, out, in/2) uint8
        sz = [torch.stack((sc, z), dim=-1).transpose(0, 1) for _, sc, z in parts]  # (in/group, out, 2) each
        self.register_buffer("scales_zeros", torch.stack(sz).to(KERNEL_DTYPE), persistent=False)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        for packed, sz in zip(self.packed, self.scales_zeros):
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, self.group, sz)  # (M, out)
            y = part if y is None else y.add_(part)
        return y

    def weight(self) -> torch.Tensor:
        out_f, in_f, g = self.out_features, self.in_features, self.group
        q = [tinygemm_codes(p, out_f, in_f, tinygemm_block()).to(torch.int16) for p in self.packed]  # (out, in) each
        codes = q[0] - 8 if len(q) == 1 else (q[0] - 8) * 16 + q[1]  # the stored int4 or int8 codes, exactly
        scale = self.scales_zeros[-1, :, :, 0].T  # (out, in/group): absmax / 7, or / 127 (the low part's)
        return (codes.to(KERNEL_DTYPE).view(out_f, in_f // g, g) * scale[..., None]).view(out_f, in_f)


class Bnb4bitLinear(FusedQuantLinear):
    """nf4 / fp4 through bitsandbytes' fused CPU kernel, on its CPU layout of the same codes."""

    max_rows = 96

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__(layer)
        out_f, in_f = self.out_features, self.in_features
        self.group = layer.spec.group(in_f)
        self.register_buffer("codes", bnb_cpu_layout(unpack_nibbles(layer.qweight)), persistent=False)
        absmax = scales(layer.parts()).view(out_f, in_f // self.group).T  # (in/group, out)
        self.register_buffer("absmax", absmax.to(KERNEL_DTYPE).contiguous(), persistent=False)
        self.register_buffer("table", bnb().get_4bit_type(layer.spec.scheme, device="cpu"), persistent=False)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.bitsandbytes.gemv_4bit.default(x, self.codes, [self.out_features, self.in_features],
                                                        self.absmax, self.table, self.group)

    def weight(self) -> torch.Tensor:
        out_f, in_f = self.out_features, self.in_features
        parts = {"qweight": bnb_stored_layout(self.codes), "absmax": self.absmax.T.reshape(-1).float()}
        return dequantize(parts, self.spec, (out_f, in_f), KERNEL_DTYPE)


def tinygemm_codes(packed: torch.Tensor, out_f: int, in_f: int, block: int) -> torch.Tensor:
    """(out, in/2) bytes of `_convert_weight_to_int4pack_for_cpu` -> (out, in) codes 0..15. For each block of
    `block` rows (64 or 32) and each input, block / 2 bytes: the first half of the rows in the low nibbles, the
    second half in the high ones."""
    v = packed.view(out_f // block, in_f, block // 2)  # (out/block, in, block/2)
    return torch.stack((v & 15, v >> 4), dim=2).permute(0, 2, 3, 1).reshape(out_f, in_f)  # (out/block, 2, block/2, in)


@functools.cache
def tinygemm_block() -> int | None:
    """The rows per block of tinygemm's CPU layout in this PyTorch on this CPU (PyTorch picks it by the instructions
    it dispatches to), or None where neither known layout reads back (asked once)."""
    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        return None
    q = torch.randint(0, 16, (2 * max(TINYGEMM_BLOCKS), 64), generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    if packed.shape != (q.shape[0], q.shape[1] // 2):
        return None
    return next((b for b in TINYGEMM_BLOCKS if torch.equal(tinygemm_codes(packed, *q.shape, b), q)), None)


@functools.cache
def bnb_kernel_known() -> bool:
    """Whether bitsandbytes' fused CPU kernel is there and reads `bnb_cpu_layout` (asked once, on a small matrix): it
    registers it only on CPUs with AVX-512 BF16, and elsewhere its plain `gemv_4bit` would misread the layout."""
    if not has_bnb() or not bnb().has_avx512bf16():
        return False
    g = torch.Generator().manual_seed(0)
    linear = nn.utils.skip_init(nn.Linear, 64, 2 * BNB_BLOCK_N, bias=False)  # (no draw from the global generator)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=g))
    layer = QuantLinear.from_linear(linear, QuantSpec("nf4", 64))
    x = torch.randn(1, 64, generator=g).to(KERNEL_DTYPE)
    want = x.float() @ layer.dequantize(torch.float32).T  # (1, 64)
    got = Bnb4bitLinear(layer).product(x).float()
    return bool((got - want).abs().max() <= 0.02 * want.abs().max())


def bnb_cpu_layout(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) codes 0..15 -> (out, in/2) bytes as bitsandbytes' `_convert_weight_packed_for_cpu` lays them out:
    per block of 32 rows and pair of inputs, rows 0..15 in the low nibbles and rows 16..31 in the high ones."""
    out_f, in_f = codes.shape
    blocks = codes.view(out_f // BNB_BLOCK_N, BNB_BLOCK_N, in_f // 2, 2).transpose(1, 2)  # (out/32, in/2, 32, 2)
    halves = blocks.reshape(-1, 2, BNB_BLOCK_N)  # (out/32 * in/2, low | high, 32)
    return ((halves[:, 1] << 4) | halves[:, 0]).view(out_f, in_f // 2)


def bnb_stored_layout(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `bnb_cpu_layout`, straight to the stored bytes: (out, in/2) CPU layout -> (out, in/2) with each
    row's pairs of inputs in one byte, the first in the high nibble. Bytes 2r and 2r + 1 of a 32-byte run hold rows
    r and 16 + r of one pair of inputs."""
    out_f, half = packed.shape
    pairs = packed.view(out_f // BNB_BLOCK_N, half, BNB_BLOCK_N // 2, 2)  # (out/32, in/2, 16, first | second input)
    first, second = pairs.unbind(-1)  # (out/32, in/2, 16) each
    low_rows = (first << 4) | (second & 15)  # rows 0..15
    high_rows = (first & 0xF0) | (second >> 4)  # rows 16..31
    rows = torch.stack((low_rows, high_rows), dim=2)  # (out/32, in/2, 2, 16)
    return rows.permute(0, 2, 3, 1).reshape(out_f, half)


def kernel_for(layer: QuantLinear) -> type[FusedQuantLinear] | None:
    """The kernel that takes this layer's format and shape here, or None (the layer stays as it is)."""
    if layer.qweight.device.type != "cpu":
        return None
    spec: QuantSpec = layer.spec
    out_f, in_f = layer.out_features, layer.in_features
    g = spec.group(in_f)
    if spec.scheme == "int8" and g == in_f:
        # in bf16 the kernel gives wrong numbers (PyTorch 2.13) where the width is not a multiple of 16
        return Int8Linear if in_f % 16 == 0 and hasattr(torch.ops.aten, "_weight_int8pack_mm") else None
    if spec.scheme in ("int4", "int8"):
        block = tinygemm_block()
        ok = block is not None and any(g % k == 0 for k in TINYGEMM_GROUPS) and out_f % block == 0
        return TinygemmLinear if ok and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") else None
    return Bnb4bitLinear if out_f % BNB_BLOCK_N == 0 and bnb_kernel_known() else None


def fuse_quantized(model: nn.Module) -> int:
    """Swap every `QuantLinear` that a kernel takes for its inference-only form, in place; how many were swapped.
    Where 4-bit float layers (nf4, fp4) stay unfused for want of bitsandbytes' kernel, say so once on stderr: each of
    their products rebuilds the weight, several times slower than bf16 (int4 has a kernel on every x86 CPU)."""
    swapped, slow = 0, set()
    with torch.no_grad():
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                kind = kernel_for(child) if isinstance(child, QuantLinear) else None
                if kind is not None:
                    setattr(module, name, kind(child))
                    swapped += 1
                elif isinstance(child, QuantLinear) and child.qweight.device.type == "cpu" and \
                        child.spec.scheme in ("nf4", "fp4") and not bnb_kernel_known():
                    slow.add(child.spec.scheme)
    if slow:
        why = "bitsandbytes' needs AVX-512 BF16" if has_bnb() else "bitsandbytes is not installed"
        hint = "; int4 (gptlab quantize --scheme int4) runs on a kernel here" if tinygemm_block() else ""
        print(f"gptlab: note: this CPU has no fused {'/'.join(sorted(slow))} kernel ({why}), so each product "
              f"dequantizes its layer's weight, several times slower than bf16{hint}", file=sys.stderr)
    return swapped

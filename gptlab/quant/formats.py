"""Weight formats: how one float matrix becomes low-bit codes plus scales, and back.

Every scheme is blockwise absmax quantization along the input dimension: a group of `group_size` weights of one row
shares a float32 scale (its largest magnitude), and each weight is stored as the index of the nearest level in
[-1, 1] times that scale.

- nf4, fp4: bitsandbytes' 4-bit data types (QLoRA's NormalFloat, and its 4-bit float), quantized by bitsandbytes'
  own `quantize_4bit`, so that our codes and scales are its codes and scales (tests compare them).
- int4: 15 evenly spaced levels (-7..7)/7, the same bits and scales as nf4: the baseline of the QLoRA paper's
  NF4-vs-Int4 comparison. bitsandbytes has no such type, so it is plain PyTorch here.
- int8: 255 levels (-127..127)/127 with one scale per row by default: LLM.int8()'s weight format, checked against
  bitsandbytes' `int8_vectorwise_quant`.

Double quantization (QLoRA): the float32 scales of a 4-bit matrix are themselves quantized to 8 bits in blocks of
256 (bitsandbytes' dynamic map), after subtracting their mean: 0.5 bits per weight of scales become ~0.127.

4-bit codes are packed two per byte, the first weight in the high nibble (bitsandbytes' layout).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass

import torch

from gptlab.errors import GptlabError

SCHEMES = ("int8", "int4", "nf4", "fp4")
FOUR_BIT = ("int4", "nf4", "fp4")
DEFAULT_GROUP = {"int8": None, "int4": 64, "nf4": 64, "fp4": 64}  # None: one group per row
BNB_BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # block sizes bitsandbytes' 4-bit kernels take
NESTED_BLOCK = 256  # double quantization: scales per 8-bit block, as bitsandbytes does

# The 16 levels of each 4-bit type, indexed by code (bitsandbytes' tables; a test checks them against its own).
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
FP4_LEVELS = (0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
              -0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5,
              -0.1666666716337204, -0.25)
INT4_LEVELS = tuple((i - 8) / 7 for i in range(16))  # code 0 (-8/7) is never produced
LEVELS = {"nf4": NF4_LEVELS, "fp4": FP4_LEVELS, "int4": INT4_LEVELS}


@dataclass(frozen=True)
class QuantSpec:
    """What a quantized checkpoint records in its config.json under `quantization`."""

    scheme: str
    group_size: int | None = None  # weights per scale along the input; None: the scheme's default
    double_quant: bool = False

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise GptlabError(f"unknown quantization scheme {self.scheme!r}; schemes: {', '.join(SCHEMES)}")
        if self.double_quant and self.scheme not in FOUR_BIT:
            raise GptlabError(f"double quantization is for the 4-bit schemes ({', '.join(FOUR_BIT)}), not "
                              f"{self.scheme}")
        g = self.group_size
        if g is not None and (g < 2 or (self.scheme in FOUR_BIT and g % 2)):
            raise GptlabError(f"group size must be an even number >= 2, got {g}")
        if g is not None and self.scheme in ("nf4", "fp4") and g not in BNB_BLOCKS:
            raise GptlabError(f"{self.scheme} group size must be one of {', '.join(map(str, BNB_BLOCKS))} "
                              f"(bitsandbytes' block sizes), got {g}")

    @property
    def bits(self) -> int:
        return 8 if self.scheme == "int8" else 4

    def group(self, in_features: int) -> int:
        return self.group_size or DEFAULT_GROUP[self.scheme] or in_features

    def check(self, name: str, in_features: int) -> None:
        g = self.group(in_features)
        if in_features % g:
            raise GptlabError(f"group size {g} does not divide the width {in_features} of {name}; choose a "
                              "--group-size that divides every layer's input width")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QuantSpec:
        if not isinstance(data, dict) or set(data) - {"scheme", "group_size", "double_quant"}:
            raise GptlabError(f"unreadable quantization settings in config.json: {data!r}")
        return cls(**data)


def bnb():
    """bitsandbytes' functional module, or a clear error where it is not installed. Its CPU backend logs a warning
    about an optional kernel download at import; we never use that kernel, so the warning is kept quiet."""
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes.functional as F
    except ImportError:
        raise GptlabError("quantizing needs bitsandbytes: pip install 'gptlab[quant]'") from None
    return F


@functools.cache
def has_bnb() -> bool:
    """Whether bitsandbytes' kernels are there (asked once: every product of a quantized layer asks)."""
    try:
        bnb()
        return True
    except GptlabError:
        return False


def quantize(weight: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The stored form of a float matrix (out, in): `qweight` and its scales (`absmax`, or when double-quantized the
    8-bit `absmax` with `nested_absmax`, `nested_code` and `offset`)."""
    out_f, in_f = weight.shape
    g = spec.group(in_f)
    w = weight.detach().float()
    if spec.scheme in ("nf4", "fp4"):
        bnb()  # registers bitsandbytes' ops
        q, absmax = torch.ops.bitsandbytes.quantize_4bit.default(w, g, spec.scheme, torch.uint8)
        parts = {"qweight": q.view(out_f, in_f // 2), "absmax": absmax.float()}  # (out, in/2) uint8, (groups,)
    else:
        levels = 7 if spec.scheme == "int4" else 127
        groups = w.view(-1, g)  # (groups, g)
        absmax = groups.abs().amax(dim=1)  # (groups,)
        scale = torch.where(absmax > 0, levels / absmax, torch.zeros_like(absmax))
        codes = torch.round(groups * scale[:, None]).clamp_(-levels, levels).view(out_f, in_f)  # (out, in)
        if spec.scheme == "int8":
            parts = {"qweight": codes.to(torch.int8), "absmax": absmax}
        else:
            parts = {"qweight": pack_nibbles((codes + 8).to(torch.uint8)), "absmax": absmax}
    if spec.double_quant:
        parts.update(double_quantize(parts.pop("absmax")))
    return parts


def double_quantize(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """QLoRA's second quantization: (absmax - mean) in 8-bit blocks of 256 with bitsandbytes' dynamic map."""
    F = bnb()
    offset = absmax.mean()
    code = F.create_dynamic_map().to(absmax.device)
    q, nested = torch.ops.bitsandbytes.quantize_blockwise.default(absmax - offset, code, NESTED_BLOCK)
    return {"absmax": q, "nested_absmax": nested.float(), "nested_code": code, "offset": offset.reshape(())}


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) uint8 values 0..15 -> (out, in/2) bytes, the first of each pair in the high nibble."""
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(out, in/2) bytes -> (out, in) codes 0..15."""
    return torch.stack((packed >> 4, packed & 0x0F), dim=-1).flatten(-2)


def scales(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 absmax of every group, undoing double quantization where it was applied."""
    absmax = parts["absmax"]
    if "nested_absmax" not in parts:
        return absmax
    if has_bnb():
        out = torch.ops.bitsandbytes.dequantize_blockwise.default(
            absmax, parts["nested_absmax"], parts["nested_code"], NESTED_BLOCK, torch.float32)
    else:  # the same computation in plain PyTorch (a test checks that they agree)
        values = parts["nested_code"][absmax.long()]  # (groups,)
        per_block = parts["nested_absmax"].repeat_interleave(NESTED_BLOCK)[: values.numel()]
        out = values * per_block
    return out + parts["offset"]


def dequantize(parts: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float matrix (out, in) that the stored form stands for, in `dtype`."""
    out_f, in_f = shape
    g = spec.group(in_f)
    absmax = scales(parts)
    q = parts["qweight"]
    if spec.scheme in ("nf4", "fp4") and has_bnb() and dtype in (torch.float32, torch.bfloat16, torch.float16):
        return torch.ops.bitsandbytes.dequantize_4bit.default(q.reshape(-1, 1), absmax.float(), g, spec.scheme,
                                                              [out_f, in_f], dtype)
    if spec.scheme == "int8":
        levels = q.view(-1, g).to(dtype) * (1 / 127)  # (groups, g)
    else:
        table = torch.tensor(LEVELS[spec.scheme], dtype=dtype, device=q.device)
        levels = table[unpack_nibbles(q).long()].view(-1, g)  # (groups, g)
    return (levels * absmax.to(dtype)[:, None]).view(out_f, in_f)


def stored_bytes(out_f: int, in_f: int, spec: QuantSpec) -> int:
    """Bytes of a quantized (out, in) matrix: codes plus scales."""
    groups = out_f * in_f // spec.group(in_f)
    codes = out_f * in_f * spec.bits // 8
    if not spec.double_quant:
        return codes + 4 * groups
    return codes + groups + 4 * math.ceil(groups / NESTED_BLOCK) + 4 * 256 + 4

"""Rotary position embeddings and the ways families stretch them past their training context.

Each `rope_type` computes the inverse frequencies as transformers' `modeling_rope_utils` does, so that imported
models give the same logits: `linear` (position interpolation), `dynamic` (NTK-aware base growth once a sequence
passes the context), `yarn` (Peng et al. 2023: interpolate the slow dimensions, keep the fast ones, scale attention),
`longrope` (Phi-3/4: a learned factor per dimension, short or long by sequence length) and `llama3` (Llama 3.1+:
slow wavelengths divided by `factor`, fast ones kept, a smooth ramp between).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gptlab.errors import GptlabError

Rope = tuple[torch.Tensor, torch.Tensor]  # cos and sin tables (B, 1, T, rotary dims)

# rope_type -> (parameters it needs, parameters it may have)
SCALING: dict[str, tuple[set[str], set[str]]] = {
    "linear": ({"factor"}, set()),
    "dynamic": ({"factor"}, {"original_max_position_embeddings"}),  # gptlab's: the context growth starts past
    "yarn": ({"original_max_position_embeddings"},
             {"factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
    "longrope": ({"long_factor", "short_factor", "original_max_position_embeddings"}, {"factor", "attention_factor"}),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
}


def check_scaling(scaling: dict[str, Any] | None) -> None:
    """One line for a rope_type gptlab does not compute, or parameters it lacks or does not know."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise GptlabError(f"model.rope_scaling must be an object or null, got {scaling!r}")
    kind = scaling.get("rope_type")
    if kind not in SCALING:
        raise GptlabError(f"unsupported rope scaling {kind!r}; gptlab computes rope_type "
                          f"{', '.join(['default', *SCALING])}")
    need, may = SCALING[kind]
    missing, unknown = need - set(scaling), set(scaling) - need - may - {"rope_type"}
    if missing or unknown:
        what = f"lacks {', '.join(sorted(missing))}" if missing else f"has unknown {', '.join(sorted(unknown))}"
        raise GptlabError(f"rope scaling {kind!r} {what}")


class Frequencies:
    """A layer kind's inverse frequencies, computed once per device: `at(seq_len)` gives them (dims/2,) and the
    factor on cos and sin for rows `seq_len` (B, 1) long (read only by the length-dependent types, which then give
    (B, dims/2): each row's own, so a row's result does not depend on the batch it shares; with no host sync and no
    new host-to-device copy, so that a decode step can be captured in a CUDA graph). `context` is
    max_position_embeddings."""

    def __init__(self, dims: int, theta: float, scaling: dict[str, Any] | None, context: int,
                 device: torch.device) -> None:
        self.dims, self.theta, self.context = dims, theta, context
        self.exponents = torch.arange(0, dims, 2, device=device, dtype=torch.int64).float() / dims  # (dims/2,)
        self.s = scaling or {}
        self.kind = self.s.get("rope_type", "default")
        self.inv, self.attention = self._static(device)

    def _static(self, device: torch.device) -> tuple[torch.Tensor, float]:
        s, theta = self.s, self.theta
        inv = 1.0 / theta ** self.exponents
        if self.kind in ("default", "dynamic"):
            return inv, 1.0
        if self.kind == "linear":
            return inv / s["factor"], 1.0
        original = s["original_max_position_embeddings"]
        if self.kind == "llama3":
            factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > original / low, inv / factor, inv)  # slow dimensions: interpolated
            smooth = (original / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < original / high) * ~(wavelen > original / low)
            return torch.where(medium, smoothed, scaled), 1.0
        factor = s.get("factor") or self.context / original
        if self.kind == "longrope":  # Phi-3/4: a learned stretch per dimension pair, long past the original context
            attention = s.get("attention_factor")
            if attention is None:
                attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
            self.short = 1.0 / (torch.tensor(s["short_factor"], dtype=torch.float32, device=device) * theta **
                                self.exponents)
            self.long = 1.0 / (torch.tensor(s["long_factor"], dtype=torch.float32, device=device) * theta **
                               self.exponents)
            return self.short, attention
        return self._yarn(factor, original, device)

    def _yarn(self, factor: float, original: int, device: torch.device) -> tuple[torch.Tensor, float]:
        """YaRN: fast dimensions keep their frequency, slow ones are interpolated, a ramp between; attention scaled."""
        s, theta, dims = self.s, self.theta, self.dims
        attention = s.get("attention_factor")
        if attention is None:
            def mscale(scale: float, m: float = 1.0) -> float:
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

            if s.get("mscale") and s.get("mscale_all_dim"):
                attention = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
            else:
                attention = mscale(factor)
        fast, slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

        def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over the original context
            return dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = dim_of(fast), dim_of(slow)
        if s.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dims - 1)
        if lo == hi:
            hi += 0.001
        ramp = torch.clamp((torch.arange(dims // 2, dtype=torch.float32, device=device) - lo) / (hi - lo), 0, 1)
        keep = 1 - ramp  # 1: extrapolate (fast dimensions keep their frequency), 0: interpolate
        pos_freqs = theta ** self.exponents
        return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep, attention

    def at(self, seq_len: torch.Tensor) -> tuple[torch.Tensor, float]:
        if self.kind == "longrope":
            return torch.where(seq_len > self.s["original_max_position_embeddings"], self.long, self.short), \
                self.attention
        if self.kind == "dynamic":  # the base grows with the sequence past the original context; within it, plain
            original = self.s.get("original_max_position_embeddings", self.context)
            factor, length = self.s["factor"], torch.clamp(seq_len, min=original).float()
            base = self.theta * ((factor * length / original) - (factor - 1)) ** (self.dims / (self.dims - 2))
            return 1.0 / base ** self.exponents, 1.0
        return self.inv, self.attention


def rope_tables(pos: torch.Tensor, inv_freq: torch.Tensor, attention: float, dtype: torch.dtype) -> Rope:
    """cos and sin (B, 1, T, dims) at positions `pos` (B, T), in Hugging Face's half-split layout; `inv_freq` is
    (dims/2,), or (B, dims/2) where it depends on each row's length."""
    freqs = pos[..., None].float() * (inv_freq[:, None] if inv_freq.dim() == 2 else inv_freq)  # (B, T, dims/2)
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, dims)
    cos, sin = angles.cos(), angles.sin()
    if attention != 1.0:
        cos, sin = cos * attention, sin * attention
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `dims` dimensions of each head of x (B, nh, T, hs); the rest pass unchanged (Phi-4-mini)."""
    dims = cos.size(-1)
    turn, keep = x[..., :dims], x[..., dims:]
    x1, x2 = turn.chunk(2, dim=-1)
    turned = turn * cos + torch.cat([-x2, x1], dim=-1) * sin
    return turned if keep.size(-1) == 0 else torch.cat([turned, keep], dim=-1)  # (B, nh, T, hs)

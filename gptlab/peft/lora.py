"""LoRA (Hu et al. 2021): a frozen Linear plus a trainable low-rank update, y = W x + (alpha / r) B A x; and QLoRA
(Dettmers et al. 2023): the same adapters on a base whose Linear layers are frozen in 4-bit NormalFloat.

Laid out as peft lays it out (`lora_A`: r x in, `lora_B`: out x r, A Kaiming-uniform, B zero, so training starts
from the base model exactly), so that weights move between the two unchanged and the tests can compare logits.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from gptlab.checkpoint import read_weights
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.peft.base import ADAPTER, SmallMethod, float_kind, wrap_linears
from gptlab.quant.formats import QuantSpec
from gptlab.quant.layers import QuantLinear, dequantize_model, quantize_model

DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")  # GPT-2's names: qkv, both output projections, MLP in


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear | QuantLinear, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        kind = float_kind(base)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kind)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kind)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / r
        self.merged = False
        self.disabled = False  # the base alone (DPO's reference): `gptlab.peft.preference.adapters_off`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        if self.merged or self.disabled:
            return y
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in)

    @torch.no_grad()
    def merge(self) -> None:
        if isinstance(self.base, QuantLinear):  # merging into a quantized base gives a float layer
            self.base = self.base.to_linear()
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False


class LoRA(SmallMethod):
    name = "lora"
    lr = 2e-3  # low-rank updates from B = 0: larger steps than full fine-tuning

    def __init__(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 targets: tuple[str, ...] | list[str] | str = DEFAULT_TARGETS) -> None:
        if r < 1:
            raise GptlabError(f"lora.r must be >= 1, got {r}")
        self.r, self.alpha, self.dropout = r, float(alpha), float(dropout)
        self.targets = tuple(targets.split(",")) if isinstance(targets, str) else tuple(targets)
        super().__init__(r=r, alpha=alpha, dropout=dropout, targets=list(self.targets))

    def attach(self, model: GPT) -> None:
        model.requires_grad_(False)
        wrap_linears(model, self.targets, lambda lin: LoRALinear(lin, self.r, self.alpha, self.dropout),
                     "lora.targets")

    def restore(self, model: GPT, folder: Path) -> None:
        """Load the adapter; a layer stored with another rank (an adapter imported from peft, whose fused parts
        stack their ranks) gets A and B of that rank first."""
        weights = read_weights(folder / ADAPTER)
        for name, module in model.named_modules():
            a = weights.get(f"{name}.lora_A.weight")
            if isinstance(module, LoRALinear) and a is not None and a.shape[0] != module.lora_A.out_features:
                kind = float_kind(module.base)
                module.lora_A = nn.Linear(module.in_features, a.shape[0], bias=False, **kind)
                module.lora_B = nn.Linear(a.shape[0], module.out_features, bias=False, **kind)
        super().restore(model, folder)

    def fold(self, model: GPT) -> GPT:
        return merge_lora(model)


def merge_lora(model: GPT) -> GPT:
    """Fold every LoRA update into its base weight and put the plain Linear back: a float model like any other."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                setattr(parent, name, child.base)
    return model


class QLoRA(LoRA):
    """LoRA on a base quantized at attach time (NF4 with double-quantized scales by default); gradients flow through
    the 4-bit weights to the adapters, which stay in float. Saved as LoRA is: the adapters and the float base's
    reference; the base is quantized again, identically, when the checkpoint is loaded."""

    name = "qlora"
    paged_optimizer = True  # paged AdamW on CUDA, as in the paper: optimizer state pages out under memory spikes

    def __init__(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 targets: tuple[str, ...] | list[str] | str = DEFAULT_TARGETS, scheme: str = "nf4",
                 group_size: int = 64, double_quant: bool = True) -> None:
        super().__init__(r, alpha, dropout, targets)
        self.spec = QuantSpec(scheme, group_size, double_quant)
        self.settings.update(scheme=scheme, group_size=group_size, double_quant=double_quant)

    @property
    def base_quantization(self) -> QuantSpec:
        """Quantize the base while loading it, one matrix at a time: the float model never sits in memory whole."""
        return self.spec

    def attach(self, model: GPT) -> None:
        if model.quantization is None:
            quantize_model(model, self.spec)
        super().attach(model)

    def fold(self, model: GPT) -> GPT:
        return dequantize_model(merge_lora(model))

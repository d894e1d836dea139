"""Quantization-aware training: the Linear weights pass through fake quantization in the forward (the very
quantize-then-dequantize of `gptlab quantize`: int8 per row, int4 and NF4 per group) and the straight-through estimator
in the backward, so training learns weights that survive rounding. On the full model or on LoRA adapters; fake
quantization may start after some steps (`qat.start_step`).

A LoRA run fake-quantizes the merged weight `W + (alpha / r) B A`, which is what the quantized checkpoint will hold.
Each checkpoint of the run is a real quantized checkpoint (codes and scales, `config.json` with its `quantization`)
whose logits equal the fake-quantized forward of its step; `qat_master.safetensors` beside it keeps the float weights
that training goes on from (`--resume`). Generate, evaluate, serve and export take the folder as any quantized one.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from gptlab.checkpoint import model_state, read_weights, save_checkpoint
from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.files import atomic_write
from gptlab.model import GPT
from gptlab.peft.base import Method
from gptlab.peft.lora import LoRA, LoRALinear, merge_lora
from gptlab.quant.formats import QuantSpec, dequantize, quantize
from gptlab.quant.layers import SKIP, quantize_model
from gptlab.tokenizer import Tokenizer

MASTER = "qat_master.safetensors"
SCHEMES = ("int8", "int4", "nf4")


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`w` (out, in) as its quantized form stands for it, with the gradient passing straight through."""
    rounded = dequantize(quantize(w.detach(), spec), spec, tuple(w.shape), torch.float32).to(w.dtype)
    return w + (rounded - w).detach()


class QATLinear(nn.Linear):
    """A Linear (the same parameters, the same state-dict names) whose weight is fake-quantized while `active`."""

    spec: QuantSpec
    active: bool

    @classmethod
    def wrap(cls, linear: nn.Linear, spec: QuantSpec) -> QATLinear:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.spec, layer.active = spec, False
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        w = fake_quantize(self.weight, self.spec) if self.active else self.weight
        return F.linear(x, w, self.bias)


class QATLoRALinear(LoRALinear):
    """LoRA whose merged weight is fake-quantized while `active` (what the quantized checkpoint computes)."""

    spec: QuantSpec
    active: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if not self.active:
            return super().forward(x)
        merged = self.base.weight + self.delta().to(self.base.weight.dtype)  # (out, in)
        return F.linear(x, fake_quantize(merged, self.spec), self.base.bias)


def _targets(model: nn.Module) -> list[tuple[nn.Module, str, str, nn.Linear]]:
    """(parent, attribute, name, layer) of every Linear `gptlab quantize` would quantize."""
    found = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, (nn.Linear, LoRALinear)) and full not in SKIP and \
                    not isinstance(parent, LoRALinear):
                found.append((parent, child_name, full, child))
    return found


class QAT(Method):
    name = "qat"
    lr = 3e-4  # as full fine-tuning; with LoRA 2e-3
    uses_sections = ("lora",)  # the settings of the adapter it trains (qat.adapter lora) come from the lora section

    def __init__(self, scheme: str = "int4", group_size: int | None = None, start_step: int = 0,
                 adapter: str = "full", lora: dict[str, Any] | None = None) -> None:
        if scheme not in SCHEMES:
            raise GptlabError(f"qat.scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
        if adapter not in ("full", "lora"):
            raise GptlabError(f"qat.adapter must be full or lora, got {adapter!r}")
        if start_step < 0:
            raise GptlabError(f"qat.start_step must be >= 0, got {start_step}")
        if adapter == "lora" and (lora or {}).get("dropout", 0) > 0:
            raise GptlabError("qat.adapter lora fake-quantizes the merged weight W + (alpha / r) B A, which leaves no "
                              "place for lora.dropout: set it to 0")
        self.spec = QuantSpec(scheme, group_size)
        self.start_step, self.adapter = start_step, adapter
        self.inner: Method | None = LoRA(**(lora or {})) if adapter == "lora" else None
        # a float base either way: the quantized checkpoint is made from the float (merged) weights
        self.needs_float_weights = True
        self.lr = 2e-3 if adapter == "lora" else 3e-4
        super().__init__(scheme=scheme, group_size=group_size, start_step=start_step, adapter=adapter,
                         lora=(lora or {}) if adapter == "lora" else {})

    def check(self, config: ModelConfig) -> None:
        with torch.device("meta"):
            model = GPT(config)
        for _, _, name, linear in _targets(model):
            try:
                self.spec.check(name, linear.in_features)
            except GptlabError as e:
                raise GptlabError(str(e).replace("--group-size", "--qat.group_size")) from None

    def attach(self, model: GPT) -> None:
        if self.inner is not None:
            self.inner.attach(model)
        for parent, attr, _, layer in _targets(model):
            if isinstance(layer, LoRALinear):
                layer.__class__ = QATLoRALinear  # the same module, its forward fake-quantizing the merge
                layer.spec, layer.active = self.spec, False
            else:  # trained (full), or frozen outside LoRA's targets: quantized in the checkpoint all the same
                setattr(parent, attr, QATLinear.wrap(layer, self.spec))

    def trainable(self, model: GPT) -> list[tuple[str, nn.Parameter]]:
        return self.inner.trainable(model) if self.inner is not None else super().trainable(model)

    def begin_step(self, model: nn.Module, step: int) -> None:
        """Fake quantization from `start_step` on (steps counted from 0), the same on a resumed run."""
        for m in model.modules():
            if isinstance(m, (QATLinear, QATLoRALinear)):
                m.active = step >= self.start_step

    def save(self, folder: Path, model: GPT, weights: dict[str, torch.Tensor], tokenizer: Tokenizer,
             base: Path | None = None) -> None:
        """The float weights to resume from, and the real quantized checkpoint they stand for."""
        trainable = {n for n, _ in self.trainable(model)}
        master = model_state(model, weights) if self.inner is None else \
            {k: v.contiguous() for k, v in weights.items() if k in trainable}  # a tied head is stored once
        atomic_write(folder / MASTER, lambda tmp: save_file(master, tmp, metadata={"format": "pt"}))
        float_model = copy.deepcopy(model).cpu().float()  # frozen weights kept in bf16 for training come back
        if self.inner is not None:
            for m in float_model.modules():
                if isinstance(m, QATLoRALinear):
                    m.__class__ = LoRALinear
            merge_lora(float_model)
        save_checkpoint(folder, quantize_model(float_model, self.spec), tokenizer)

    def restore(self, model: GPT, folder: Path) -> None:
        _, unexpected = model.load_state_dict(read_weights(folder / MASTER), strict=False)
        if unexpected:
            raise GptlabError(f"{folder / MASTER} does not fit the model: unexpected {unexpected[0]}")

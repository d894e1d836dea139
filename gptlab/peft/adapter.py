"""Bottleneck adapters (Houlsby et al. 2019): after each sub-layer's output projection, a small residual MLP
h + up(gelu(down(h))), with `up` zero-initialised so training starts from the base model exactly. As in the paper,
the LayerNorms train too; everything else stays frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.peft.base import SmallMethod, float_kind, wrap_linears

DEFAULT_TARGETS = ("attn.c_proj", "mlp.c_proj")  # after attention and after the MLP, as Houlsby places them


class AdapterLinear(nn.Module):
    def __init__(self, base: nn.Module, bottleneck: int) -> None:
        super().__init__()
        self.base = base
        width = base.out_features
        self.down = nn.Linear(width, bottleneck, **float_kind(base))
        self.up = nn.Linear(bottleneck, width, **float_kind(base))
        nn.init.normal_(self.down.weight, std=1e-3)  # near-identity start, as in the paper
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)  # (..., width)
        return h + self.up(nn.functional.gelu(self.down(h)))


class Adapter(SmallMethod):
    name = "adapter"
    lr = 1e-3  # new bottleneck layers from a near-identity start

    def __init__(self, bottleneck: int = 64, targets: tuple[str, ...] | list[str] | str = DEFAULT_TARGETS,
                 train_norms: bool = True) -> None:
        if bottleneck < 1:
            raise GptlabError(f"adapter.bottleneck must be >= 1, got {bottleneck}")
        self.bottleneck, self.train_norms = bottleneck, train_norms
        self.targets = tuple(targets.split(",")) if isinstance(targets, str) else tuple(targets)
        super().__init__(bottleneck=bottleneck, targets=list(self.targets), train_norms=train_norms)

    def attach(self, model: GPT) -> None:
        model.requires_grad_(False)
        wrap_linears(model, self.targets, lambda lin: AdapterLinear(lin, self.bottleneck), "adapter.targets")
        for module in model.modules():
            if isinstance(module, AdapterLinear):
                for p in (*module.down.parameters(), *module.up.parameters()):
                    p.requires_grad_(True)
            elif isinstance(module, nn.LayerNorm) and self.train_norms:
                module.requires_grad_(True)

"""LoRA (Hu et al. 2021): a frozen Linear plus a trainable low-rank update, y = W x + (alpha / r) B A x.

Laid out as peft lays it out (`lora_A`: r x in, `lora_B`: out x r, A Kaiming-uniform, B zero, so training starts
from the base model exactly), so that weights move between the two unchanged and the tests can compare logits.
A checkpoint holds only A and B for every wrapped layer, plus a reference to the base folder and its fingerprint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from gptlab.checkpoint import read_weights
from gptlab.errors import GptlabError
from gptlab.files import atomic_write, atomic_write_text
from gptlab.model import GPT
from gptlab.peft.base import Method
from gptlab.tokenizer import Tokenizer

ADAPTER = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")  # GPT-2's names: qkv, both output projections, MLP in


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / r
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False


def fingerprint(folder: Path) -> str:
    """A cheap identity of a base checkpoint: its config, the weights' header (names, shapes) and their edges."""
    import hashlib

    h = hashlib.sha256((folder / "config.json").read_bytes())
    with open(folder / "model.safetensors", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        h.update(f.read(n))
        h.update(f.read(1 << 20))
        f.seek(max(0, (folder / "model.safetensors").stat().st_size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()


class LoRA(Method):
    name = "lora"

    def __init__(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 targets: tuple[str, ...] | list[str] | str = DEFAULT_TARGETS) -> None:
        if r < 1:
            raise GptlabError(f"lora.r must be >= 1, got {r}")
        self.r, self.alpha, self.dropout = r, float(alpha), float(dropout)
        self.targets = tuple(targets.split(",")) if isinstance(targets, str) else tuple(targets)
        super().__init__(r=r, alpha=alpha, dropout=dropout, targets=list(self.targets))

    def matches(self, name: str) -> bool:
        return any(name == t or name.endswith("." + t) for t in self.targets)

    def attach(self, model: GPT) -> None:
        model.requires_grad_(False)
        wrapped = 0
        for parent_name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                if isinstance(child, nn.Linear) and full != "lm_head" and self.matches(full):
                    setattr(parent, child_name, LoRALinear(child, self.r, self.alpha, self.dropout))
                    wrapped += 1
        if not wrapped:
            raise GptlabError(f"lora.targets {','.join(self.targets)} match no Linear layer of the model "
                              "(GPT-2 names: c_attn, attn.c_proj, c_fc, mlp.c_proj, c_proj)")

    def adapter_state(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in weights.items() if ".lora_A." in k or ".lora_B." in k}

    def save(self, folder: Path, model: GPT, weights: dict[str, torch.Tensor], tokenizer: Tokenizer,
             base: Path | None = None) -> None:
        if base is None:
            raise GptlabError("a LoRA checkpoint needs the folder of its base model")
        state = self.adapter_state(weights)
        atomic_write(folder / ADAPTER, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        config = {"method": self.name, **self.settings, "base": str(base.resolve()), "base_fingerprint":
                  fingerprint(base)}
        atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
        atomic_write(folder / "tokenizer.json", tokenizer.save)

    def restore(self, model: GPT, folder: Path) -> None:
        missing, unexpected = model.load_state_dict(read_weights(folder / ADAPTER), strict=False)
        if unexpected:
            raise GptlabError(f"{folder / ADAPTER} does not fit the model: unexpected {unexpected[0]}")


def merge_lora(model: GPT) -> GPT:
    """Fold every LoRA update into its base weight and put the plain Linear back: a float model like any other."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                setattr(parent, name, child.base)
    return model


def load_lora_folder(folder: Path) -> tuple[Path, dict]:
    """The base folder a LoRA checkpoint refers to (checked against its fingerprint) and its adapter config."""
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    base = Path(config["base"])
    if not (base / "config.json").is_file() or not (base / "model.safetensors").is_file():
        raise GptlabError(f"the base model of {folder} is missing: {base} (the adapter needs it)")
    if fingerprint(base) != config["base_fingerprint"]:
        raise GptlabError(f"the base model in {base} is not the one {folder} was trained on (fingerprint differs)")
    return base, config


def load_adapter_checkpoint(folder: Path) -> tuple[GPT, Tokenizer]:
    """A LoRA checkpoint as a plain float model: base + adapter, merged."""
    from gptlab.checkpoint import load_checkpoint

    for name in (ADAPTER_CONFIG, ADAPTER, "tokenizer.json"):
        if not (folder / name).is_file():
            raise GptlabError(f"{folder} is not a complete LoRA checkpoint: missing {name}")
    base, config = load_lora_folder(folder)
    model, _ = load_checkpoint(base)
    lora = LoRA(r=config["r"], alpha=config["alpha"], dropout=config["dropout"], targets=config["targets"])
    lora.attach(model)
    lora.restore(model, folder)
    return merge_lora(model).eval(), Tokenizer.from_file(folder / "tokenizer.json")

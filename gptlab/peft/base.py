"""The small protocol every training method follows, full training as its simplest case, and the checkpoint of a
parameter-efficient method (its own small weights beside a reference to the base).

A method attaches to a base model (wrapping or adding modules, freezing the rest), says which parameters train, and
writes and reads what a checkpoint of it holds. The training loop knows nothing else about it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from gptlab.checkpoint import WEIGHTS, read_weights, save_checkpoint
from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.files import atomic_write, atomic_write_text, read_json_object
from gptlab.model import GPT
from gptlab.quant.layers import QuantLinear
from gptlab.tokenizer import Tokenizer

ADAPTER = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def next_token_loss(forward: nn.Module, x: torch.Tensor, y: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean cross-entropy of the scored targets: pretraining's and every supervised method's loss."""
    return forward(x, y)[1], {}


class Method:
    """Full training: every parameter trains and a checkpoint is the whole model."""

    name = "full"
    lr = 3e-4  # the default learning rate for fine-tuning with this method (every weight moves: small steps)
    reserved_positions = 0  # context positions the method takes for itself (virtual tokens)
    needs_float_weights = True  # full training updates every weight: a quantized base cannot be trained this way
    paged_optimizer = False  # bitsandbytes' paged AdamW on CUDA (QLoRA)
    base_quantization = None  # a QuantSpec: the base is quantized while it is loaded (QLoRA)

    def __init__(self, **settings: Any) -> None:
        self.settings = settings

    def check(self, config: ModelConfig) -> None:
        """Refuse settings the base's shape cannot take (before anything is loaded)."""

    def begin_step(self, model: nn.Module, step: int) -> None:
        """Called before each optimizer step (counted from 0), on a resumed run as on a fresh one."""

    def loss(self, forward: nn.Module, x: torch.Tensor, y: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch's objective and the statistics logged with it (preference methods have their own)."""
        return next_token_loss(forward, x, y)

    def attach(self, model: GPT) -> None:
        """Wrap or freeze parts of `model` before training (full training changes nothing)."""

    def trainable(self, model: GPT) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def save(self, folder: Path, model: GPT, weights: dict[str, torch.Tensor], tokenizer: Tokenizer,
             base: Path | None = None) -> None:
        save_checkpoint(folder, model, tokenizer, state=weights)

    def restore(self, model: GPT, folder: Path) -> None:
        """Load what `save` wrote into the attached model (to resume)."""
        model.load_state_dict(read_weights(folder / WEIGHTS), strict=False)


def fingerprint(folder: Path) -> str:
    """A cheap identity of a base checkpoint: its config, the weights' header (names, shapes) and their edges."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    weights = folder / WEIGHTS
    with open(weights, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        h.update(f.read(n))
        h.update(f.read(1 << 20))
        f.seek(max(0, weights.stat().st_size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()


def float_kind(base: nn.Module) -> dict[str, Any]:
    """Device and dtype for the float weights a method adds beside `base` (a Linear, or a quantized one)."""
    if isinstance(base, QuantLinear):
        return {"device": base.qweight.device, "dtype": base.dtype}
    return {"device": base.weight.device, "dtype": base.weight.dtype}


def wrap_linears(model: GPT, targets: tuple[str, ...], wrap: Any, setting: str) -> int:
    """Replace every Linear (float or quantized) whose name is, or ends with, one of `targets` by `wrap(linear)`."""
    count = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, (nn.Linear, QuantLinear)) and full != "lm_head" and \
                    any(full == t or full.endswith("." + t) for t in targets):
                setattr(parent, child_name, wrap(child))
                count += 1
    if not count:
        raise GptlabError(f"{setting} {','.join(targets)} match no Linear layer of the model "
                          "(GPT-2 names: c_attn, attn.c_proj, c_fc, mlp.c_proj, c_proj)")
    return count


class SmallMethod(Method):
    """A method whose checkpoint is only its own trainable weights plus the base folder and its fingerprint."""

    needs_float_weights = False

    def save(self, folder: Path, model: GPT, weights: dict[str, torch.Tensor], tokenizer: Tokenizer,
             base: Path | None = None) -> None:
        if base is None:
            raise GptlabError(f"a {self.name} checkpoint needs the folder of its base model")
        trainable = {n for n, _ in self.trainable(model)}
        state = {k: v.contiguous() for k, v in weights.items() if k in trainable}
        atomic_write(folder / ADAPTER, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        config = {"method": self.name, **self.settings, "base": str(base.resolve()),
                  "base_fingerprint": fingerprint(base)}
        atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
        tokenizer.save_folder(folder)

    def restore(self, model: GPT, folder: Path) -> None:
        _, unexpected = model.load_state_dict(read_weights(folder / ADAPTER), strict=False)
        if unexpected:
            raise GptlabError(f"{folder / ADAPTER} does not fit the model: unexpected {unexpected[0]}")

    def fold(self, model: GPT) -> GPT:
        """Make the trained model plain for inference where the method allows (LoRA merges); default: as is."""
        return model


def load_adapter_checkpoint(folder: Path) -> tuple[GPT, Tokenizer]:
    """A small-method checkpoint as a model for inference: the base (checked against its fingerprint), the method
    attached, its weights restored, and folded where it can be."""
    from gptlab.checkpoint import load_checkpoint
    from gptlab.peft import METHODS

    for name in (ADAPTER_CONFIG, ADAPTER, "tokenizer.json"):
        if not (folder / name).is_file():
            raise GptlabError(f"{folder} is not a complete fine-tuned checkpoint: missing {name}")
    config = read_json_object(folder / ADAPTER_CONFIG, missing_ok=False)
    missing = [k for k in ("method", "base", "base_fingerprint") if not isinstance(config.get(k), str)]
    if missing:
        raise GptlabError(f"{folder / ADAPTER_CONFIG} lacks {', '.join(missing)}: it is not a gptlab fine-tuned run")
    base = Path(config.pop("base"))
    if base.resolve() == folder.resolve() or (base / ADAPTER_CONFIG).is_file():
        raise GptlabError(f"{folder / ADAPTER_CONFIG} names {base} as its base, which is itself a fine-tuned run; "
                          "a base must be a full checkpoint")
    if not (base / "config.json").is_file() or not (base / WEIGHTS).is_file():
        raise GptlabError(f"the base model of {folder} is missing: {base} (the adapter needs it)")
    if fingerprint(base) != config.pop("base_fingerprint"):
        raise GptlabError(f"the base model in {base} is not the one {folder} was trained on (fingerprint differs)")
    name = config.pop("method")
    if name not in METHODS:
        raise GptlabError(f"{folder / ADAPTER_CONFIG}: unknown method {name!r}")
    try:
        method = METHODS[name](**config)
    except TypeError as e:
        raise GptlabError(f"{folder / ADAPTER_CONFIG}: settings that {name} does not take ({e})") from None
    model, _ = load_checkpoint(base)
    tokenizer = Tokenizer.from_folder(folder)
    if tokenizer.vocab_size > model.config.vocab_size:
        model.resize_vocab(tokenizer.vocab_size)  # task tokens: the same deterministic rows as in training
    method.attach(model)
    method.restore(model, folder)
    return method.fold(model).eval(), tokenizer

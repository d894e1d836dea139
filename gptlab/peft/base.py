"""The small protocol every training method follows, and full training as its simplest case.

A method attaches to a base model (wrapping or adding modules, freezing the rest), says which parameters train, and
writes and reads what a checkpoint of it holds. The training loop knows nothing else about it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gptlab.checkpoint import WEIGHTS, read_weights, save_checkpoint
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer


class Method:
    """Full training: every parameter trains and a checkpoint is the whole model."""

    name = "full"

    def __init__(self, **settings: Any) -> None:
        self.settings = settings

    def attach(self, model: GPT) -> None:
        """Wrap or freeze parts of `model` before training (full training changes nothing)."""

    def trainable(self, model: GPT) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def save(self, folder: Path, model: GPT, weights: dict[str, torch.Tensor], tokenizer: Tokenizer,
             base: Path | None = None) -> None:
        save_checkpoint(folder, model, tokenizer, state=weights)

    def restore(self, model: GPT, folder: Path) -> None:
        """Load what `save` wrote into the attached model (to resume)."""
        state = read_weights(folder / WEIGHTS)
        model.load_state_dict(state, strict=False)

"""The checkpoint folder: `model.safetensors`, `config.json`, `tokenizer.json`, and nothing executable.

Loading validates before it builds: a missing file, a config that is not ours, or weights whose shapes disagree with
the config each give one clear `GptlabError`, never a traceback from deep inside `load_state_dict`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptlab import __version__
from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.files import atomic_write, atomic_write_text
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"


def model_state(model: GPT, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The weights to store (`state`, or the model's own): a tied head is the embedding, so it is stored once
    (safetensors refuses aliases)."""
    state = dict(model.state_dict() if state is None else state)
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_checkpoint(out: str | os.PathLike[str], model: GPT, tokenizer: Tokenizer,
                    state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the three files of a checkpoint folder, each atomically; `state` replaces the model's own weights
    (a full state gathered from sharded training)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = model_state(model, state)
    atomic_write(out / WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write(out / TOKENIZER, tokenizer.save)
    config = {"gptlab_version": __version__, "model": model.config.to_dict()}
    atomic_write_text(out / CONFIG, json.dumps(config, indent=2) + "\n")
    return out


def check_folder(path: str | os.PathLike[str], required: tuple[str, ...] = (CONFIG, WEIGHTS, TOKENIZER)) -> Path:
    path = Path(path)
    if not path.exists():
        raise GptlabError(f"checkpoint folder {path} does not exist")
    if not path.is_dir():
        raise GptlabError(f"{path} is not a folder; a checkpoint is a folder with {', '.join(required)}")
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise GptlabError(f"{path} is not a complete checkpoint: missing {', '.join(missing)}")
    return path


def read_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise GptlabError(f"cannot read {path}: {e}") from None


def load_model(config: ModelConfig, state: dict[str, torch.Tensor], source: str = WEIGHTS) -> GPT:
    """Build the model on the meta device and adopt `state` as its storage: no random init, no second copy."""
    model = build_checked(config, state, source)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    return model.eval()


def build_checked(config: ModelConfig, state: dict[str, torch.Tensor], source: str) -> GPT:
    with torch.device("meta"):
        model = GPT(config)
    expected = model.state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        extra = len(missing) + len(unexpected) - 1
        raise GptlabError(f"{source} does not match the model config: {what}" + (f" (+{extra} more)" if extra else ""))
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise GptlabError(f"{source} does not match the model config: {k} has shape {tuple(state[k].shape)}, "
                              f"the config needs {tuple(v.shape)}")
    return model


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer]:
    """Model (in eval mode) and tokenizer of a checkpoint folder; a fine-tuned folder of a small method gives its
    base with the method attached (LoRA merged in)."""
    if (Path(path) / "adapter_config.json").is_file():
        from gptlab.peft.base import load_adapter_checkpoint

        model, tokenizer = load_adapter_checkpoint(Path(path))
        return model.to(device=device, dtype=dtype), tokenizer
    path = check_folder(path)
    config = ModelConfig.from_json(str(path / CONFIG))
    tokenizer = Tokenizer.from_file(path / TOKENIZER)
    if tokenizer.vocab_size > config.vocab_size:
        raise GptlabError(f"{path / TOKENIZER} has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                          f"{config.vocab_size}")
    model = load_model(config, read_weights(path / WEIGHTS), str(path / WEIGHTS))
    return model.to(device=device, dtype=dtype), tokenizer

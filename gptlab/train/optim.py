"""AdamW with GPT-2's weight-decay split, and the learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from gptlab.errors import GptlabError
from gptlab.train.config import TrainConfig


def param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Decay matrices; never biases, norms or embeddings (decaying those only shrinks what the model represents)."""
    decay = [p for n, p in named if p.dim() >= 2 and "wte" not in n and "wpe" not in n]
    keep = [p for n, p in named if not (p.dim() >= 2 and "wte" not in n and "wpe" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def build_optimizer(named: list[tuple[str, nn.Parameter]], cfg: TrainConfig, device: torch.device,
                    sharded: bool = False, paged: bool = False) -> torch.optim.Optimizer:
    """`train.optimizer`: PyTorch's AdamW (fused where it has a kernel for the device, else foreach), or one of
    bitsandbytes': `adamw8bit` (moments in 8 bits: a quarter of the optimizer's memory), `paged_adamw` and
    `paged_adamw8bit` (state in CUDA unified memory, paged to the CPU under pressure; plain on a CPU). `paged` (QLoRA)
    turns the default into paged AdamW on CUDA."""
    kind = cfg.optimizer
    if kind == "adamw" and paged and device.type == "cuda" and not sharded:
        kind = "paged_adamw"
    if kind != "adamw":
        if sharded:
            raise GptlabError(f"train.optimizer {kind} (bitsandbytes) does not take FSDP-sharded parameters; use "
                              "adamw with train.distributed fsdp")
        from gptlab.quant.formats import bnb

        bnb()
        import bitsandbytes.optim as bnb_optim

        if device.type != "cuda":  # no unified memory to page: the same optimizer unpaged
            kind = kind.removeprefix("paged_")
        if kind == "adamw":
            return build_optimizer(named, dataclasses.replace(cfg, optimizer="adamw"), device)
        cls = {"adamw8bit": bnb_optim.AdamW8bit, "paged_adamw": bnb_optim.PagedAdamW,
               "paged_adamw8bit": bnb_optim.PagedAdamW8bit}[kind]
        return cls(param_groups(named, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    fused = not sharded and device.type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(named, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=fused or None, foreach=None if fused else True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then a cosine down to the floor at `decay_steps`, then the floor."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.decay_steps:
        return cfg.floor_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.decay_steps - cfg.warmup_steps)
    return cfg.floor_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.floor_lr)

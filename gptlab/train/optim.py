"""AdamW with GPT-2's weight-decay split, Muon for the blocks' matrices, and the learning-rate schedule."""

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


def is_hidden_matrix(name: str, p: nn.Parameter) -> bool:
    """A 2-D weight inside a transformer block: what Muon orthogonalizes (embeddings and the head stay with AdamW,
    as Keller Jordan's Muon and modded-nanogpt keep them)."""
    return p.dim() == 2 and ".h." in f".{name}"


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic Newton-Schulz, as torch.optim.Muon's


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """About the nearest semi-orthogonal matrix to each g (..., A, B), U V^T of its SVD, by a Newton-Schulz iteration
    in bf16: torch.optim.Muon's, step for step. Matrices of one shape go as one batch: on a CPU the small products
    cost their dispatch more than their arithmetic (4 layers of a 128-wide model: 15 ms a step one by one, 8.6 ms
    batched, measured on 2 cores)."""
    a, b, c = NS_COEFFICIENTS
    tall = g.size(-2) > g.size(-1)
    x = (g.bfloat16().mT if tall else g.bfloat16()).reshape(-1, *sorted(g.shape[-2:]))  # (N, short, long)
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.mT  # (N, short, short): the Gram matrix is the small one
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.view(*g.shape[:-2], *x.shape[-2:])
    return x.mT if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the blocks' matrices and AdamW for the rest, as one optimizer: one state dict that saves and resumes
    (and that torch.distributed.checkpoint maps to parameter names), one list of param groups for the schedule, one
    `step` for the loop and the gradient scaler. Each group's `lr_scale` is its peak learning rate over `train.lr`,
    so that the one schedule drives both.

    The Muon update is torch.optim.Muon's (Nesterov momentum, Newton-Schulz, the learning rate scaled by
    sqrt(max(1, rows / columns)), decoupled weight decay; a test holds the two equal), computed here because an
    FSDP2 shard must be orthogonalized as the whole matrix: torch's, handed a sharded DTensor, is not."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], cfg: TrainConfig, fused: bool) -> None:
        matrices = [p for n, p in named if is_hidden_matrix(n, p)]
        rest = [(n, p) for n, p in named if not is_hidden_matrix(n, p)]
        self.adamw = torch.optim.AdamW([{**g, "lr_scale": 1.0} for g in param_groups(rest, cfg.weight_decay)],
                                       lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None,
                                       foreach=None if fused else True)
        muon = {"params": matrices, "muon": True, "lr": cfg.muon_lr, "lr_scale": cfg.muon_lr / cfg.lr,
                "momentum": cfg.muon_momentum, "weight_decay": cfg.muon_weight_decay}
        super().__init__([muon, *self.adamw.param_groups], {})  # AdamW's group dicts themselves: shared
        self._link()

    def _link(self) -> None:
        """Point the inner AdamW at this optimizer's groups and state (loading a state dict makes new ones)."""
        self.adamw.param_groups = [g for g in self.param_groups if not g.get("muon")]
        self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            if group.get("muon"):
                self._muon([p for p in group["params"] if p.grad is not None], group)
        self.adamw.step()

    def _muon(self, params: list[torch.Tensor], group: dict) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        updates = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - group["momentum"])
            updates.append(p.grad.lerp(buf, group["momentum"]))  # Nesterov
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, (p, u) in enumerate(zip(params, updates)):
            if isinstance(u, DTensor):  # this process's rows: gather the matrix, orthogonalize, keep our rows
                updates[i] = distribute_tensor(orthogonalize(u.full_tensor()), p.device_mesh, p.placements,
                                               src_data_rank=None)
            else:
                by_shape.setdefault(tuple(u.shape), []).append(i)
        for idx in by_shape.values():
            for i, o in zip(idx, orthogonalize(torch.stack([updates[i] for i in idx])).unbind()):  # (N, A, B)
                updates[i] = o
        for p, update in zip(params, updates):
            rows, cols = p.shape
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update, alpha=-group["lr"] * max(1, rows / cols) ** 0.5)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()


def build_optimizer(named: list[tuple[str, nn.Parameter]], cfg: TrainConfig, device: torch.device,
                    sharded: bool = False, paged: bool = False) -> torch.optim.Optimizer:
    """`train.optimizer`: PyTorch's AdamW (fused where it has a kernel for the device, else foreach), or one of
    bitsandbytes': `adamw8bit` (moments in 8 bits: a quarter of the optimizer's memory), `paged_adamw` and
    `paged_adamw8bit` (state in CUDA unified memory, paged to the CPU under pressure; plain on a CPU); or `muon`
    (`MuonAdamW`). `paged` (QLoRA) turns the default into paged AdamW on CUDA."""
    kind = cfg.optimizer
    fused = not sharded and device.type in ("cpu", "cuda")
    if kind == "muon":
        return MuonAdamW(named, cfg, fused)
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
    return torch.optim.AdamW(param_groups(named, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=fused or None, foreach=None if fused else True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then down to the floor at `decay_steps` (a cosine, or flat and then a straight line
    over the last `cooldown_fraction`), then the floor."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.decay_steps:
        return cfg.floor_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.decay_steps - cfg.warmup_steps)  # 0 -> 1
    if cfg.schedule == "wsd":
        return cfg.floor_lr + min(1.0, (1 - progress) / cfg.cooldown_fraction) * (cfg.lr - cfg.floor_lr)
    return cfg.floor_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.floor_lr)

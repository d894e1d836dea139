"""Preference tuning through the one loop: DPO (Rafailov et al. 2023), its IPO and robust variants, and ORPO (Hong
et al. 2024), each on LoRA adapters or on the full model.

A batch holds each preference as two rows, chosen then rejected (`gptlab.data.preferences`); a completion's
log-probability is the sum of its tokens' log-probabilities (the prompt is not scored). DPO's loss is
`-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`. Its reference model costs no second copy with LoRA: it is
the same model with the adapters switched off; with full fine-tuning it is a frozen copy of the base. ORPO needs no
reference: the log odds ratio of the chosen over the rejected completion (log-probabilities averaged per token),
`beta * logsigmoid(log_odds)`, is subtracted from the chosen row's cross-entropy (which TRL takes over the prompt and
the completion; so does this, so that the two compute the same loss).

What a run saves is its adapter's run (a LoRA run) or a full checkpoint: generate, serve, export and quantize take it
as they take any other.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.peft.base import Method
from gptlab.peft.lora import LoRA, LoRALinear
from gptlab.tokenizer import Tokenizer

DPO_LOSSES = ("sigmoid", "robust", "ipo")
ADAPTERS = ("lora", "full")


LOGP_ROWS = 128  # positions per chunk of the log-softmax: its float32 temporaries are (rows x vocab), not (N x vocab)


class TokenLogProbs(torch.autograd.Function):
    """Each position's log-probability of its target, `log_softmax(logits).gather(targets)`, a chunk of positions at a
    time. Forward keeps the logits (the output layer made them anyway) and each position's log-sum-exp; backward writes
    `grad * (one_hot(target) - softmax)` chunk by chunk into the one (N, V) gradient. The same numbers as autograd's
    logsumexp and gather, without their (N, V) temporaries: a float32 copy, the shifted exponentials, the softmax and
    the zeros the gather's gradient is scattered into (with GPT-2's 50K vocabulary each is 200 MB for 1K positions)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # logits (N, V) in any float dtype, targets (N,) valid ids -> (N,) float32
        lse = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.size(0), LOGP_ROWS):
            part = slice(start, start + LOGP_ROWS)
            lse[part] = torch.logsumexp(logits[part].float(), dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        return logits.gather(1, targets[:, None])[:, 0].float() - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        out = torch.empty_like(logits)  # (N, V)
        g = grad.float()[:, None]  # (N, 1)
        for start in range(0, logits.size(0), LOGP_ROWS):
            part = slice(start, start + LOGP_ROWS)
            if out.dtype == torch.float32:  # the chunk's softmax made in the gradient's own memory
                p = torch.sub(logits[part], lse[part, None], out=out[part])  # (n, V)
            else:  # in float32 first, as the forward's
                p = logits[part].float() - lse[part, None]
            p.exp_().mul_(-g[part]).scatter_add_(1, targets[part, None], g[part])
            if p.dtype != out.dtype:
                out[part] = p
        return out, None


def completion_logps(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its scored targets, and their number: (N,), (N,)."""
    scored = y != -100  # (N, T)
    logp = TokenLogProbs.apply(logits.flatten(0, 1), y.clamp(min=0).flatten()).view(y.shape)  # (N, T)
    return (logp * scored).sum(-1), scored.sum(-1)


def scored_logps(forward: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`completion_logps` with the output layer applied at the scored positions only (the prompt's logits are never
    made): (N,), (N,)."""
    scored = y != -100  # (N, T)
    logp = TokenLogProbs.apply(forward(x, scored=scored), y[scored])  # (n,) the scored positions, row by row
    rows = torch.arange(y.size(0), device=y.device)[:, None].expand_as(y)[scored]  # (n,) each one's row
    return torch.zeros(y.size(0), device=y.device).index_add(0, rows, logp), scored.sum(-1)


@contextlib.contextmanager
def adapters_off(module: nn.Module) -> Iterator[None]:
    """The base model alone: every LoRA update skipped (DPO's reference, as peft's `disable_adapter`)."""
    layers = [m for m in module.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m in layers:
            m.disabled = False


def no_dropout(model: nn.Module) -> None:
    """Dropout off everywhere, adapters included (TRL's `disable_dropout`): the policy's and the reference's
    log-probabilities must differ by what training changed, not by noise."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "dropout", None), float):  # attention's own dropout probability
            m.dropout = 0.0


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class PreferenceMethod(Method):
    """What DPO and ORPO share: the adapter they train, and what a checkpoint of them is (the adapter's)."""

    data = "preferences"  # the fine-tuning data this method reads
    uses_sections = ("lora",)  # the settings of the adapter it trains come from the lora section

    def __init__(self, beta: float = 0.1, adapter: str = "lora", lora: dict[str, Any] | None = None,
                 **settings: Any) -> None:
        if adapter not in ADAPTERS:
            raise GptlabError(f"{self.name}.adapter must be lora or full, got {adapter!r}")
        if not beta > 0:
            raise GptlabError(f"{self.name}.beta must be > 0, got {beta}")
        self.beta, self.adapter = float(beta), adapter
        self.inner: Method = LoRA(**(lora or {})) if adapter == "lora" else Method()
        self.needs_float_weights = self.inner.needs_float_weights
        self.lr = 5e-4 if adapter == "lora" else 5e-6
        super().__init__(beta=beta, adapter=adapter, lora=(lora or {}) if adapter == "lora" else {}, **settings)

    lr = 5e-4  # with LoRA; 5e-6 with the full model: preferences move a tuned model a little

    def attach(self, model: GPT) -> None:
        self.inner.attach(model)
        no_dropout(model)

    def trainable(self, model: GPT) -> list[tuple[str, nn.Parameter]]:
        return self.inner.trainable(model)

    def save(self, folder: Path, model: GPT, weights: dict[str, torch.Tensor], tokenizer: Tokenizer,
             base: Path | None = None) -> None:
        self.inner.save(folder, model, weights, tokenizer, base)

    def restore(self, model: GPT, folder: Path) -> None:
        self.inner.restore(model, folder)

    def fold(self, model: GPT) -> GPT:
        return self.inner.fold(model)

    def check(self, config: ModelConfig) -> None:
        self.inner.check(config)

    @staticmethod
    def rewards(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
        """The statistics TRL logs, from each pair's implicit rewards (B,), (B,)."""
        return {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                "rewards/accuracies": (chosen > rejected).float().mean(), "rewards/margins": (chosen - rejected).mean()}


class DPO(PreferenceMethod):
    name = "dpo"

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 adapter: str = "lora", lora: dict[str, Any] | None = None) -> None:
        if loss_type not in DPO_LOSSES:
            raise GptlabError(f"dpo.loss_type must be one of {', '.join(DPO_LOSSES)}, got {loss_type!r}")
        if not 0 <= label_smoothing < 0.5:
            raise GptlabError(f"dpo.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.loss_type, self.label_smoothing = loss_type, float(label_smoothing)
        self.reference: GPT | None = None
        super().__init__(beta, adapter, lora, loss_type=loss_type, label_smoothing=label_smoothing)

    def attach(self, model: GPT) -> None:
        super().attach(model)
        if self.adapter == "full":  # the frozen base, before any step moves it
            self.reference = copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def reference_logps(self, forward: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.reference is None:
            with adapters_off(forward):
                return scored_logps(forward, x, y)[0]
        self.reference.to(x.device)
        return scored_logps(self.reference, x, y)[0]

    def loss(self, forward: nn.Module, x: torch.Tensor, y: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # the reference first: its forward's memory is freed before the policy's activations are kept for backward
        ref = self.reference_logps(forward, x, y)
        logps, counts = scored_logps(forward, x, y)  # (2B,): rows 2i and 2i + 1 are a pair
        chosen, rejected = logps[0::2] - ref[0::2], logps[1::2] - ref[1::2]  # log-ratios to the reference (B,)
        delta = chosen - rejected
        if self.loss_type == "ipo":  # Azar et al. eq. 17, on per-token ratios (as TRL and the authors normalize)
            delta = chosen / counts[0::2].clamp(min=1) - rejected / counts[1::2].clamp(min=1)
            losses = (delta - 1 / (2 * self.beta)) ** 2
        elif self.loss_type == "robust":  # Chowdhury et al.: unbiased when a label_smoothing share of pairs is flipped
            ls = self.label_smoothing
            clean, flipped = F.logsigmoid(self.beta * delta), F.logsigmoid(-self.beta * delta)
            losses = (-(1 - ls) * clean + ls * flipped) / (1 - 2 * ls)
        else:  # the DPO paper's loss; label smoothing as conservative DPO (the labels trusted with 1 - ls)
            ls = self.label_smoothing
            losses = -(1 - ls) * F.logsigmoid(self.beta * delta) - ls * F.logsigmoid(-self.beta * delta)
        stats = self.rewards(self.beta * chosen.detach(), self.beta * rejected.detach())
        stats.update({"logps/chosen": logps[0::2].detach().mean(), "logps/rejected": logps[1::2].detach().mean()})
        return losses.mean(), stats


class ORPO(PreferenceMethod):
    name = "orpo"

    def loss(self, forward: nn.Module, x: torch.Tensor, y: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = forward(x)  # (2B, T, V)
        logps, counts = completion_logps(logits, y)
        avg = logps / counts.clamp(min=1)  # per-token log-probabilities (2B,)
        chosen, rejected = avg[0::2], avg[1::2]
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))  # (B,)
        ratio = F.logsigmoid(log_odds)
        # the chosen rows' cross-entropy over every real token after the first: prompt and completion (as TRL)
        T = y.size(1)
        last = torch.where(y != -100, torch.arange(T, device=y.device), -1).amax(-1, keepdim=True)  # (2B, 1)
        targets = torch.where(y != -100, y, torch.cat([x[:, 1:], x[:, -1:]], dim=1))
        targets = targets.masked_fill(torch.arange(T, device=y.device) > last, -100)[0::2]  # (B, T)
        nll = F.cross_entropy(logits[0::2].float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        stats = self.rewards(self.beta * chosen.detach(), self.beta * rejected.detach())
        stats.update({"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean(),
                      "log_odds_chosen": log_odds.detach().mean()})
        return nll - self.beta * ratio.mean(), stats

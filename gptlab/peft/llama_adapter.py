"""LLaMA-Adapter (Zhang et al. 2023): learned adaption prompts in the top layers, attended to through a separate
softmax whose output is scaled by a gate that starts at zero, so training starts from the base model exactly and
the prompts' influence grows only as it helps.
"""

from __future__ import annotations

import torch
from torch import nn

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.peft.base import SmallMethod


class AdaptionPrompt(nn.Module):
    def __init__(self, n: int, width: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.prompt = nn.Parameter(torch.randn(n, width) * 0.02)  # (n, C)
        self.gate = nn.Parameter(torch.zeros(n_head))  # one per head, zero: no effect at the start

    def forward(self, q: torch.Tensor, attn: nn.Module) -> torch.Tensor:
        """The gated attention of queries q (B, nh, T, hs) over the prompt's keys and values."""
        B, nh, T, hs = q.shape
        _, k, v = attn.c_attn(self.prompt).split(attn.sizes, dim=-1)  # the layer's own projections (and key norm)
        if attn.qk_norm == "all":
            k = attn.k_norm(k)
        k = k.view(-1, attn.n_kv, hs)
        if attn.qk_norm == "head":
            k = attn.k_norm(k)
        k = k.transpose(0, 1).repeat_interleave(nh // attn.n_kv, dim=0)  # (nh, n, hs)
        v = v.view(-1, attn.n_kv, hs).transpose(0, 1).repeat_interleave(nh // attn.n_kv, dim=0)
        scores = (q @ k.transpose(-1, -2)) * attn.scale  # (B, nh, T, n)
        return self.gate.view(1, nh, 1, 1) * (scores.softmax(dim=-1) @ v)  # (B, nh, T, hs)


class LlamaAdapter(SmallMethod):
    name = "llama-adapter"
    lr = 9e-3  # zero-initialised gates must open first (the LLaMA-Adapter paper's rate)

    def __init__(self, virtual_tokens: int = 10, layers: int | None = None) -> None:
        if virtual_tokens < 1 or (layers is not None and layers < 1):
            raise GptlabError("llama_adapter.virtual_tokens and llama_adapter.layers must be >= 1")
        self.n, self.layers = virtual_tokens, layers
        super().__init__(virtual_tokens=virtual_tokens, layers=layers)

    def check(self, config: ModelConfig) -> None:
        if self.layers is not None and self.layers > config.n_layer:
            raise GptlabError(f"llama_adapter.layers is {self.layers}, but the model has {config.n_layer} layers")

    def attach(self, model: GPT) -> None:
        model.requires_grad_(False)
        cfg, wte = model.config, model.transformer.wte.weight
        top = min(self.layers or 8, cfg.n_layer)  # the paper's top 8 by default
        for block in model.transformer.h[-top:]:  # the top layers, as in the paper
            block.attn.adaption = AdaptionPrompt(self.n, cfg.n_embd, cfg.n_head).to(wte.device, wte.dtype)

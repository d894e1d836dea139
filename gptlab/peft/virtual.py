"""Virtual tokens: soft prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021).

Prompt tuning learns n input embeddings placed before the text; prefix tuning learns, for every layer, n keys and
values that every query attends to, produced during training by a small reparameterisation MLP. Both are laid out as
peft lays them out (`prompt.embedding`, `prefix.embedding` and `prefix.transform.{0,2}`), so the tests can compare
logits with peft's.

After training both fold into fixed per-layer keys and values (`StaticPrefix`): the MLP is evaluated once, and the
soft prompt is run through the frozen model once, since what the text sees of it never changes.
"""

from __future__ import annotations

import torch
from torch import nn

from gptlab.errors import GptlabError
from gptlab.model import GPT, KVCache
from gptlab.peft.base import SmallMethod


class PromptEmbedding(nn.Module):
    def __init__(self, n: int, width: int) -> None:
        super().__init__()
        self.n = n
        self.embedding = nn.Embedding(n, width)

    def forward(self, batch: int) -> torch.Tensor:
        return self.embedding.weight[None].expand(batch, -1, -1)  # (B, n, C)


class PrefixEncoder(nn.Module):
    """n virtual tokens -> every layer's keys and values; with `hidden`, through Li & Liang's MLP."""

    def __init__(self, n: int, n_layer: int, n_head: int, width: int, hidden: int | None) -> None:
        super().__init__()
        self.n, self.n_layer, self.n_head = n, n_layer, n_head  # n_head: the key/value heads
        out = 2 * n_layer * width  # width: key/value heads x head size (n_embd for GPT-2)
        self.embedding = nn.Embedding(n, width if hidden else out)
        self.transform = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, out)) if hidden \
            else None

    def forward(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        h = self.embedding.weight  # (n, C) or (n, 2 L C)
        if self.transform is not None:
            h = self.transform(h)  # (n, 2 L C)
        hs = h.size(-1) // (2 * self.n_layer * self.n_head)
        kv = h.view(self.n, 2 * self.n_layer, self.n_head, hs).permute(1, 2, 0, 3)  # (2L, nh, n, hs)
        return [(kv[2 * i][None].expand(batch, -1, -1, -1), kv[2 * i + 1][None].expand(batch, -1, -1, -1))
                for i in range(self.n_layer)]


class StaticPrefix(nn.Module):
    """Fixed per-layer keys and values: a trained prefix or soft prompt, folded for inference."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.n = keys.size(2)
        self.register_buffer("keys", keys)  # (L, nh, n, hs)
        self.register_buffer("values", values)

    def forward(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k[None].expand(batch, -1, -1, -1), v[None].expand(batch, -1, -1, -1))
                for k, v in zip(self.keys, self.values)]


class PromptTuning(SmallMethod):
    name = "prompt"
    lr = 3e-2  # a few embedding vectors need large steps (peft's prompt-tuning example: 3e-2; Lester et al.: 0.3)

    def __init__(self, virtual_tokens: int = 20, init_text: str | None = None) -> None:
        if virtual_tokens < 1:
            raise GptlabError(f"prompt.virtual_tokens must be >= 1, got {virtual_tokens}")
        self.n, self.init_text = virtual_tokens, init_text
        self.init_ids: list[int] | None = None  # the init text's token ids, set by whoever holds the tokenizer
        self.reserved_positions = virtual_tokens
        super().__init__(virtual_tokens=virtual_tokens, init_text=init_text)

    def attach(self, model: GPT) -> None:
        model.requires_grad_(False)
        wte = model.transformer.wte.weight
        prompt = PromptEmbedding(self.n, model.config.n_embd).to(wte.device, wte.dtype)
        with torch.no_grad():
            # Lester et al.: start from real token embeddings (the init text's, repeated; else sampled ones)
            g = torch.Generator().manual_seed(0)
            ids = torch.tensor(self.init_ids) if self.init_ids else torch.randint(0, wte.size(0), (self.n,),
                                                                                   generator=g)
            prompt.embedding.weight.copy_(wte[ids.repeat(-(-self.n // len(ids)))[: self.n].to(wte.device)])
        model.prompt = prompt

    def fold(self, model: GPT) -> GPT:
        """Run the soft prompt through the model once and keep each layer's keys and values."""
        n, cfg = self.n, model.config
        wte = model.transformer.wte.weight
        cache = KVCache(cfg, 1, n, wte.device, wte.dtype)
        cache.valid[:, :n] = True
        cache.begin(torch.arange(n, device=wte.device), n)
        with torch.no_grad():
            x, ropes = model.embed(model.prompt(1), torch.arange(n, device=wte.device)[None])  # (1, n, C)
            for block in model.transformer.h:
                x = block(x, cache, None, ropes)
        model.prompt = None
        model.prefix = StaticPrefix(cache.k[:, 0].clone(), cache.v[:, 0].clone())  # (L, nh, n, hs)
        return model


class PrefixTuning(SmallMethod):
    name = "prefix"
    lr = 3e-3  # keys and values through the reparameterisation MLP

    def __init__(self, virtual_tokens: int = 20, hidden: int | None = 512) -> None:
        if virtual_tokens < 1:
            raise GptlabError(f"prefix.virtual_tokens must be >= 1, got {virtual_tokens}")
        self.n, self.hidden = virtual_tokens, hidden or None
        self.reserved_positions = virtual_tokens
        super().__init__(virtual_tokens=virtual_tokens, hidden=hidden)

    def attach(self, model: GPT) -> None:
        model.requires_grad_(False)
        cfg, wte = model.config, model.transformer.wte.weight
        model.prefix = PrefixEncoder(self.n, cfg.n_layer, cfg.kv_heads, cfg.kv_heads * cfg.head_dim,
                                     self.hidden).to(wte.device, wte.dtype)

    def fold(self, model: GPT) -> GPT:
        """Evaluate the reparameterisation MLP once and keep its output: the MLP is not needed to generate."""
        with torch.no_grad():
            kv = model.prefix(1)
        model.prefix = StaticPrefix(torch.stack([k[0] for k, _ in kv]), torch.stack([v[0] for _, v in kv]))
        return model

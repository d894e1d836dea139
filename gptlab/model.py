"""The GPT model in one file.

GPT-2's architecture (Radford et al. 2019), as nanoGPT writes it: learned positions, pre-LayerNorm blocks, causal
self-attention through `scaled_dot_product_attention`, a GELU-tanh MLP and an output head tied to the token embedding.
Parameter names match nanoGPT and Hugging Face's GPT-2 (`transformer.h.0.attn.c_attn.weight`, ...) so that moving
weights between them is a transpose, not a renaming table.

Generation does not live here: the engine in `generate.py` owns a `KVCache` and passes it to `forward`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError


class KVCache:
    """Preallocated keys and values of every layer for a batch of sequences.

    Slots are positions in the cache; `valid` marks the slots that hold real tokens (left padding and unwritten slots
    do not). Before each forward the engine calls `begin`, which fixes the slots this step writes and builds the one
    attention mask that every layer shares; shapes stay fixed from step to step, so a decode step can be captured in a
    CUDA graph.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, nh, S, hs)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, S)
        self.slots = torch.arange(max_len, device=device)  # (S,)
        self.max_len = max_len
        self.batch_size = batch_size
        self.slot_ids: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.span = max_len

    def begin(self, slot_ids: torch.Tensor, span: int | None = None) -> None:
        """Prepare a forward that writes slots `slot_ids` (T,) and attends over the first `span` slots."""
        self.slot_ids = slot_ids
        self.span = span or self.max_len
        slots = self.slots[: self.span]
        causal = slots[None, :] <= slot_ids[:, None]  # (T, S)
        own = slots[None, :] == slot_ids[:, None]  # a left-pad query sees itself, never an empty row (NaN)
        self.mask = ((causal[None] & self.valid[:, None, : self.span]) | own[None])[:, None]  # (B, 1, T, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys and values (B, nh, T, hs) and return the attended part of the cache."""
        self.k[layer].index_copy_(2, self.slot_ids, k)
        self.v[layer].index_copy_(2, self.slot_ids, v)
        return self.k[layer, :, :, : self.span], self.v[layer, :, :, : self.span]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.adaption: nn.Module | None = None  # LLaMA-Adapter's gated prompt attention (gptlab/peft/llama_adapter.py)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        if cache is None and prefix is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)  # (B, nh, T, hs)
        else:
            if cache is None:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T) causal
            else:
                k, v = cache.update(self.layer, k, v)  # (B, nh, S, hs)
                mask = cache.mask  # (B, 1, T, S)
            if prefix is not None:  # learned keys/values every query may see (prefix and prompt tuning)
                pk, pv = prefix  # (B, nh, n, hs)
                k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
                mask = torch.cat([mask.new_ones(*mask.shape[:-1], pk.size(2)), mask], dim=-1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        if self.adaption is not None:
            y = y + self.adaption(q, self.c_attn)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.hidden_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, prefix)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.activation_checkpointing = False  # recompute each block in backward: less memory, ~1/3 more compute
        # Virtual tokens, set by prompt and prefix tuning (gptlab/peft/virtual.py): `prompt(B)` gives embeddings
        # (B, n, C) placed before the text; `prefix(B)` gives each layer's keys and values (B, nh, n, hs) that every
        # query sees, and the text's positions start after them.
        self.prompt: nn.Module | None = None
        self.prefix: nn.Module | None = None
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), one per sub-layer that adds to the stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def resize_vocab(self, vocab_size: int) -> None:
        """Grow the token embedding (and an untied head) to `vocab_size` rows, e.g. after adding task tokens.

        New rows start at the mean of the existing ones, as Hugging Face's `resize_token_embeddings` does, so a new
        token begins as an average token rather than a random direction.
        """
        old = self.config.vocab_size
        if vocab_size <= old:
            return
        wte = self.transformer.wte.weight  # (V, C)
        grown = torch.cat([wte.data, wte.data.mean(0, keepdim=True).expand(vocab_size - old, -1)])
        self.transformer.wte = nn.Embedding(vocab_size, self.config.n_embd, device=wte.device, dtype=wte.dtype)
        self.transformer.wte.weight.data.copy_(grown)
        if self.config.tie_embeddings:
            self.lm_head = nn.Linear(self.config.n_embd, vocab_size, bias=False, device=wte.device, dtype=wte.dtype)
            self.lm_head.weight = self.transformer.wte.weight
        else:
            head = self.lm_head.weight.data
            self.lm_head = nn.Linear(self.config.n_embd, vocab_size, bias=False, device=wte.device, dtype=wte.dtype)
            self.lm_head.weight.data.copy_(torch.cat([head, head.mean(0, keepdim=True).expand(vocab_size - old, -1)]))
        self.config.vocab_size = vocab_size

    def num_params(self) -> int:
        """Parameters counted once each (the tied head is the embedding), as Hugging Face's `num_parameters()`."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, pos: torch.Tensor | None = None,
        cache: KVCache | None = None, last_only: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, vocab) for token ids `idx` (B, T); with `targets`, also the mean cross-entropy loss.

        `pos` (B, T) gives each token's position (default 0..T-1); `cache` is the engine's KV cache, prepared with
        `cache.begin`; `last_only` computes logits for the last position only (B, 1, vocab), as decoding needs.
        Targets equal to -100 are ignored in the loss.
        """
        B, T = idx.shape
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.prompt is not None and cache is None:
            x = torch.cat([self.prompt(B), x], dim=1)  # (B, n + T, C)
        prefixes = self.prefix(B) if self.prefix is not None else [None] * self.config.n_layer
        offset = self.prefix.n if self.prefix is not None else 0
        if pos is None:
            if x.size(1) + offset > self.config.block_size:
                raise GptlabError(f"sequence of {x.size(1) + offset} positions is longer than the context "
                                  f"({self.config.block_size})")
            pos = torch.arange(x.size(1), device=idx.device)[None]  # (1, T)
        x = self.transformer.drop(x + self.transformer.wpe(pos + offset))  # (B, T, C)
        for block, prefix in zip(self.transformer.h, prefixes):
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, cache, prefix, use_reentrant=False)
            else:
                x = block(x, cache, prefix)
        x = x[:, x.size(1) - T:]  # drop the prompt-tuning positions: logits line up with `idx`
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss


def build_on_meta(config: ModelConfig) -> GPT:
    """A model with shapes and no storage: parameter counts of any size, free."""
    with torch.device("meta"):
        return GPT(config)

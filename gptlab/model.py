"""The GPT model in one file.

GPT-2's architecture (Radford et al. 2019), as nanoGPT writes it: learned positions, pre-LayerNorm blocks, causal
self-attention through `scaled_dot_product_attention`, a GELU-tanh MLP and an output head tied to the token embedding.
Parameter names match nanoGPT and Hugging Face's GPT-2 (`transformer.h.0.attn.c_attn.weight`, ...) so that moving
weights between them is a transpose, not a renaming table.

Generation does not live here: the engine in `generate.py` owns a `KVCache` and passes it to `forward`.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.loss import linear_cross_entropy

Rope = tuple[torch.Tensor, torch.Tensor]  # cos and sin tables (B, 1, T, hs)


class KVCache:
    """Preallocated keys and values of every layer for a batch of sequences.

    Slots are positions in the cache; `valid` marks the slots that hold real tokens (left padding and unwritten slots
    do not). Before each forward the engine calls `begin`, which fixes the slots this step writes and builds the one
    attention mask that every layer shares; shapes stay fixed from step to step, so a decode step can be captured in a
    CUDA graph.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, n_kv, S, hs)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, S)
        self.slots = torch.arange(max_len, device=device)  # (S,)
        self.max_len = max_len
        self.batch_size = batch_size
        self.slot_ids: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.span = max_len
        self.window = config.sliding_window

    def begin(self, slot_ids: torch.Tensor, span: int | None = None) -> None:
        """Prepare a forward that writes slots `slot_ids` (T,) and attends over the first `span` slots."""
        self.slot_ids = slot_ids
        self.span = span or self.max_len
        slots = self.slots[: self.span]
        causal = slots[None, :] <= slot_ids[:, None]  # (T, S)
        if self.window:
            causal &= slots[None, :] > slot_ids[:, None] - self.window
        own = slots[None, :] == slot_ids[:, None]  # a left-pad query sees itself, never an empty row (NaN)
        self.mask = ((causal[None] & self.valid[:, None, : self.span]) | own[None])[:, None]  # (B, 1, T, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys and values (B, nh, T, hs) and return the attended part of the cache."""
        self.k[layer].index_copy_(2, self.slot_ids, k)
        self.v[layer].index_copy_(2, self.slot_ids, v)
        return self.k[layer, :, :, : self.span], self.v[layer, :, :, : self.span]


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama), computed in float32; with `offset` the scale is (1 + weight), as Gemma's."""

    def __init__(self, dim: int, eps: float, offset: bool = False) -> None:
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps, config.norm_offset)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_tables(pos: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, 1, T, hs) of rotary embeddings at positions `pos` (B, T), in Hugging Face's half-split layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    freqs = pos[..., None].float() * inv_freq  # (B, T, hs/2)
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, hs)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin  # (B, nh, T, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv, self.hs = config.n_head, config.kv_heads, config.head_dim
        self.window = config.sliding_window
        self.dropout = config.dropout
        # q for every head, then k and v for every key/value head (fewer with grouped-query attention)
        self.sizes = [self.n_head * self.hs, self.n_kv * self.hs, self.n_kv * self.hs]
        self.c_attn = nn.Linear(config.n_embd, sum(self.sizes), bias=config.bias)
        self.c_proj = nn.Linear(self.n_head * self.hs, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.adaption: nn.Module | None = None  # LLaMA-Adapter's gated prompt attention (gptlab/peft/llama_adapter.py)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                rope: Rope | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.sizes, dim=2)
        q = q.view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv, self.hs).transpose(1, 2)  # (B, n_kv, T, hs)
        v = v.view(B, T, self.n_kv, self.hs).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        dropout = self.dropout if self.training else 0.0
        windowed = self.window is not None and T > self.window
        if cache is None and prefix is None and not windowed:  # training and scoring: the fused causal kernel
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                               enable_gqa=self.n_kv != self.n_head)  # (B, nh, T, hs)
        else:
            if cache is None:
                i = torch.arange(T, device=x.device)
                mask = i[None, :] <= i[:, None]  # (T, T) causal
                if windowed:
                    mask &= i[None, :] > i[:, None] - self.window
            else:
                k, v = cache.update(self.layer, k, v)  # (B, n_kv, S, hs)
                mask = cache.mask  # (B, 1, T, S)
            if prefix is not None:  # learned keys/values every query may see (prefix and prompt tuning)
                pk, pv = prefix  # (B, n_kv, n, hs)
                k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
                mask = torch.cat([mask.new_ones(*mask.shape[:-1], pk.size(2)), mask], dim=-1)
            if self.n_kv != self.n_head:  # grouped-query attention: each key/value head serves a group of queries
                k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
                v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        if self.adaption is not None:
            y = y + self.adaption(q, self)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.hs)  # the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2's GELU MLP, or a gated one (SwiGLU for Llama and Mistral, GeGLU for Gemma) whose `c_fc` holds the gate
    and the up projection side by side."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        gated = 2 if config.mlp in ("swiglu", "geglu") else 1
        self.c_fc = nn.Linear(config.n_embd, gated * config.hidden_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, hidden) or (B, T, 2 * hidden)
        if self.kind == "gelu":
            h = F.gelu(h, approximate="tanh")
        else:
            gate, up = h.chunk(2, dim=-1)
            h = (F.silu(gate) if self.kind == "swiglu" else F.gelu(gate, approximate="tanh")) * up
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                rope: Rope | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, prefix, rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        if config.pos == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.activation_checkpointing = False  # recompute each block in backward: less memory, ~1/3 more compute
        # Training loss over chunks of this many tokens, the output layer and the loss fused (gptlab/loss.py): the
        # (tokens x vocab) logits never exist whole (with GPT-2's 50K vocabulary they outweigh a small model's
        # activations), and fewer passes over memory make the step faster too.
        self.loss_chunk = 0
        # Virtual tokens, set by prompt and prefix tuning (gptlab/peft/virtual.py): `prompt(B)` gives embeddings
        # (B, n, C) placed before the text; `prefix(B)` gives each layer's keys and values (B, nh, n, hs) that every
        # query sees, and the text's positions start after them.
        self.prompt: nn.Module | None = None
        self.prefix: nn.Module | None = None
        self.quantization = None  # a QuantSpec once the Linear layers are quantized (gptlab/quant)
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

    def embed(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, Rope | None]:
        """Token (or virtual-token) embeddings (B, T, C) at positions `pos` -> the blocks' input, plus the rotary
        tables when positions are rotary."""
        if self.config.embed_scale:
            x = x * torch.tensor(self.config.n_embd ** 0.5, dtype=x.dtype)  # Gemma
        rope = None
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(pos)
        else:
            rope = rope_tables(torch.broadcast_to(pos, x.shape[:2]), self.config.head_dim, self.config.rope_theta,
                               x.dtype)
        return self.transformer.drop(x), rope

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
        x, rope = self.embed(x, pos + offset)  # (B, T, C)
        for block, prefix in zip(self.transformer.h, prefixes):
            if self.activation_checkpointing and self.training:
                # the recompute runs in backward, outside any attention-kernel choice made around the forward (the
                # CPU's bf16 autocast picks the math kernel): it gets the same choice back
                backends = sdpa_backends()
                x = checkpoint(block, x, cache, prefix, rope, use_reentrant=False,
                               context_fn=lambda b=backends: (contextlib.nullcontext(), sdpa_kernel(b)))
            else:
                x = block(x, cache, prefix, rope)
        x = x[:, x.size(1) - T:]  # drop the prompt-tuning positions: logits line up with `idx`
        if last_only:
            x = x[:, -1:]
        if targets is not None and self.loss_chunk and self.training and not last_only:
            return None, linear_cross_entropy(self.transformer.ln_f(x), self.lm_head.weight, targets, self.loss_chunk)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss


def sdpa_backends() -> list[SDPBackend]:
    """The attention kernels scaled_dot_product_attention may use right now."""
    enabled = {SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled(),
               SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled(),
               SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled(),
               SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled()}
    return [b for b, on in enabled.items() if on]


def build_on_meta(config: ModelConfig) -> GPT:
    """A model with shapes and no storage: parameter counts of any size, free."""
    with torch.device("meta"):
        return GPT(config)

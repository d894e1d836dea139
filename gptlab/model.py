"""The GPT model in one file.

GPT-2's architecture (Radford et al. 2019), as nanoGPT writes it: learned positions, pre-LayerNorm blocks, causal
self-attention through `scaled_dot_product_attention`, a GELU-tanh MLP and an output head tied to the token embedding.
Parameter names match nanoGPT and Hugging Face's GPT-2 (`transformer.h.0.attn.c_attn.weight`, ...) so that moving
weights between them is a transpose, not a renaming table. The open families since (Llama, Mistral, Gemma, Qwen, Phi,
OLMo, SmolLM) and GPT-1 are the same forward pass with config fields switched on: rotary positions, RMSNorm, gated
MLPs, grouped-query and sliding-window attention, q/k norms, norms after each sub-layer, soft-capping.

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
from gptlab.rope import Frequencies, Rope, apply_rope, rope_tables

Ropes = dict[str, Rope]  # the rotary tables of this forward, by layer kind ("full_attention", "sliding_attention")


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
        self.masks: dict[int | None, torch.Tensor] = {}  # by sliding window (None: full attention)
        self.span = max_len
        self.windows = sorted({config.layer_window(i) for i in range(config.n_layer)}, key=lambda w: w or 0)

    def begin(self, slot_ids: torch.Tensor, span: int | None = None) -> None:
        """Prepare a forward that writes slots `slot_ids` (T,) and attends over the first `span` slots."""
        self.slot_ids = slot_ids
        self.span = span or self.max_len
        slots = self.slots[: self.span]
        own = slots[None, :] == slot_ids[:, None]  # a left-pad query sees itself, never an empty row (NaN)
        for window in self.windows:  # one mask per kind of layer, shared by the layers of that kind
            causal = slots[None, :] <= slot_ids[:, None]  # (T, S)
            if window:
                causal &= slots[None, :] > slot_ids[:, None] - window
            self.masks[window] = ((causal[None] & self.valid[:, None, : self.span]) | own[None])[:, None]  # (B,1,T,S)

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


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim or config.n_embd, config.norm_eps, config.norm_offset)
    return nn.LayerNorm(dim or config.n_embd, eps=config.norm_eps, bias=config.bias)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): values kept below cap smoothly (Gemma 2's attention scores and logits)."""
    return x if cap is None else torch.tanh(x / cap) * cap


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
              cap: float | None, dropout: float) -> torch.Tensor:
    """Masked attention of q (B, nh, T, hs) over k, v (B, nh, S, hs); written out when scores are soft-capped, which
    the fused kernel cannot do."""
    if cap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    scores = softcap((q @ k.transpose(-1, -2)) * scale, cap)  # (B, nh, T, S)
    scores = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return F.dropout(scores, dropout) @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv, self.hs = config.n_head, config.kv_heads, config.head_dim
        self.window = config.layer_window(layer)  # None: this layer attends over the whole context
        # the rotary table this layer takes (that of its attention kind); None: no positions here (SmolLM3's NoPE)
        self.rope = config.layer_type(layer) if config.pos == "rope" and layer not in (config.nope_layers or ()) \
            else None
        self.scale = (config.attn_scalar or self.hs) ** -0.5
        self.softcap = config.attn_softcap
        self.dropout = config.dropout
        # q for every head, then k and v for every key/value head (fewer with grouped-query attention)
        self.sizes = [self.n_head * self.hs, self.n_kv * self.hs, self.n_kv * self.hs]
        self.c_attn = nn.Linear(config.n_embd, sum(self.sizes), bias=config.attention_bias)
        self.c_proj = nn.Linear(self.n_head * self.hs, config.n_embd, bias=config.bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm:  # over each head (Qwen3, Gemma 3) or over the whole projection (OLMo 2)
            whole = config.qk_norm == "all"
            self.q_norm = make_norm(config, self.sizes[0] if whole else self.hs)
            self.k_norm = make_norm(config, self.sizes[1] if whole else self.hs)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.adaption: nn.Module | None = None  # LLaMA-Adapter's gated prompt attention (gptlab/peft/llama_adapter.py)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                ropes: Ropes | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.sizes, dim=2)
        if self.qk_norm == "all":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_head, self.hs)
        k = k.view(B, T, self.n_kv, self.hs)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hs), (B, n_kv, T, hs)
        v = v.view(B, T, self.n_kv, self.hs).transpose(1, 2)  # (B, n_kv, T, hs)
        if self.rope is not None and ropes is not None:
            q, k = apply_rope(q, *ropes[self.rope]), apply_rope(k, *ropes[self.rope])
        dropout = self.dropout if self.training else 0.0
        windowed = self.window is not None and T > self.window
        if cache is None and prefix is None and not windowed and self.softcap is None:
            # training and scoring: the fused causal kernel
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=self.scale,
                                               enable_gqa=self.n_kv != self.n_head)  # (B, nh, T, hs)
        else:
            if cache is None:
                i = torch.arange(T, device=x.device)
                mask = i[None, :] <= i[:, None]  # (T, T) causal
                if windowed:
                    mask &= i[None, :] > i[:, None] - self.window
            else:
                k, v = cache.update(self.layer, k, v)  # (B, n_kv, S, hs)
                mask = cache.masks[self.window]  # (B, 1, T, S)
            if prefix is not None:  # learned keys/values every query may see (prefix and prompt tuning)
                pk, pv = prefix  # (B, n_kv, n, hs)
                k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
                mask = torch.cat([mask.new_ones(*mask.shape[:-1], pk.size(2)), mask], dim=-1)
            if self.n_kv != self.n_head:  # grouped-query attention: each key/value head serves a group of queries
                k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
                v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
            y = attention(q, k, v, mask, self.scale, self.softcap, dropout)  # (B, nh, T, hs)
        if self.adaption is not None:
            y = y + self.adaption(q, self)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.hs)  # the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2's GELU MLP, ReLU squared (the speedrun's: sparse and cheap), or a gated one (SwiGLU for Llama and Mistral,
    GeGLU for Gemma) whose `c_fc` holds the gate and the up projection side by side."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        gated = 2 if config.gated else 1
        self.c_fc = nn.Linear(config.n_embd, gated * config.hidden_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, hidden) or (B, T, 2 * hidden)
        if self.kind == "gelu":
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            gate, up = h.chunk(2, dim=-1)
            h = (F.silu(gate) if self.kind == "swiglu" else F.gelu(gate, approximate="tanh")) * up
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """A transformer block: attention, then the MLP, each added to the residual stream, normalized where the family
    normalizes (`block_norms`): before each sub-layer (GPT-2, Llama), after each residual add (GPT-1), on each
    sub-layer's output (OLMo 2), or both before and on the output (Gemma 2/3)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        norms = config.block_norms
        self.post = norms == "post"
        self.ln_1 = make_norm(config) if norms != "output" else nn.Identity()
        self.attn = CausalSelfAttention(config, layer)
        self.post_attn_norm = make_norm(config) if norms in ("output", "both") else nn.Identity()
        self.ln_2 = make_norm(config) if norms != "output" else nn.Identity()
        self.mlp = MLP(config)
        self.post_mlp_norm = make_norm(config) if norms in ("output", "both") else nn.Identity()

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                ropes: Ropes | None = None) -> torch.Tensor:
        if self.post:  # GPT-1
            x = self.ln_1(x + self.attn(x, cache, prefix, ropes))
            return self.ln_2(x + self.mlp(x))
        x = x + self.post_attn_norm(self.attn(self.ln_1(x), cache, prefix, ropes))
        return x + self.post_mlp_norm(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config) if config.block_norms != "post" else nn.Identity(),  # GPT-1 has no final norm
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
        self.frequencies: dict[tuple[str, torch.device], Frequencies] = {}  # rotary, per layer kind and device
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

    def embed(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, Ropes | None]:
        """Token (or virtual-token) embeddings (B, T, C) at positions `pos` -> the blocks' input, plus the rotary
        tables of each kind of layer when positions are rotary."""
        cfg = self.config
        if cfg.embed_scale:
            x = x * torch.tensor(cfg.n_embd ** 0.5, dtype=x.dtype)  # Gemma
        if cfg.pos == "learned":
            return self.transformer.drop(x + self.transformer.wpe(pos)), None
        pos = torch.broadcast_to(pos, x.shape[:2])  # (B, T)
        seq_len = pos.amax(dim=-1, keepdim=True) + 1  # (B, 1): each row's length, which length-dependent rope reads
        ropes = {}
        for kind in {cfg.layer_type(i) for i in range(cfg.n_layer)}:
            key = (kind, x.device)
            if key not in self.frequencies:
                local = kind == "sliding_attention" and cfg.rope_local_theta  # Gemma 3's local layers: own base
                self.frequencies[key] = Frequencies(cfg.rotary_dims, cfg.rope_local_theta if local else cfg.rope_theta,
                                                    None if local else cfg.rope_scaling, cfg.block_size, x.device)
            ropes[kind] = rope_tables(pos, *self.frequencies[key].at(seq_len), x.dtype)
        return self.transformer.drop(x), ropes

    def num_params(self) -> int:
        """Parameters counted once each (the tied head is the embedding), as Hugging Face's `num_parameters()`."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, pos: torch.Tensor | None = None,
        cache: KVCache | None = None, last_only: bool = False, scored: torch.Tensor | None = None,
        features: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, vocab) for token ids `idx` (B, T); with `targets`, also the mean cross-entropy loss.

        `pos` (B, T) gives each token's position (default 0..T-1); `cache` is the engine's KV cache, prepared with
        `cache.begin`; `last_only` computes logits for the last position only (B, 1, vocab), as decoding needs;
        `scored`, a (B, T) mask, only at its positions (n, vocab), in row order, as a preference loss needs (the
        output layer is much of a small model's work, and the prompt is not scored); `features` returns the last
        hidden states (B, T, C) after the final norm instead of logits (embeddings). Targets equal to -100 are
        ignored in the loss.
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
        x, ropes = self.embed(x, pos + offset)  # (B, T, C)
        for block, prefix in zip(self.transformer.h, prefixes):
            if self.activation_checkpointing and self.training:
                # the recompute runs in backward, outside any attention-kernel choice made around the forward (the
                # CPU's bf16 autocast picks the math kernel): it gets the same choice back
                backends = sdpa_backends()
                x = checkpoint(block, x, cache, prefix, ropes, use_reentrant=False,
                               context_fn=lambda b=backends: (contextlib.nullcontext(), sdpa_kernel(b)))
            else:
                x = block(x, cache, prefix, ropes)
        x = x[:, x.size(1) - T:]  # drop the prompt-tuning positions: logits line up with `idx`
        if last_only:
            x = x[:, -1:]
        elif scored is not None:
            x = x[scored]  # (n, C)
        if features:
            return self.transformer.ln_f(x)  # (B, T, C)
        if targets is not None and self.loss_chunk and self.training and x.dim() == 3 and not last_only and \
                self.config.logit_softcap is None:
            return None, linear_cross_entropy(self.transformer.ln_f(x), self.lm_head.weight, targets, self.loss_chunk)
        logits = softcap(self.lm_head(self.transformer.ln_f(x)), self.config.logit_softcap)  # (B, T, vocab)
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

"""`gptlab export gguf`: a checkpoint as one GGUF file that llama.cpp (and llama-cpp-python) load and run.

Written with the `gguf` package (llama.cpp's own writer) under llama.cpp's tensor names and metadata keys, as its
`convert_hf_to_gguf.py` writes them. Each family goes to the llama.cpp architecture built for it:

- GPT-2 (learned positions, LayerNorm, GELU, biases) -> `gpt2`: `attn_qkv` stays fused.
- Llama 1-3 and Mistral -> `llama`, SmolLM3 -> `smollm3`: llama.cpp's "normal" rotary embedding turns consecutive
  pairs, so q and k rows are permuted from Hugging Face's rotate-half layout to interleaved pairs. Llama 3.1+'s
  rope scaling becomes a `rope_freqs` tensor of per-pair factors.
- Gemma 1-3 -> `gemma`, `gemma2`, `gemma3`; Qwen2/2.5 -> `qwen2`, Qwen3 -> `qwen3`; Phi-3/4 -> `phi3`; OLMo 2 ->
  `olmo2`: these take llama.cpp's NEOX rotary, which is rotate-half, so q and k go as they are. Gemma's norms (q/k
  norms too) are stored as 1 + w, since llama.cpp multiplies by the weight. Phi-3 keeps qkv and gate_up fused, and
  LongRoPE's factors become `rope_factors_long` and `rope_factors_short`.

A model llama.cpp's architecture would not compute as gptlab does (an attention scale it hard-codes otherwise, a
sliding-window layout it has no way to hold, a rope scaling it lacks, GPT-1's post-norm blocks) is refused in one
line; nothing is written. Where the two differ only past some length (a sliding window the architecture does not
apply, LongRoPE's long factors, which llama.cpp picks by its context size) the file is written with a note.

The tokenizer goes in the file too: a byte-level BPE as llama.cpp's `gpt2` vocabulary (tokens, types, merges) under
the name of llama.cpp's pre-tokenizer that splits words with the same regex (GPT-2's, Llama 3's `llama-bpe`, Qwen's
`qwen2`, SmolLM2's `smollm`, Phi-4-mini's `gpt-4o`; a split it lacks is GPT-2's with a note), a character tokenizer
(single characters plus `<0xXX>` byte fallback) as its SentencePiece-style `llama` vocabulary.

Weight types (`--dtype`), each tensor's chosen as llama.cpp's converter (f32, f16, q8_0) and its `llama-quantize`
(q4_0) choose it, so that the file is the one llama.cpp's own tools would make:

- vectors (norms, biases, rope factors) stay f32 whatever the dtype; a matrix whose rows are not whole blocks of 32
  values (Q8_0's and Q4_0's block) is written f16, with a note naming it, as `llama-quantize` falls back.
- q4_0 keeps the position table f32 and the output head Q8_0 (the token embedding, where it is the head): the head
  is where 4 bits cost the most, and `llama-quantize` gives it Q6_K, which the gguf package cannot write (it
  quantizes Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0, and only reads K-quants: q4_k and q5_k are refused). An untied token
  embedding is Q4_0, as `llama-quantize` makes it.
- A quantized checkpoint is dequantized and quantized again, except gptlab's int4 with groups that are whole Q4_0
  blocks (32, 64, ...) to q4_0: Q4_0's value (q - 8) * d is int4's code * absmax / 7, so each block takes the
  int4 codes as they are and its group's absmax / 7 as its scale. Only that scale is not bit-exact: Q4_0 stores
  it in f16, so each weight moves by at most 2^-11 of its group's absmax (for an absmax over 4e-4, f16's normal
  range; below, by at most 7 subnormal steps of 6e-8). Other group sizes, nf4 and fp4 are quantized again (a
  second rounding, said in a note).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

from gptlab.checkpoint import load_checkpoint, model_state, read_folders
from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.files import atomic_write, check_outside
from gptlab.model import build_on_meta
from gptlab.quant.formats import DEFAULT_GROUP, INT4_LEVELS, QuantSpec
from gptlab.rope import Frequencies
from gptlab.tokenizer import Tokenizer

DTYPES = ("f32", "f16", "q8_0", "q4_0")
K_QUANTS = ("q4_k", "q5_k")  # llama.cpp's K-quants: the gguf package reads them but has no quantizer for them
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
BLOCK = 32  # values per Q8_0 and Q4_0 block: a row must be whole blocks
LEVELS = np.array(INT4_LEVELS, dtype=np.float32)  # int4's levels by code + 8, in float32 as its dequantize has them
ARCHS = {  # transformers family -> llama.cpp architecture
    "llama": "llama", "mistral": "llama", "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3",
    "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "olmo2": "olmo2", "smollm3": "smollm3",
}
NORMAL_ROPE = ("llama", "smollm3")  # llama.cpp's rotary on consecutive pairs: q and k rows permuted
FUSED = ("gpt2", "phi3")  # attn_qkv and ffn_up stay one matrix each
SWA = {"gemma2": 2, "gemma3": 6}  # architectures with sliding-window layers -> llama.cpp's default pattern
FULL_WIDTH = ("qwen2", "phi3", "olmo2")  # llama.cpp sizes their heads n_embd / n_head
TIED = ("gemma", "gemma2")  # llama.cpp reads no output.weight: the head is the embedding
UNTIED = ("olmo2",)  # llama.cpp needs output.weight, even where it is the embedding
SCALINGS = {"llama": ("llama3", "linear", "yarn"), "phi3": ("longrope", "linear", "yarn")}  # others: linear, yarn
YARN_DEFAULTS = {"beta_fast": 32, "beta_slow": 1, "truncate": True}  # the only values llama.cpp's YaRN uses
PHI3_TOKENS = {"<s>", "</s>", "<unk>", "<|endoftext|>"}  # what llama.cpp looks up in a model named like Phi-3
# A byte-level BPE's split into words, as tokenizer.json's Split step writes it -> llama.cpp's pre-tokenizer of that
# regex (llama-vocab.cpp). llama.cpp knows a pre-tokenizer by name only, so the name says how it splits text.
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|"
_LLAMA3_REST = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLITS = {
    _CONTRACTIONS + _LLAMA3_REST: "llama-bpe",  # Llama 3, SmolLM3, OLMo 2 (cl100k's split)
    _CONTRACTIONS + _LLAMA3_REST.replace(r"\p{N}{1,3}", r"\p{N}"): "qwen2",  # Qwen2/2.5/3: digits one by one
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+": "gpt-2",  # GPT-2's own
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+": "gpt-4o",  # Phi-4-mini (o200k's split)
}
# gptlab layer part -> llama.cpp's name
NORMS = {"ln_1": "attn_norm", "post_attn_norm": "post_attention_norm", "ln_2": "ffn_norm",
         "post_mlp_norm": "post_ffw_norm", "attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GptlabError("GGUF export needs the gguf package: pip install 'gptlab[gguf]'") from None
    return gguf


def _no_architecture(cfg: ModelConfig) -> GptlabError:
    return GptlabError(f"llama.cpp has no architecture for this model (positions {cfg.pos}, norm {cfg.norm}, MLP "
                       f"{cfg.mlp}, bias {cfg.bias}); GGUF export takes GPT-2, Llama/Mistral, Gemma 1-3, Qwen2/3, "
                       "Phi-3/4, OLMo 2 and SmolLM3 shapes")


def architecture(cfg: ModelConfig) -> str:
    """llama.cpp's name for this shape, or one line saying why llama.cpp would not run it as gptlab does."""
    if cfg.pos == "learned":
        return _learned(cfg)
    from gptlab.interop import families

    try:
        arch = ARCHS[families.hf_family(cfg)]  # the family whose shape this is exactly, hence llama.cpp's graph
    except GptlabError:
        raise _no_architecture(cfg) from None
    if cfg.bias:
        raise GptlabError(f"GGUF export for llama.cpp's {arch} writes biases on q, k and v only, and this model also "
                          "has them on the attention output and the MLP; nothing was written")
    reason = refusal(cfg, arch)
    if reason:
        raise GptlabError(f"llama.cpp's {arch} architecture {reason}, so it would not run this model as gptlab "
                          "does; nothing was written")
    return arch


def _learned(cfg: ModelConfig) -> str:
    """`gpt2` for exactly GPT-2's shape (what a Hugging Face GPT-2 config holds); GPT-1 and the rest refused."""
    from gptlab.interop import hf

    if cfg.block_norms == "post":
        raise GptlabError("llama.cpp has no architecture for GPT-1's post-norm blocks (LayerNorm after each "
                          "residual add, no final norm); GGUF export takes GPT-2's pre-norm shape")
    try:
        same = hf.config_from_hf(hf.config_to_hf(cfg, {})) == cfg
    except GptlabError:
        same = False
    if not same:
        raise _no_architecture(cfg)
    return "gpt2"


def sliding(cfg: ModelConfig) -> list[bool]:
    """Which layers attend within a sliding window."""
    return [cfg.layer_window(i) is not None for i in range(cfg.n_layer)]


def default_pattern(arch: str, n_layer: int) -> list[bool]:
    """The sliding layers llama.cpp assumes when the file names none: all but every n-th."""
    n = SWA[arch]
    return [i % n < n - 1 for i in range(n_layer)]


def refusal(cfg: ModelConfig, arch: str) -> str | None:
    """What llama.cpp's `arch` computes otherwise than gptlab does for `cfg` (a Hugging Face family's exact shape),
    or None."""
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type")
    if arch in FULL_WIDTH and cfg.head_size:
        return (f"sizes heads as n_embd / n_head ({cfg.n_embd // cfg.n_head}), not this model's head_dim "
                f"({cfg.head_dim})")
    if kind and kind not in SCALINGS.get(arch, ("linear", "yarn")):
        return f"has no {kind!r} rope scaling"
    if kind == "yarn":
        read = ("rope_type", "factor", "original_max_position_embeddings")
        odd = sorted(k for k, v in scaling.items()
                     if k not in read and v is not None and v != YARN_DEFAULTS.get(k, object()))
        if odd:
            return f"reads only YaRN's factor and original context, not this model's {', '.join(odd)}"
    if cfg.layer_types is not None and arch not in SWA:
        return (f"has no per-layer sliding windows (this model slides on {sum(sliding(cfg))} of its {cfg.n_layer} "
                "layers)")
    if arch == "smollm3":
        want, got = [i for i in range(cfg.n_layer) if (i + 1) % 4 == 0], sorted(cfg.nope_layers or [])
        if got != want:
            return (f"leaves rotary embeddings out of every 4th layer (here {want or 'none'}), and this model out of "
                    f"layers {got or 'none'}")
    if arch in TIED and not cfg.tie_embeddings:
        return "ties the output layer to the token embedding"
    return _gemma_refusal(cfg, arch) if arch in SWA else None


def _gemma_refusal(cfg: ModelConfig, arch: str) -> str | None:
    """Gemma 2 and 3: what llama.cpp hard-codes where gptlab reads the config."""
    # llama.cpp scales q by 1/sqrt(head_dim), but by 1/sqrt(n_embd / n_head) for the 27B (recognized by depth)
    theirs = cfg.n_embd // cfg.n_head if cfg.n_layer == {"gemma2": 46, "gemma3": 62}[arch] else cfg.head_dim
    if (cfg.attn_scalar or cfg.head_dim) != theirs:
        return (f"scales attention by {theirs} ** -0.5 for this shape, not by this model's "
                f"{cfg.attn_scalar or cfg.head_dim} ** -0.5")
    if arch == "gemma2" and (cfg.attn_softcap is None or cfg.logit_softcap is None):
        return "always soft-caps attention scores and logits, and this model leaves them uncapped"
    if arch == "gemma3" and cfg.attn_softcap is not None:
        return "has no attention soft-capping"
    return None  # how the sliding layers' rope is scaled is the family's own: `hf_family` matched it already


def notes(cfg: ModelConfig, arch: str) -> list[str]:
    """Where llama.cpp's run of the file differs from gptlab's only past some length, said before writing."""
    out = []
    if arch not in SWA and cfg.sliding_window and cfg.sliding_window < cfg.block_size:
        out.append(f"llama.cpp's {arch} architecture attends over the whole context; this model's sliding window "
                   f"({cfg.sliding_window}) makes its outputs differ beyond that many tokens")
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "longrope" and cfg.block_size > scaling["original_max_position_embeddings"]:
        original = scaling["original_max_position_embeddings"]
        out.append(f"llama.cpp turns every position with LongRoPE's long factors once its context (n_ctx, rounded "
                   f"up to a multiple of 256) is over {original}, gptlab only sequences longer than that: load it "
                   f"with n_ctx <= {original} for gptlab's outputs on shorter sequences")
    return out


def permute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q or k (heads * hs, ...) from rotate-half order (x0..x_{h/2-1}, x_{h/2}..) to interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's names, in the layout its kernels take."""
    shift = 1 if cfg.norm_offset else 0  # llama.cpp's Gemma multiplies by the weight: (1 + w) goes in the file
    out = {"token_embd.weight": state["transformer.wte.weight"],
           "output_norm.weight": state["transformer.ln_f.weight"] + shift}
    if arch == "gpt2":
        out["position_embd.weight"] = state["transformer.wpe.weight"]
        out["output_norm.bias"] = state["transformer.ln_f.bias"]
    if not cfg.tie_embeddings or arch in UNTIED:
        out["output.weight"] = state.get("lm_head.weight", state["transformer.wte.weight"])
    for i in range(cfg.n_layer):
        out.update(layer_tensors(state, cfg, arch, i))
    out.update(rope_tensors(cfg))
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def layer_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: str, i: int) -> dict[str, torch.Tensor]:
    """Layer i's norms, attention and MLP, weights and biases where the model has them."""
    o, b = f"transformer.h.{i}.", f"blk.{i}."
    out = {}
    for ours, theirs in NORMS.items():
        if o + ours + ".weight" in state:
            out[f"{b}{theirs}.weight"] = state[o + ours + ".weight"] + (1 if cfg.norm_offset else 0)  # Gemma's 1 + w
        if o + ours + ".bias" in state:
            out[f"{b}{theirs}.bias"] = state[o + ours + ".bias"]
    q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    for part in ("weight", "bias"):
        if o + "attn.c_attn." + part in state:
            qkv = state[o + "attn.c_attn." + part]
            if arch in FUSED:
                out[f"{b}attn_qkv.{part}"] = qkv
            else:
                wq, wk, wv = qkv.split([q, kv, kv])
                if arch in NORMAL_ROPE:
                    wq, wk = permute_rotary(wq, cfg.n_head), permute_rotary(wk, cfg.kv_heads)
                out[f"{b}attn_q.{part}"], out[f"{b}attn_k.{part}"], out[f"{b}attn_v.{part}"] = wq, wk, wv
        if o + "mlp.c_fc." + part in state:
            fc = state[o + "mlp.c_fc." + part]
            if arch in FUSED:  # GPT-2's one up projection, or Phi-3's gate and up side by side, as llama.cpp's
                out[f"{b}ffn_up.{part}"] = fc
            else:
                out[f"{b}ffn_gate.{part}"], out[f"{b}ffn_up.{part}"] = fc.chunk(2)
        for ours, theirs in (("attn.c_proj", "attn_output"), ("mlp.c_proj", "ffn_down")):
            if f"{o}{ours}.{part}" in state:
                out[f"{b}{theirs}.{part}"] = state[f"{o}{ours}.{part}"]
    return out


def frequencies(cfg: ModelConfig, scaling: dict | None) -> Frequencies:
    """gptlab's own rotary frequencies of the full-attention layers, with `scaling` or none."""
    return Frequencies(cfg.rotary_dims, cfg.rope_theta, scaling, cfg.block_size, torch.device("cpu"))


def rope_tensors(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Per-pair rotary factors llama.cpp divides each frequency by: Llama 3's from gptlab's own rope (the default
    frequencies over the scaled ones), LongRoPE's as the config gives them."""
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind == "llama3":
        plain, scaled = frequencies(cfg, None), frequencies(cfg, scaling)
        return {"rope_freqs.weight": plain.inv.double() / scaled.inv.double()}
    if kind == "longrope":
        return {"rope_factors_long.weight": torch.tensor(scaling["long_factor"], dtype=torch.float32),
                "rope_factors_short.weight": torch.tensor(scaling["short_factor"], dtype=torch.float32)}
    return {}


def add_hparams(writer, cfg: ModelConfig, arch: str) -> None:
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_head)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
        return
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.rotary_dims)
    if arch in NORMAL_ROPE:
        writer.add_vocab_size(cfg.vocab_size)
    add_rope_scaling(writer, cfg)
    add_windows(writer, cfg, arch)
    if cfg.attn_softcap is not None:
        writer.add_attn_logit_softcapping(cfg.attn_softcap)
    if cfg.logit_softcap is not None:
        writer.add_final_logit_softcapping(cfg.logit_softcap)


def add_rope_scaling(writer, cfg: ModelConfig) -> None:
    """Linear and YaRN as rope.scaling.* keys; LongRoPE's original context and attention factor (its factors are
    tensors, as are Llama 3's)."""
    gguf = _gguf()
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif kind in ("yarn", "longrope"):
        original = scaling["original_max_position_embeddings"]
        writer.add_rope_scaling_orig_ctx_len(original)
        if kind == "yarn":  # llama.cpp derives YaRN's attention factor (0.1 ln s + 1) from the factor itself
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(scaling.get("factor") or cfg.block_size / original)
        else:
            writer.add_rope_scaling_attn_factors(frequencies(cfg, scaling).attention)


def add_windows(writer, cfg: ModelConfig, arch: str) -> None:
    """Sliding windows where llama.cpp's architecture has them: the width, which layers slide (only where that is
    not the architecture's default) and their own rope base."""
    if arch == "phi3":  # as llama.cpp's converter writes it; its phi3 attends over the whole context anyway
        writer.add_sliding_window(cfg.sliding_window or 0)
    if arch not in SWA:
        return
    layers = sliding(cfg)
    if not any(layers):
        if arch == "gemma2":  # llama.cpp's Gemma 2 always slides some layers: a window as wide as the context
            writer.add_sliding_window(cfg.block_size)
        return
    writer.add_sliding_window(cfg.sliding_window)
    if layers != default_pattern(arch, cfg.n_layer):
        writer.add_sliding_window_pattern(layers)
    writer.add_rope_freq_base_swa(cfg.rope_local_theta or cfg.rope_theta)


def add_tokenizer(writer, tokenizer: Tokenizer, vocab_size: int) -> None:
    """The vocabulary in llama.cpp's terms; rows the model has beyond the tokenizer become unused pad tokens."""
    gguf = _gguf()
    data = json.loads(tokenizer.backend.to_str())
    model = data["model"]
    if model.get("type") != "BPE":
        raise GptlabError(f"GGUF export takes BPE tokenizers (byte-level or character), not {model.get('type')}")
    byte_level = bool(byte_level_steps(data))
    vocab = dict(model["vocab"])
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    by_id = {i: tok for tok, i in vocab.items()}
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            tokens.append(tok)
            types.append(T.CONTROL if added[i].get("special") else T.USER_DEFINED)
        elif not byte_level and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            tokens.append(tok)
            types.append(T.BYTE)
        else:
            tokens.append(tok if byte_level else tok.replace(" ", "\u2581"))  # SentencePiece writes spaces as ▁
            types.append(T.NORMAL)
    if byte_level:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer(data)[0])
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        writer.add_token_merges(merges)
    else:
        if not model.get("byte_fallback") or model.get("merges"):
            raise GptlabError("GGUF export takes a byte-level BPE or gptlab's character tokenizer; this BPE has "
                              "neither byte-level pre-tokenization nor byte fallback")
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores([0.0] * vocab_size)
        writer.add_add_space_prefix(False)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # the special tokens the model was trained with: llama.cpp adds the BOS where the tokenizer does, stops at EOS
    # and the end-of-turn token, and renders chats with the template
    writer.add_add_bos_token(bool(tokenizer.prefix_ids))
    eos, bos = tokenizer.eos_id, tokenizer.bos_id
    if eos is not None:
        writer.add_eos_token_id(eos)
        writer.add_bos_token_id(bos if bos is not None else eos)  # GPT-2's convention: <|endoftext|> is both
        writer.add_pad_token_id(tokenizer.pad_id if tokenizer.pad_id is not None else eos)
    if tokenizer.end_of_turn:
        writer.add_eot_token_id(tokenizer.end_of_turn[0])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def byte_level_steps(data: dict) -> list[dict]:
    """The pre-tokenizer's steps (a Sequence's, or the one step), where one of them is byte-level; else []."""
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return steps if any(s.get("type") == "ByteLevel" for s in steps) else []


def pre_tokenizer(data: dict) -> tuple[str, str | None]:
    """llama.cpp's name for how a byte-level BPE (tokenizer.json's `data`) splits text into words before merging,
    and a note where no pre-tokenizer of llama.cpp's splits as this one does (then GPT-2's is written)."""
    steps = byte_level_steps(data)
    level = next(s for s in steps if s.get("type") == "ByteLevel")
    steps = [s for s in steps if s is not level]
    name = None
    if not steps and level.get("use_regex", True):
        name = "gpt-2"
    elif len(steps) == 1 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") and \
            level.get("use_regex", True):
        name = "smollm"  # SmolLM 1/2: each digit alone, then GPT-2's split
    elif len(steps) == 1 and steps[0].get("type") == "Split" and not level.get("use_regex", True) and \
            steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
        name = SPLITS.get((steps[0].get("pattern") or {}).get("Regex"))
        if name == "llama-bpe" and not data["model"].get("ignore_merges"):
            name = "dbrx"  # the same split, without Llama 3's rule that a word in the vocabulary is one token
    if name is not None and not level.get("add_prefix_space"):
        return name, None
    return "gpt-2", ("llama.cpp has no pre-tokenizer that splits text into words as this tokenizer does; the file "
                     "names GPT-2's, so llama.cpp may tokenize some text (digits, contractions, spaces) otherwise")


def gguf_name(name: str, tokenizer: Tokenizer) -> str:
    """The model's name, unless llama.cpp would read it as Phi-3's: it gives a name with "phi3" or "phi-3" in it
    Phi-3's special-token rules, which fail to load (or change tokenization) without Phi-3's tokens."""
    if re.search("phi-?3", name, re.IGNORECASE) and not PHI3_TOKENS <= set(tokenizer.backend.get_vocab()):
        return re.sub("phi-?3", "Phi 3", name, flags=re.IGNORECASE)
    return name


def check_dtype(dtype: str) -> str:
    """`dtype` if GGUF export writes it; else one line saying what it writes (and, for a K-quant, why not)."""
    if dtype in K_QUANTS:
        raise GptlabError(f"GGUF export cannot write {dtype}: the gguf package quantizes Q4_0, Q4_1, Q5_0, Q5_1 and "
                          "Q8_0 but only reads K-quants; use --dtype q4_0, or export f16 and quantize the file with "
                          "llama.cpp's llama-quantize")
    if dtype not in DTYPES:
        raise GptlabError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return dtype


def export_gguf(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], dtype: str = "f16") -> Path:
    """Write `out` (.gguf) from a checkpoint folder (full, LoRA-merged or quantized, which is dequantized first: int4
    to q4_0 keeps its codes where its groups are whole Q4_0 blocks, everything else is quantized again)."""
    gguf = _gguf()
    check_dtype(dtype)
    out = Path(out)
    if out.exists():
        raise GptlabError(f"{out} already exists; choose a new file name (nothing was written)")
    check_outside(out, read_folders(checkpoint))
    model, tokenizer = load_checkpoint(checkpoint)
    cfg = model.config
    arch = architecture(cfg)
    group = int4_group(model.quantization) if dtype == "q4_0" else None
    messages = notes(cfg, arch) + requantize_notes(model.quantization, dtype)
    backend = json.loads(tokenizer.backend.to_str())
    if byte_level_steps(backend) and (note := pre_tokenizer(backend)[1]):
        messages.append(note)
    if model.quantization is not None:
        from gptlab.quant.layers import dequantize_model

        dequantize_model(model.float())  # float32: int4's codes come back exactly from its dequantized weights
    state = model_state(model)
    extra = set(state) - set(model_state(build_on_meta(cfg)))
    if extra:
        raise GptlabError(f"{checkpoint} has parts llama.cpp's {arch} does not ({sorted(extra)[0]}); GGUF export "
                          "takes full, LoRA-merged and quantized checkpoints")
    tensors = gguf_tensors(state, cfg, arch)
    kinds = tensor_kinds(tensors, dtype)
    for note in messages + fallback_notes(tensors, kinds, dtype):
        print(f"gptlab: note: {note}", file=sys.stderr)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(gguf_name(cfg.name or Path(checkpoint).name, tokenizer))
        add_hparams(writer, cfg, arch)
        writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[dtype]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer, cfg.vocab_size)
        for name, t in tensors.items():
            data, stored = encode(t.numpy(), kinds[name], gguf, group)
            writer.add_tensor(name, data, raw_dtype=stored)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, write)
    return out


def int4_group(spec: QuantSpec | None) -> int | None:
    """The group size of an int4 checkpoint whose groups are whole Q4_0 blocks (its codes go over as they are),
    else None."""
    if spec is None or spec.scheme != "int4":
        return None
    group = spec.group_size or DEFAULT_GROUP["int4"]
    return group if group % BLOCK == 0 else None


def requantize_notes(spec: QuantSpec | None, dtype: str) -> list[str]:
    """A note where a 4-bit checkpoint's codes are rounded again to make Q4_0's."""
    if spec is None or dtype != "q4_0" or int4_group(spec) or spec.bits != 4:
        return []
    if spec.scheme == "int4":
        why = f"int4 groups of {spec.group_size} are not whole Q4_0 blocks of {BLOCK}"
    else:
        why = f"{spec.scheme}'s levels are not Q4_0's evenly spaced ones"
    return [f"{why}: the weights are dequantized and quantized again to Q4_0 (a second rounding)"]


def tensor_kinds(tensors: dict[str, torch.Tensor], dtype: str) -> dict[str, str]:
    """Each tensor's GGUF type for `dtype`, where it is the head: llama.cpp ties the head to the embedding when the
    file has no output.weight."""
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    return {name: tensor_kind(name, tuple(t.shape), dtype, name == head) for name, t in tensors.items()}


def tensor_kind(name: str, shape: tuple[int, ...], dtype: str, head: bool) -> str:
    """The type llama.cpp's converter (f32, f16, q8_0) or `llama-quantize` (q4_0) gives this tensor: vectors f32;
    for q4_0 the position table f32 and the head Q8_0 (Q6_K there, which the gguf package cannot write); rows that
    are not whole blocks f16."""
    if len(shape) == 1 or dtype == "f32" or (dtype == "q4_0" and name == "position_embd.weight"):
        return "f32"
    kind = "q8_0" if dtype == "q4_0" and head else dtype
    if kind in ("q8_0", "q4_0") and shape[-1] % BLOCK:
        return "f16"
    return kind


def fallback_notes(tensors: dict[str, torch.Tensor], kinds: dict[str, str], dtype: str) -> list[str]:
    """One note naming the matrices written f16 because their rows are not whole blocks of `dtype`."""
    narrow = [f"{n} (rows of {t.shape[-1]})" for n, t in tensors.items()
              if dtype in ("q8_0", "q4_0") and t.dim() > 1 and kinds[n] == "f16"]
    if not narrow:
        return []
    return [f"{len(narrow)} matrices have rows that are not whole {dtype.upper()} blocks of {BLOCK} and are written "
            f"f16, as llama.cpp's llama-quantize falls back: {', '.join(narrow)}"]


def encode(data: np.ndarray, kind: str, gguf, group: int | None = None) -> tuple[np.ndarray, object]:
    """`data` in GGUF type `kind` (a name from `tensor_kind`); for q4_0 with an int4 `group`, int4's own codes where
    `data` is exactly an int4 matrix of that group size (gptlab's int4 Linear weights; not the float head)."""
    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    if kind == "q4_0" and group:
        blocks = int4_as_q4_0(data, group)
        if blocks is not None:
            return blocks, qtype
    return gguf.quants.quantize(data.astype(np.float32), qtype), qtype


def int4_as_q4_0(w: np.ndarray, group: int) -> np.ndarray | None:
    """Q4_0 bytes (rows, row_bytes) holding the int4 codes of `w`, the float32 dequantized form of an int4 matrix
    whose groups of `group` (a multiple of 32) run along its rows; None where `w` is not exactly that.

    Each group's absmax is its largest magnitude (code 7 is level 1.0), its codes w / absmax * 7. Every block of 32
    in the group takes scale absmax / 7 (Q4_0's f16) and nibbles code + 8, so Q4_0's (q - 8) * d is the code again.
    """
    if w.ndim != 2 or group % BLOCK or w.shape[-1] % group:
        return None
    groups = w.reshape(-1, group)  # (groups, g)
    absmax = np.abs(groups).max(axis=1, keepdims=True)  # (groups, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(absmax > 0, np.rint(groups / absmax * 7), 0).astype(np.int64)  # (groups, g) in -7..7
    if not np.array_equal(LEVELS[codes + 8] * absmax, groups):  # not int4's dequantize of these codes and scales
        return None
    halves = (codes + 8).astype(np.uint8).reshape(-1, 2, BLOCK // 2)  # (blocks, 2, 16): each block's two halves
    nibbles = halves[:, 0] | (halves[:, 1] << 4)  # (blocks, 16): Q4_0 keeps x[j] low, x[j + 16] high
    scale = np.repeat(absmax[:, 0] / 7, group // BLOCK).astype(np.float16)  # (blocks,)
    blocks = np.concatenate([scale.view(np.uint8).reshape(-1, 2), nibbles], axis=1)  # (blocks, 18)
    return blocks.reshape(w.shape[0], -1)

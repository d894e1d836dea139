"""Llama-family folders (Llama, Mistral, Gemma) to and from gptlab, without importing transformers.

Hugging Face keeps q, k and v (and the MLP's gate and up) as separate matrices; gptlab keeps each pair or triple
side by side in one Linear (`c_attn`, `c_fc`), so the conversion is a concatenation one way and a split the other.
"""

from __future__ import annotations

from typing import Any

import torch

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError

FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gemma": "GemmaForCausalLM"}
_ACT = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    kind = hf["model_type"]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise GptlabError(f"unsupported rope scaling {rope.get('rope_type', rope.get('type'))!r}; gptlab reads plain "
                          "rotary embeddings (rope_type default)")
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    if act not in _ACT:
        raise GptlabError(f"unsupported {kind} activation {act!r}; supported: {', '.join(_ACT)}")
    attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if attention_bias != mlp_bias:
        raise GptlabError(f"unsupported {kind} shape: attention_bias={attention_bias} with mlp_bias={mlp_bias}")
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or width // heads
    return ModelConfig(
        n_layer=hf["num_hidden_layers"], n_head=heads, n_embd=width, block_size=hf.get("max_position_embeddings", 2048),
        vocab_size=hf["vocab_size"], dropout=float(hf.get("attention_dropout", 0.0)), bias=attention_bias,
        norm_eps=hf.get("rms_norm_eps", 1e-6), mlp_hidden=hf["intermediate_size"],
        tie_embeddings=hf.get("tie_word_embeddings", kind == "gemma"), pos="rope",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), norm="rmsnorm",
        norm_offset=kind == "gemma", mlp=_ACT[act], n_kv_head=hf.get("num_key_value_heads") or heads,
        head_size=head_dim if head_dim * heads != width else None,
        sliding_window=hf.get("sliding_window") if kind == "mistral" else None, embed_scale=kind == "gemma",
        name=f"{kind}-import",
    )


def family_of(cfg: ModelConfig) -> str:
    if cfg.pos != "rope" or cfg.norm != "rmsnorm" or cfg.mlp == "gelu":
        raise GptlabError("this model is neither GPT-2 nor Llama-family in shape; export hf cannot name it")
    if cfg.norm_offset and cfg.embed_scale and cfg.mlp == "geglu":
        return "gemma"
    return "mistral" if cfg.sliding_window else "llama"


def config_to_hf(cfg: ModelConfig, ids: dict[str, Any]) -> dict[str, Any]:
    """`ids`: the tokenizer's bos_token_id, eos_token_id and pad_token_id."""
    kind = family_of(cfg)
    out = {
        "architectures": [FAMILIES[kind]], "model_type": kind, "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"}, "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu" if cfg.mlp == "swiglu" else
        "gelu_pytorch_tanh", "attention_bias": cfg.bias, "attention_dropout": cfg.dropout,
        **ids, "dtype": "float32",
    }
    if kind == "llama":
        out["mlp_bias"] = cfg.bias
    if kind == "mistral":
        out["sliding_window"] = cfg.sliding_window
    return out


def state_from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"transformer.wte.weight": hf["model.embed_tokens.weight"],
           "transformer.ln_f.weight": hf["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"]
    for i in range(cfg.n_layer):
        a, o = f"model.layers.{i}.", f"transformer.h.{i}."
        kinds = ["weight", "bias"] if cfg.bias else ["weight"]
        for w in kinds:
            out[o + f"attn.c_attn.{w}"] = torch.cat([hf[a + f"self_attn.{p}_proj.{w}"] for p in "qkv"])
            out[o + f"attn.c_proj.{w}"] = hf[a + f"self_attn.o_proj.{w}"]
            out[o + f"mlp.c_fc.{w}"] = torch.cat([hf[a + f"mlp.{p}_proj.{w}"] for p in ("gate", "up")])
            out[o + f"mlp.c_proj.{w}"] = hf[a + f"mlp.down_proj.{w}"]
        out[o + "ln_1.weight"] = hf[a + "input_layernorm.weight"]
        out[o + "ln_2.weight"] = hf[a + "post_attention_layernorm.weight"]
    return out


def state_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"],
           "model.norm.weight": state["transformer.ln_f.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    for i in range(cfg.n_layer):
        a, o = f"model.layers.{i}.", f"transformer.h.{i}."
        for w in (["weight", "bias"] if cfg.bias else ["weight"]):
            for p, t in zip("qkv", state[o + f"attn.c_attn.{w}"].split([q, kv, kv])):
                out[a + f"self_attn.{p}_proj.{w}"] = t.contiguous()
            out[a + f"self_attn.o_proj.{w}"] = state[o + f"attn.c_proj.{w}"]
            gate, up = state[o + f"mlp.c_fc.{w}"].chunk(2)
            out[a + f"mlp.gate_proj.{w}"], out[a + f"mlp.up_proj.{w}"] = gate.contiguous(), up.contiguous()
            out[a + f"mlp.down_proj.{w}"] = state[o + f"mlp.c_proj.{w}"]
        out[a + "input_layernorm.weight"] = state[o + "ln_1.weight"]
        out[a + "post_attention_layernorm.weight"] = state[o + "ln_2.weight"]
    return out

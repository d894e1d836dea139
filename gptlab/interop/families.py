"""The rotary families (Llama 1-3, Mistral, Gemma 1-3, Qwen2/2.5/3, Phi-3/4, OLMo 2, SmolLM2/3) to and from gptlab,
without importing transformers.

Each family is a set of `ModelConfig` fields; the table below says which, and how transformers' `config.json` names
them. Hugging Face keeps q, k and v (and the MLP's gate and up) as separate matrices, except Phi-3, which fuses them as
gptlab does; gptlab keeps each triple or pair side by side in one Linear (`c_attn`, `c_fc`), so the conversion is a
concatenation one way and a split the other. A `config.json` field gptlab does not read must be one known not to change
what the model computes; any other is refused, never dropped.
"""

from __future__ import annotations

from typing import Any

import torch

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.rope import SCALING

FAMILIES = {  # model_type -> transformers' class
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
}
MIXTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "phimoe", "olmoe", "deepseek_v2", "deepseek_v3",
            "dbrx", "jamba", "granitemoe", "llama4", "llama4_text", "gpt_oss", "minimax", "ernie4_5_moe", "glm4_moe")
_ACT = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu", "gelu_tanh": "geglu"}
_GEMMA = ("gemma", "gemma2", "gemma3_text")
_TIED = ("gemma", "gemma2", "gemma3_text", "smollm3")  # tie_word_embeddings defaults to True
_WINDOWED = ("mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "smollm3")  # read sliding_window
# Fields any family's config.json may hold that do not change what the model computes: ids, bookkeeping, training-only
# dropout, cache and generation settings.
HARMLESS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "initializer_range", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "_name_or_path",
    "tokenizer_class", "return_dict", "output_hidden_states", "output_attentions", "torchscript", "id2label",
    "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder", "prefix", "task_specific_params", "finetuning_task",
    "pruned_heads", "tf_legacy_loss", "use_bfloat16", "attention_dropout", "resid_pdrop", "embd_pdrop",
    "hidden_dropout", "embedding_dropout", "cache_implementation", "pretraining_tp", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "temperature", "top_k", "top_p", "repetition_penalty",
    "max_window_layers", "use_sliding_window", "sliding_window_pattern", "_sliding_window_pattern",
    "no_rope_layer_interval", "mlp_bias", "attention_bias", "use_bidirectional_attention", "auto_map",
    "base_model_tp_plan", "base_model_pp_plan", "output_scores", "num_return_sequences", "_attn_implementation",
    "keys_to_ignore_at_inference", "rope_scaling", "rope_parameters", "rope_theta", "rope_local_base_freq",
    "partial_rotary_factor", "original_max_position_embeddings", "head_dim", "num_key_value_heads",
    "tie_word_embeddings", "final_logit_softcapping", "attn_logit_softcapping", "query_pre_attn_scalar",
    "sliding_window", "layer_types", "no_rope_layers", "hidden_activation", "hidden_act",
}
_READ = {"num_hidden_layers", "num_attention_heads", "hidden_size", "max_position_embeddings", "vocab_size",
         "rms_norm_eps", "intermediate_size"}
# block_norms -> gptlab norm -> the Hugging Face name of the same norm in a layer
NORMS = {"pre": {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm"},
         "both": {"ln_1": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                  "ln_2": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"},
         "output": {"post_attn_norm": "post_attention_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}}


def parts(kind: str) -> dict[str, tuple[str, ...]]:
    """gptlab layer (under transformer.h.N.) -> its Hugging Face parts in a `kind` model, in the order they fuse."""
    fused = kind == "phi3"
    return {"attn.c_attn": ("self_attn.qkv_proj",) if fused else ("self_attn.q_proj", "self_attn.k_proj",
                                                                    "self_attn.v_proj"),
            "attn.c_proj": ("self_attn.o_proj",),
            "mlp.c_fc": ("mlp.gate_up_proj",) if fused else ("mlp.gate_proj", "mlp.up_proj"),
            "mlp.c_proj": ("mlp.down_proj",)}


def _rope(hf: dict[str, Any], kind: str) -> tuple[float, dict[str, Any] | None, float, float | None]:
    """(rope_theta, rope_scaling, rotary_fraction, rope_local_theta) from either of transformers' spellings:
    `rope_parameters` (transformers 5) or `rope_theta` with `rope_scaling` (the hub's older files)."""
    params = dict(hf.get("rope_parameters") or {})
    local = None
    if kind == "gemma3_text":
        if "full_attention" in params:
            local = (params.get("sliding_attention") or {})
            params = dict(params["full_attention"] or {})
        else:
            local = {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
        if local.get("rope_type", "default") != "default":
            raise GptlabError(f"unsupported rope scaling {local['rope_type']!r} on Gemma 3's sliding layers")
    params = {**(hf.get("rope_scaling") or {}), **params}
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 1e6 if kind == "gemma3_text" else 10000.0)))
    fraction = float(params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type == "default":
        scaling = None
    else:
        scaling = {"rope_type": rope_type, **params}
        if rope_type in SCALING and "original_max_position_embeddings" in SCALING[rope_type][0] | SCALING[rope_type][1]:
            scaling.setdefault("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
            if scaling["original_max_position_embeddings"] is None:
                del scaling["original_max_position_embeddings"]
    return theta, scaling, fraction, None if local is None else float(local.get("rope_theta", 10000.0))


def _windows(hf: dict[str, Any], kind: str, n_layer: int) -> tuple[int | None, list[str] | None]:
    """(sliding_window, layer_types), as each family's config class derives them; None for a window that covers the
    whole context, and layer_types only where layers differ."""
    window = hf.get("sliding_window") if kind in _WINDOWED else None
    types = hf.get("layer_types")
    if kind in ("qwen2", "qwen3", "smollm3") and not hf.get("use_sliding_window", False):
        window, types = None, None
    if kind == "gemma2":
        window = hf.get("sliding_window", 4096)
        types = types or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layer)]
    if kind == "gemma3_text":
        window = hf.get("sliding_window", 4096)
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        types = types or ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layer)]
    if kind in ("qwen2", "qwen3") and window and types is None:
        first = hf.get("max_window_layers", 28)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layer)]
    if window is not None and window >= hf.get("max_position_embeddings", 2048):
        window = None  # it never cuts anything off
    if window is None or types is None or set(types) == {"sliding_attention"}:
        return window, None
    if set(types) == {"full_attention"}:
        return None, None
    return window, list(types)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    kind = hf.get("model_type")
    if kind in MIXTURES or hf.get("num_local_experts") or hf.get("num_experts"):
        raise GptlabError(f"{kind} ({hf.get('architectures')}) is a mixture-of-experts model, which gptlab does not "
                          "support; it takes dense decoder-only models")
    if kind not in FAMILIES:
        raise GptlabError(f"unsupported architecture {kind!r} ({hf.get('architectures')})")
    unknown = sorted(k for k, v in hf.items() if k not in HARMLESS | _READ and v not in (None, False, [], {}))
    if unknown:
        raise GptlabError(f"this {kind} model's config.json sets {', '.join(unknown)}, which gptlab does not know; "
                          "it may change what the model computes, so it is not imported")
    act = hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh" if kind in _GEMMA else "silu")
    if act not in _ACT:
        raise GptlabError(f"unsupported {kind} activation {act!r}; supported: {', '.join(_ACT)}")
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    bias, qkv_bias = attention_bias, None
    if kind == "qwen2":  # q, k and v have biases, the output projection and the MLP none
        bias, qkv_bias = False, True
    elif attention_bias != mlp_bias:
        raise GptlabError(f"unsupported {kind} shape: attention_bias={attention_bias} with mlp_bias={mlp_bias}")
    heads, width, n_layer = hf["num_attention_heads"], hf["hidden_size"], hf["num_hidden_layers"]
    head_dim = hf.get("head_dim") or width // heads
    theta, scaling, fraction, local_theta = _rope(hf, kind)
    if (fraction != 1.0 or (scaling or {}).get("rope_type") == "longrope") and kind != "phi3":
        raise GptlabError(f"this {kind} model asks for partial rotary or LongRoPE, which transformers' {kind} does not "
                          "compute (Phi-3 does)")
    window, types = _windows(hf, kind, n_layer)
    context = hf.get("max_position_embeddings", 2048)
    if scaling and scaling["rope_type"] == "dynamic":  # made to run `factor` times past the context it names
        scaling["original_max_position_embeddings"] = context
        context = int(context * scaling["factor"])
    nope = None
    if kind == "smollm3":
        interval = hf.get("no_rope_layer_interval", 4)
        flags = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layer)]
        nope = [i for i, rope in enumerate(flags) if not rope] or None
    if hf.get("use_bidirectional_attention"):
        raise GptlabError(f"this {kind} model attends both ways (use_bidirectional_attention); gptlab's are causal")
    scalar = hf.get("query_pre_attn_scalar", 256) if kind in ("gemma2", "gemma3_text") else None
    return ModelConfig(
        n_layer=n_layer, n_head=heads, n_embd=width, block_size=context,
        vocab_size=hf["vocab_size"], dropout=float(hf.get("attention_dropout", 0.0) or 0.0), bias=bias,
        norm_eps=hf.get("rms_norm_eps", 1e-5 if kind in ("olmo2", "phi3") else 1e-6),
        mlp_hidden=hf["intermediate_size"],
        tie_embeddings=hf.get("tie_word_embeddings", kind in _TIED), pos="rope", rope_theta=theta, norm="rmsnorm",
        norm_offset=kind in _GEMMA, mlp=_ACT[act], n_kv_head=hf.get("num_key_value_heads") or heads,
        head_size=head_dim if head_dim * heads != width else None, sliding_window=window, embed_scale=kind in _GEMMA,
        qkv_bias=qkv_bias, rope_scaling=scaling, rotary_fraction=fraction,
        # the local base is needed where it differs, or where the full layers' scaling must not reach the local ones
        rope_local_theta=local_theta if local_theta != theta or (scaling and local_theta) else None,
        nope_layers=nope, layer_types=types,
        qk_norm={"qwen3": "head", "gemma3_text": "head", "olmo2": "all"}.get(kind),
        block_norms={"gemma2": "both", "gemma3_text": "both", "olmo2": "output"}.get(kind, "pre"),
        attn_scalar=scalar if scalar and scalar != head_dim else None,
        attn_softcap=hf.get("attn_logit_softcapping", 50.0) if kind == "gemma2" else hf.get("attn_logit_softcapping"),
        logit_softcap=hf.get("final_logit_softcapping", 30.0) if kind == "gemma2" else
        hf.get("final_logit_softcapping"),
        name=f"{kind}-import", family=kind,
    )


def config_to_hf(cfg: ModelConfig, ids: dict[str, Any], kind: str) -> dict[str, Any]:
    """transformers' `config.json` for `cfg` as a `kind` model. `ids`: the tokenizer's bos, eos and pad token ids.
    Fields the family cannot hold are written anyway; `hf_family` checks that reading the file back gives `cfg`."""
    rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default", **(cfg.rope_scaling or {})}
    context = cfg.block_size
    if rope["rope_type"] == "dynamic":
        context = rope.pop("original_max_position_embeddings", context)
    if cfg.rotary_fraction != 1.0:
        rope["partial_rotary_factor"] = cfg.rotary_fraction
    types = cfg.layer_types or [cfg.layer_type(i) for i in range(cfg.n_layer)]
    out: dict[str, Any] = {
        "architectures": [FAMILIES[kind]], "model_type": kind, "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "max_position_embeddings": context,
        "rms_norm_eps": cfg.norm_eps, "rope_parameters": rope, "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_activation" if kind in _GEMMA else "hidden_act": "silu" if cfg.mlp == "swiglu" else
        "gelu_pytorch_tanh", "attention_bias": cfg.bias if kind != "qwen2" else False,
        "attention_dropout": cfg.dropout, **ids, "dtype": "float32",
    }
    if kind == "gemma3_text":
        out["rope_parameters"] = {"full_attention": rope, "sliding_attention": {
            "rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}}
    if kind == "phi3":  # which its config class copies into rope_parameters, over what is there
        out["original_max_position_embeddings"] = rope.get("original_max_position_embeddings", cfg.block_size)
    if kind in ("llama", "smollm3"):
        out["mlp_bias"] = cfg.bias
    if kind in _WINDOWED:
        out["sliding_window"] = cfg.sliding_window
    if kind in ("qwen2", "qwen3", "smollm3"):
        out["use_sliding_window"] = cfg.sliding_window is not None
        out["max_window_layers"] = 0
    if kind in ("qwen2", "qwen3", "smollm3", "gemma2", "gemma3_text"):
        out["layer_types"] = types
    if kind == "smollm3":
        out["no_rope_layers"] = [int(i not in (cfg.nope_layers or ())) for i in range(cfg.n_layer)]
    if kind in ("gemma2", "gemma3_text"):
        out["query_pre_attn_scalar"] = cfg.attn_scalar or cfg.head_dim
        out["attn_logit_softcapping"] = cfg.attn_softcap
        out["final_logit_softcapping"] = cfg.logit_softcap
    return out


def hf_family(cfg: ModelConfig) -> str:
    """The transformers family that holds `cfg` exactly: its own (`cfg.family`) if that does, else the first whose
    config.json, read back, is `cfg` again."""
    for kind in [cfg.family, *FAMILIES] if cfg.family in FAMILIES else FAMILIES:
        try:
            if config_from_hf(config_to_hf(cfg, {}, kind)) == cfg:
                return kind
        except GptlabError:
            continue
    raise GptlabError("this model's shape is no transformers family gptlab knows (Llama, Mistral, Gemma 1-3, Qwen2/3, "
                      "Phi-3, OLMo 2, SmolLM3); export hf cannot name it")


def state_from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig, kind: str) -> dict[str, torch.Tensor]:
    """Hugging Face weights -> gptlab names; a weight neither used nor known to be a cache is one line."""
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return hf[key]

    out = {"transformer.wte.weight": take("model.embed_tokens.weight"),
           "transformer.ln_f.weight": take("model.norm.weight")}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    used.add("lm_head.weight")  # a tied model's copy of the embedding
    layer_parts = parts(kind)
    for i in range(cfg.n_layer):
        a, o = f"model.layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in layer_parts.items():
            bias = cfg.attention_bias if ours == "attn.c_attn" else cfg.bias
            for w in ["weight", "bias"] if bias else ["weight"]:
                out[f"{o}{ours}.{w}"] = torch.cat([take(f"{a}{p}.{w}") for p in theirs])
        for ours, theirs in NORMS[cfg.block_norms].items():
            out[f"{o}{ours}.weight"] = take(f"{a}{theirs}.weight")
        if cfg.qk_norm:
            for p in "qk":
                out[f"{o}attn.{p}_norm.weight"] = take(f"{a}self_attn.{p}_norm.weight")
    extra = sorted(set(hf) - used)
    if extra:
        raise GptlabError(f"the weights hold {extra[0]} (and {len(extra) - 1} more), which a {kind} model of this "
                          "config does not have" if len(extra) > 1 else f"the weights hold {extra[0]}, which a "
                          f"{kind} model of this config does not have")
    return out


def state_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, kind: str) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"],
           "model.norm.weight": state["transformer.ln_f.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    sizes = {"attn.c_attn": [q, kv, kv], "mlp.c_fc": [cfg.hidden_dim] * 2}
    for i in range(cfg.n_layer):
        a, o = f"model.layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in parts(kind).items():
            bias = cfg.attention_bias if ours == "attn.c_attn" else cfg.bias
            for w in ["weight", "bias"] if bias else ["weight"]:
                t = state[f"{o}{ours}.{w}"]
                pieces = t.split(sizes[ours]) if len(theirs) > 1 else [t]
                for p, piece in zip(theirs, pieces):
                    out[f"{a}{p}.{w}"] = piece.contiguous()
        for ours, theirs in NORMS[cfg.block_norms].items():
            out[f"{a}{theirs}.weight"] = state[f"{o}{ours}.weight"]
        if cfg.qk_norm:
            for p in "qk":
                out[f"{a}self_attn.{p}_norm.weight"] = state[f"{o}attn.{p}_norm.weight"]
    return out

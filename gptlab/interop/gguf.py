"""`gptlab export gguf`: a checkpoint as one GGUF file that llama.cpp (and llama-cpp-python) load and run.

Written with the `gguf` package (llama.cpp's own writer) under llama.cpp's tensor names and metadata keys, as its
`convert_hf_to_gguf.py` writes them:

- GPT-2 (learned positions, LayerNorm, GELU, biases) -> architecture `gpt2`: `attn_qkv` stays fused.
- Llama and Mistral (RoPE, RMSNorm, SwiGLU, no biases) -> `llama`: q and k rows are permuted from Hugging Face's
  rotate-half layout to the interleaved pairs llama.cpp's rotary embedding takes.
- Gemma (GeGLU, scaled embeddings, (1 + w) norms, tied head) -> `gemma`: norms are stored as 1 + w.

The tokenizer goes in the file too: a byte-level BPE as llama.cpp's `gpt2` vocabulary (tokens, types, merges), a
character tokenizer (single characters plus `<0xXX>` byte fallback) as its SentencePiece-style `llama` vocabulary.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from gptlab.checkpoint import load_checkpoint, model_state
from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.files import atomic_write
from gptlab.model import build_on_meta
from gptlab.tokenizer import Tokenizer

DTYPES = ("f32", "f16", "q8_0")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GptlabError("GGUF export needs the gguf package: pip install 'gptlab[gguf]'") from None
    return gguf


def architecture(cfg: ModelConfig) -> str:
    """llama.cpp's name for this shape, or one line saying why llama.cpp has none."""
    if cfg.pos == "learned":
        if cfg.norm == "layernorm" and cfg.mlp == "gelu" and cfg.bias and cfg.kv_heads == cfg.n_head and \
                cfg.head_size is None:
            return "gpt2"
    elif cfg.norm == "rmsnorm" and not cfg.bias:
        if cfg.mlp == "swiglu" and not cfg.norm_offset and not cfg.embed_scale:
            return "llama"
        if cfg.mlp == "geglu" and cfg.norm_offset and cfg.embed_scale and cfg.tie_embeddings:
            return "gemma"
    raise GptlabError(f"llama.cpp has no architecture for this model (positions {cfg.pos}, norm {cfg.norm}, MLP "
                      f"{cfg.mlp}, bias {cfg.bias}); GGUF export takes GPT-2, Llama/Mistral and Gemma shapes")


def permute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q or k (heads * hs, ...) from rotate-half order (x0..x_{h/2-1}, x_{h/2}..) to interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's names, in the layout its kernels take."""
    out = {"token_embd.weight": state["transformer.wte.weight"]}
    norm = (lambda t: t + 1) if arch == "gemma" else (lambda t: t)  # llama.cpp's Gemma multiplies by the weight
    out["output_norm.weight"] = norm(state["transformer.ln_f.weight"])
    if arch == "gpt2":
        out["position_embd.weight"] = state["transformer.wpe.weight"]
        out["output_norm.bias"] = state["transformer.ln_f.bias"]
    if not cfg.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    for i in range(cfg.n_layer):
        o, b = f"transformer.h.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = norm(state[o + "ln_1.weight"])
        out[b + "ffn_norm.weight"] = norm(state[o + "ln_2.weight"])
        out[b + "attn_output.weight"] = state[o + "attn.c_proj.weight"]
        out[b + "ffn_down.weight"] = state[o + "mlp.c_proj.weight"]
        if arch == "gpt2":
            for ours, theirs in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm"), ("attn.c_attn", "attn_qkv"),
                                 ("attn.c_proj", "attn_output"), ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down")):
                out[f"{b}{theirs}.bias"] = state[f"{o}{ours}.bias"]
            out[b + "attn_qkv.weight"] = state[o + "attn.c_attn.weight"]
            out[b + "ffn_up.weight"] = state[o + "mlp.c_fc.weight"]
            continue
        wq, wk, wv = state[o + "attn.c_attn.weight"].split([q, kv, kv])
        if arch == "llama":
            wq, wk = permute_rotary(wq, cfg.n_head), permute_rotary(wk, cfg.kv_heads)
        out[b + "attn_q.weight"], out[b + "attn_k.weight"], out[b + "attn_v.weight"] = wq, wk, wv
        out[b + "ffn_gate.weight"], out[b + "ffn_up.weight"] = state[o + "mlp.c_fc.weight"].chunk(2)
    return {k: v.detach().float().contiguous() for k, v in out.items()}


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
    if arch == "llama":
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_vocab_size(cfg.vocab_size)


def add_tokenizer(writer, tokenizer: Tokenizer, vocab_size: int) -> None:
    """The vocabulary in llama.cpp's terms; rows the model has beyond the tokenizer become unused pad tokens."""
    gguf = _gguf()
    data = json.loads(tokenizer.backend.to_str())
    model = data["model"]
    if model.get("type") != "BPE":
        raise GptlabError(f"GGUF export takes BPE tokenizers (byte-level or character), not {model.get('type')}")
    byte_level = (data.get("pre_tokenizer") or {}).get("type") == "ByteLevel"
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
        writer.add_tokenizer_pre("gpt-2")
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


def export_gguf(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], dtype: str = "f16") -> Path:
    """Write `out` (.gguf) from a checkpoint folder (full, LoRA-merged or quantized, which is dequantized first)."""
    gguf = _gguf()
    if dtype not in DTYPES:
        raise GptlabError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists():
        raise GptlabError(f"{out} already exists; choose a new file name (nothing was written)")
    model, tokenizer = load_checkpoint(checkpoint)
    cfg = model.config
    arch = architecture(cfg)
    if model.quantization is not None:
        from gptlab.quant.layers import dequantize_model

        dequantize_model(model)
    if cfg.sliding_window and cfg.sliding_window < cfg.block_size:
        print(f"gptlab: note: llama.cpp's llama architecture attends over the whole context; this model's sliding "
              f"window ({cfg.sliding_window}) makes its outputs differ beyond that many tokens", file=sys.stderr)
    state = model_state(model)
    extra = set(state) - set(model_state(build_on_meta(cfg)))
    if extra:
        raise GptlabError(f"{checkpoint} has parts llama.cpp's {arch} does not ({sorted(extra)[0]}); GGUF export "
                          "takes full, LoRA-merged and quantized checkpoints")
    tensors = gguf_tensors(state, cfg, arch)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(cfg.name or Path(checkpoint).name)
        add_hparams(writer, cfg, arch)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer, cfg.vocab_size)
        for name, t in tensors.items():
            data, stored = encode(t.numpy(), qtype, gguf)
            writer.add_tensor(name, data, raw_dtype=stored)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, write)
    return out


def encode(data: np.ndarray, qtype, gguf) -> tuple[np.ndarray, object]:
    """Vectors stay float32, as llama.cpp's converter keeps them; matrices take `qtype`, where a row of Q8_0 blocks
    (32 values) does not fit, F16."""
    F = gguf.GGMLQuantizationType
    if data.ndim == 1 or qtype == F.F32:
        return data.astype(np.float32), F.F32
    if qtype == F.Q8_0 and data.shape[-1] % 32 == 0:
        return gguf.quants.quantize(data.astype(np.float32), F.Q8_0), F.Q8_0
    return data.astype(np.float16), F.F16

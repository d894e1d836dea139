"""Hugging Face model folders, both ways, without importing transformers: GPT-2 and GPT-1 here, the rotary families
in `families.py`.

Our parameter names are GPT-2's own, so the only change for GPT-2 and GPT-1 is Hugging Face's `Conv1D`, which stores
its weight as (in, out) where `nn.Linear` stores (out, in): those four matrices per layer are transposed on the way in
and out. GPT-1 (`openai-gpt`) names its embeddings `tokens_embed` and `positions_embed` and normalizes after each
residual add, with no final norm.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer

from gptlab.checkpoint import (
    check_folder,
    load_checkpoint,
    load_model,
    model_state,
    read_folders,
    read_pickled_weights,
    read_weights,
    save_checkpoint,
)
from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.files import atomic_write_text, check_new_folder, read_json_object, write_folder
from gptlab.interop import families
from gptlab.model import GPT
from gptlab.tokenizer import GENERATION_CONFIG, SPECIAL_NAMES, TOKENIZER, TOKENIZER_CONFIG, Tokenizer, stop_list

SUPPORTED = ("gpt2", "openai-gpt", *families.FAMILIES)
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older GPT-2 checkpoints: not weights


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our config from a Hugging Face config.json; a missing or mistyped field is one line."""
    try:
        return _config_from_hf(hf)
    except KeyError as e:
        raise GptlabError(f"the {hf.get('model_type')} config.json lacks {e.args[0]!r}, which gptlab needs") from None
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
        raise GptlabError(f"the {hf.get('model_type')} config.json has a field of the wrong type or value ({e})"
                          ) from None


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        try:
            return families.config_from_hf(hf)  # says whether it is a mixture of experts
        except GptlabError as e:
            if kind in families.MIXTURES:
                raise
            raise GptlabError(f"{e}; supported: {', '.join(SUPPORTED)}") from None
    if kind in families.FAMILIES:
        return families.config_from_hf(hf)
    if kind == "openai-gpt":
        if hf.get("afn", "gelu") != "gelu":
            raise GptlabError(f"unsupported GPT-1 activation {hf['afn']!r}; gptlab's GPT-1 uses its tanh GELU")
        return ModelConfig(
            n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], block_size=hf.get("n_positions", 512),
            vocab_size=hf["vocab_size"], dropout=float(hf.get("resid_pdrop", 0.0)), bias=True,
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=True, block_norms="post", name="gpt1-import",
            family="openai-gpt")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise GptlabError(f"unsupported GPT-2 activation {act!r}; gptlab's GPT-2 uses the tanh GELU (gelu_new)")
    for flag, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                     ("reorder_and_upcast_attn", False)):
        if hf.get(flag, ok) != ok:
            raise GptlabError(f"unsupported GPT-2 option {flag}={hf[flag]}")
    return ModelConfig(
        n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)), vocab_size=hf["vocab_size"],
        dropout=float(hf.get("resid_pdrop", 0.0)), bias=True, norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp_hidden=hf.get("n_inner"), tie_embeddings=hf.get("tie_word_embeddings", True), name="gpt2-import",
        family="gpt2",
    )


def config_to_hf(cfg: ModelConfig, ids: dict[str, Any]) -> dict[str, Any]:
    """`ids`: the tokenizer's bos_token_id, eos_token_id and pad_token_id."""
    if cfg.block_norms == "post":
        return {"architectures": ["OpenAIGPTLMHeadModel"], "model_type": "openai-gpt", "n_layer": cfg.n_layer,
                "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_positions": cfg.block_size,
                "vocab_size": cfg.vocab_size, "afn": "gelu", "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, **ids,
                "dtype": "float32"}
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size, "vocab_size": cfg.vocab_size, "n_inner": cfg.mlp_hidden,
        "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings, **ids, "dtype": "float32",
    }


_GPT1_NAMES = {"tokens_embed.": "wte.", "positions_embed.": "wpe."}


def state_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 or GPT-1 weights -> gptlab names and layouts (`GPT2LMHeadModel` and `GPT2Model` keys,
    `OpenAIGPTLMHeadModel` and `OpenAIGPTModel` keys)."""
    out = {}
    for key, t in hf_state.items():
        if key.endswith(_BUFFERS):
            continue
        name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        for theirs, ours in _GPT1_NAMES.items():
            name = name.replace(f"transformer.{theirs}", f"transformer.{ours}")
        out[name] = t.t().contiguous() if name.endswith(_CONV1D) else t
    return out


def state_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """gptlab weights -> `GPT2LMHeadModel` layout; a model without biases gets zero biases, which is the same model."""
    state = model_state(model)
    if not model.config.bias:
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and name != "lm_head":
                width = module.weight.shape[0]
                state[f"{name}.bias"] = torch.zeros(width, dtype=module.weight.dtype)
    out = {k: (t.t().contiguous() if k.endswith(_CONV1D) else t) for k, t in state.items()}
    if model.config.block_norms == "post":  # GPT-1's names
        for theirs, ours in _GPT1_NAMES.items():
            out = {k.replace(f"transformer.{ours}", f"transformer.{theirs}"): t for k, t in out.items()}
    return out


def read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """`model.safetensors`, a sharded safetensors index, or `pytorch_model.bin` (loaded with weights_only=True)."""
    if (src / "model.safetensors").is_file():
        return read_weights(src / "model.safetensors")
    index = src / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (src / s).is_file()]
        if missing:
            raise GptlabError(f"{src} is missing weight shard(s): {', '.join(missing)}")
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_weights(src / shard))
        return state
    if (src / "pytorch_model.bin").is_file():
        return read_pickled_weights(src / "pytorch_model.bin")
    raise GptlabError(f"{src} has no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)")


GENERIC_TOKENIZERS = (None, "PreTrainedTokenizerFast", "TokenizersBackend")  # read tokenizer.json as it is


def read_hf_tokenizer(src: Path) -> Tokenizer:
    """A Hugging Face folder's tokenizer as `AutoTokenizer` gives it: its pipeline, special tokens, BOS rule, chat
    template, and the ids generation stops at (`generation_config.json`, else `config.json`).

    A folder whose `tokenizer_config.json` names transformers' generic class is read directly, as transformers reads
    it. A model-specific class (`LlamaTokenizer`, `GemmaTokenizer`, `Qwen2Tokenizer`, ...) is rebuilt by
    transformers from the vocabulary with that class's own normalization, which can tokenize differently from the
    folder's `tokenizer.json` (Llama 2's files do); so such a folder is read through `AutoTokenizer` itself when
    transformers is installed, and the pipeline it builds is what the checkpoint keeps."""
    generation = read_json_object(src / GENERATION_CONFIG)
    stops = generation.get("eos_token_id", read_json_object(src / "config.json").get("eos_token_id"))
    config = read_json_object(src / TOKENIZER_CONFIG)
    generic = config.get("tokenizer_class") in GENERIC_TOKENIZERS
    if not generic and (via := _via_transformers(src, stops)) is not None:
        return via
    if (src / TOKENIZER).is_file():
        if not generic:
            print(f"gptlab: note: transformers is not installed, so the tokenizer of {src} is read from its "
                  f"{TOKENIZER} as it is; transformers' {config.get('tokenizer_class')} may split some texts "
                  "otherwise (pip install transformers, then import again, for its exact ids)", file=sys.stderr)
        tok = Tokenizer.from_folder(src)
        return Tokenizer(tok.backend, tok.specials, stop_list(stops), tok.chat_template)  # config.json's stops too
    if (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        return Tokenizer.from_vocab_merges(src / "vocab.json", src / "merges.txt")
    if (src / "tokenizer.model").is_file():
        raise GptlabError(f"{src} has only a SentencePiece tokenizer.model; install transformers (and sentencepiece) "
                          "so that it can be converted, or add the model's tokenizer.json")
    raise GptlabError(f"{src} has no tokenizer (tokenizer.json, or vocab.json and merges.txt)")


def _via_transformers(src: Path, stops: Any) -> Tokenizer | None:
    """The tokenizer transformers builds for the folder, or None without transformers."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    try:
        hf = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except Exception as e:  # transformers raises many kinds; its first line says what is wrong
        why = str(e).splitlines()[0] if str(e) else repr(e)
        raise GptlabError(f"transformers cannot read the tokenizer in {src}: {why}") from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise GptlabError(f"the tokenizer in {src} ({type(hf).__name__}) has no tokenizers-library version")
    template = hf.chat_template
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    specials = {name: getattr(hf, name, None) for name in SPECIAL_NAMES}
    return Tokenizer(HFTokenizer.from_str(backend.to_str()), specials, stop_list(stops), template)


def import_hf(src: str | os.PathLike[str], out: str | os.PathLike[str], source: str | None = None) -> Path:
    """A Hugging Face model folder (GPT-2, GPT-1 and the rotary families of `families.py`) -> a gptlab checkpoint
    folder, tokenizer included:
    its special tokens, BOS rule, stop ids and chat template, as transformers reads them."""
    src = check_folder(src, required=("config.json",))
    out = check_new_folder(out, [src])  # before the weights are read
    hf_config = read_json_object(src / "config.json", missing_ok=False)
    multimodal = hf_config.get("model_type") == "gemma3" and isinstance(hf_config.get("text_config"), dict)
    if multimodal:  # Gemma 3 4B and up: the text model, without the vision tower
        tied = {"tie_word_embeddings": hf_config["tie_word_embeddings"]} if "tie_word_embeddings" in hf_config else {}
        hf_config = {**tied, **{k: v for k, v in hf_config["text_config"].items() if k != "architectures"},
                     "model_type": "gemma3_text"}
    config = config_from_hf(hf_config)
    tokenizer = read_hf_tokenizer(src)
    if tokenizer.vocab_size > config.vocab_size:
        raise GptlabError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                          f"{config.vocab_size}")
    tokenizer.check_chat_template()
    weights = read_hf_weights(src)
    if multimodal:
        weights = _text_weights(weights)
    if config.pos == "rope":
        try:
            weights = families.state_from_hf(weights, config, hf_config["model_type"])
        except KeyError as e:
            raise GptlabError(f"the weights in {src} lack {e.args[0]} for a {hf_config['model_type']} model") from None
    else:
        weights = state_from_hf(weights)
    state = {k: v.float() for k, v in weights.items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    model = load_model(config, state, f"the weights in {src}")
    source = source or str(src.resolve())
    return write_folder(out, lambda folder: save_checkpoint(folder, model, tokenizer, source=source), [src])


def _text_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Gemma 3 image-and-text model's weights -> its text model's, as `Gemma3ForCausalLM` names them (the file
    layouts of transformers 4.50+ and of earlier ones)."""
    out = {}
    for key, t in weights.items():
        for theirs, ours in (("model.language_model.", "model."), ("language_model.model.", "model."),
                             ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head.")):
            if key.startswith(theirs):
                out[ours + key.removeprefix(theirs)] = t
    return out


def export_hf(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """A gptlab checkpoint -> a folder that `AutoModelForCausalLM` and `AutoTokenizer` load offline, with the same
    special tokens, stop ids and chat template; the folder appears whole or not at all."""
    check_new_folder(out, read_folders(checkpoint))  # before anything is read
    model, tokenizer = load_checkpoint(checkpoint)
    if model.quantization is not None:  # transformers gets the float weights the codes stand for
        from gptlab.quant.layers import dequantize_model

        dequantize_model(model)
    with torch.device("meta"):
        plain = set(model_state(GPT(model.config)))
    if set(model_state(model)) != plain:
        raise GptlabError(f"{checkpoint} has parts GPT-2 does not (adapter layers or virtual tokens cannot be folded "
                          "into its weights); export hf takes full and LoRA checkpoints")
    ids = {"pad_token_id": None, **tokenizer.generation_config()}  # none, not the family's default pad id
    if model.config.pos == "rope":
        kind = families.hf_family(model.config)
        hf_config = families.config_to_hf(model.config, ids, kind)
        state = families.state_to_hf(model_state(model), model.config, kind)
    else:
        hf_config = config_to_hf(model.config, ids)
        state = state_to_hf(model)
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)

    def write(folder: Path) -> None:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_folder(folder)
        tok_config = {**tokenizer.config(), "model_max_length": model.config.block_size}
        specials = {k: v for k, v in tokenizer.specials.items() if v is not None}
        for name, data in (("config.json", hf_config), (TOKENIZER_CONFIG, tok_config),
                           ("special_tokens_map.json", specials)):
            atomic_write_text(folder / name, json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    return write_folder(out, write, read_folders(checkpoint))

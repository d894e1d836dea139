"""LoRA adapters in peft's format, both ways: `gptlab export peft RUN OUT` and `gptlab import peft ADAPTER --base B`.

A peft adapter is `adapter_config.json` + `adapter_model.safetensors`, with Hugging Face's module names
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`). GPT-2's names are gptlab's own (its `Conv1D`
layers take `fan_in_fan_out`). A Llama-family model keeps q, k and v (and gate and up) as separate Linear layers where
gptlab fuses them; a LoRA on a fused layer splits exactly: the same A for each part, and B's rows for that part's
outputs, since `B A x` restricted to those rows is `B_part A x`. The other way, the parts' updates stack into one
LoRA of the summed rank: A the parts' A side by side, B block-diagonal, each block scaled by its part's alpha / r.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from gptlab.checkpoint import check_folder, read_pickled_weights, read_weights
from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.files import atomic_write_text, read_json_object, write_folder
from gptlab.interop import families
from gptlab.peft.base import ADAPTER, ADAPTER_CONFIG, fingerprint
from gptlab.tokenizer import Tokenizer

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
def hf_parts(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """gptlab layer (under transformer.h.N.) -> its Hugging Face parts in the base's family, in the order they fuse
    (Phi-3 fuses as gptlab does: one part each)."""
    return families.parts(families.hf_family(cfg))


def part_sizes(layer: str, cfg: ModelConfig) -> list[int]:
    """Output rows of each Hugging Face part of a gptlab layer (`attn.c_attn`, ...): GPT-2's layers are one part."""
    q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    gated = cfg.gated
    sizes = {"attn.c_attn": [q, kv, kv], "attn.c_proj": [cfg.n_embd], "mlp.c_proj": [cfg.n_embd],
             "mlp.c_fc": [cfg.hidden_dim] * (2 if gated else 1)}[layer]
    return [sum(sizes)] if cfg.pos == "learned" or len(hf_parts(cfg)[layer]) == 1 else sizes


def layer_inputs(layer: str, cfg: ModelConfig) -> int:
    return {"attn.c_proj": cfg.n_head * cfg.head_dim, "mlp.c_proj": cfg.hidden_dim}.get(layer, cfg.n_embd)


def _lora_run(run: Path) -> tuple[dict[str, Any], Path]:
    config = read_json_object(run / ADAPTER_CONFIG, missing_ok=False) if (run / ADAPTER_CONFIG).is_file() else {}
    if config.get("method") not in ("lora", "qlora"):
        raise GptlabError(f"{run} is not a LoRA run (export peft takes a folder made by finetune --method lora or "
                          "qlora)")
    base = Path(config["base"])
    check_folder(base)
    return config, base


def export_peft(run: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """A gptlab LoRA run -> a peft adapter folder that `PeftModel.from_pretrained(hf_base, OUT)` loads onto the
    Hugging Face export of the run's base (`gptlab export hf BASE`), with equal logits."""
    run = Path(run)
    config, base = _lora_run(run)
    cfg = ModelConfig.from_json(str(base / "config.json"))
    if Tokenizer.from_folder(run).vocab_size > cfg.vocab_size:
        raise GptlabError(f"{run} added tokens to the base's vocabulary (task tokens); a peft adapter cannot carry the "
                          "grown embedding: `gptlab export hf` writes the merged model instead")
    r, alpha = int(config["r"]), float(config["alpha"])
    weights = read_weights(run / ADAPTER)
    gpt2 = cfg.pos == "learned"
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for key, a in weights.items():
        if not key.endswith(".lora_A.weight"):
            continue
        layer = key.removesuffix(".lora_A.weight")
        b = weights[f"{layer}.lora_B.weight"]  # (out, rank)
        if gpt2:
            parts = [(layer, b)]
        else:
            m = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", layer)
            if not m or m.group(2) not in hf_parts(cfg):
                raise GptlabError(f"{run}: no Hugging Face name for the LoRA layer {layer}")
            names = [f"model.layers.{m.group(1)}.{p}" for p in hf_parts(cfg)[m.group(2)]]
            parts = list(zip(names, b.split(part_sizes(m.group(2), cfg))))  # the same A for each part
        for name, part_b in parts:
            state[f"{PREFIX}{name}.lora_A.weight"] = a.clone()  # one copy per part: safetensors stores no aliases
            state[f"{PREFIX}{name}.lora_B.weight"] = part_b.contiguous()
            ranks[name] = a.shape[0]
    modules = sorted({name.rsplit(".", 1)[-1] for name in ranks})
    # a module of another rank than r (imported from peft) keeps gptlab's scale alpha / r: alpha_m = alpha * r_m / r
    rank_pattern = {name: k for name, k in ranks.items() if k != r}
    alpha_pattern = {name: alpha * k / r for name, k in rank_pattern.items()}
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "lora_dropout": float(config.get("dropout", 0.0)), "target_modules": modules, "fan_in_fan_out": gpt2,
        "bias": "none", "base_model_name_or_path": _source(base), "inference_mode": True, "modules_to_save": None,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
    }

    def write(folder: Path) -> None:
        save_file(state, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
        atomic_write_text(folder / PEFT_CONFIG, json.dumps(peft_config, indent=2) + "\n")

    return write_folder(out, write, [run, base])


def _source(base: Path) -> str | None:
    """Where the base came from (a hub id or a folder), if its import recorded it."""
    return read_json_object(base / "config.json").get("source")


def _peft_weights(src: Path) -> dict[str, torch.Tensor]:
    if (src / PEFT_WEIGHTS).is_file():
        return read_weights(src / PEFT_WEIGHTS)
    if (src / "adapter_model.bin").is_file():
        return read_pickled_weights(src / "adapter_model.bin")
    raise GptlabError(f"{src} has no adapter weights ({PEFT_WEIGHTS})")


def _pattern(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern: the first key that matches the end of the module's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def import_peft(src: str | os.PathLike[str], base: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """A peft LoRA adapter (trained on the Hugging Face model that `base` was imported from) -> a gptlab LoRA run
    folder on `base`, which `generate`, `serve`, `evaluate` and `export hf` load with the adapter merged."""
    src, base = Path(src), check_folder(base)
    peft_config = read_json_object(src / PEFT_CONFIG, missing_ok=False) if (src / PEFT_CONFIG).is_file() else None
    if peft_config is None:
        raise GptlabError(f"{src} is not a peft adapter folder: missing {PEFT_CONFIG}")
    if peft_config.get("peft_type") != "LORA":
        raise GptlabError(f"{src} is a {peft_config.get('peft_type')} adapter; gptlab imports LORA adapters")
    for flag, why in (("use_dora", "DoRA"), ("modules_to_save", "fully trained modules (modules_to_save)")):
        if peft_config.get(flag):
            raise GptlabError(f"{src} uses {why}, which gptlab's LoRA does not have")
    if peft_config.get("bias", "none") != "none":
        raise GptlabError(f"{src} trains biases (bias={peft_config['bias']!r}); gptlab's LoRA does not")
    cfg = ModelConfig.from_json(str(base / "config.json"))
    gpt2 = cfg.pos == "learned"
    r, alpha = int(peft_config.get("r", 8)), float(peft_config.get("lora_alpha", 8))
    rslora = bool(peft_config.get("use_rslora"))
    ranks, alphas = peft_config.get("rank_pattern") or {}, peft_config.get("alpha_pattern") or {}
    ours = alpha / r  # gptlab's scale for every layer; each part's own scale is folded into its B block
    weights = _peft_weights(src)
    found: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # gptlab layer -> part -> (A, B)
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        name = key.removeprefix(PREFIX).split(".lora_A.")[0]
        b_key = key.replace(".lora_A.", ".lora_B.")
        if b_key not in weights:
            raise GptlabError(f"{src}: {key} has no lora_B beside it")
        layer, part = _our_layer(name, gpt2, cfg, src, base)
        k = int(_pattern(ranks, name, r))
        scale = float(_pattern(alphas, name, alpha)) / (math.sqrt(k) if rslora else k)
        found.setdefault(layer, {})[part] = (a.float(), weights[b_key].float() * (scale / ours))
    if not found:
        raise GptlabError(f"{src} holds no LoRA weights")
    state = {}
    for layer, parts in found.items():
        a_all, b_all = _stack(layer, parts, cfg, src, base)
        state[f"{layer}.lora_A.weight"], state[f"{layer}.lora_B.weight"] = a_all, b_all
    targets = sorted({layer.split(".", 3)[-1] for layer in found})
    config = {"method": "lora", "r": r, "alpha": alpha, "dropout": float(peft_config.get("lora_dropout", 0.0)),
              "targets": targets, "base": str(base.resolve()), "base_fingerprint": fingerprint(base)}
    tokenizer = Tokenizer.from_folder(base)

    def write(folder: Path) -> None:
        save_file(state, str(folder / ADAPTER), metadata={"format": "pt"})
        atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
        tokenizer.save_folder(folder)

    return write_folder(out, write, [src, base])


def _our_layer(name: str, gpt2: bool, cfg: ModelConfig, src: Path, base: Path) -> tuple[str, int]:
    """A Hugging Face module name -> (gptlab layer, index of the part it is)."""
    m = re.fullmatch(r"transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)", name) if gpt2 else \
        re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    hit = None
    if m and gpt2:
        hit = (f"transformer.h.{m.group(1)}.{m.group(2)}", 0)
    elif m:
        for layer, parts in hf_parts(cfg).items():
            if m.group(2) in parts:
                hit = (f"transformer.h.{m.group(1)}.{layer}", parts.index(m.group(2)))
    if hit is None or int(m.group(1)) >= cfg.n_layer:
        raise GptlabError(f"the adapter in {src} does not fit the base {base}: it adapts {name}, which the base does "
                          "not have (an adapter for another model?)")
    return hit


def _stack(layer: str, parts: dict[int, tuple[torch.Tensor, torch.Tensor]], cfg: ModelConfig, src: Path,
           base: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA for a fused layer from its parts' (A, B): A (sum of ranks, in), B block-diagonal (out, sum of ranks);
    parts without an adapter get no rows of B."""
    kind = layer.split(".", 3)[-1]
    sizes, d_in = part_sizes(kind, cfg), layer_inputs(kind, cfg)
    a_list, blocks, rank = [], [], 0
    for i, (a, b) in sorted(parts.items()):
        if a.shape[1] != d_in or b.shape[0] != sizes[i] or b.shape[1] != a.shape[0]:
            raise GptlabError(f"the adapter in {src} does not fit the base {base}: {layer} (part {i}) has A "
                              f"{tuple(a.shape)} and B {tuple(b.shape)}, the base needs A (r, {d_in}) and B "
                              f"({sizes[i]}, r) (an adapter for another model?)")
        a_list.append(a)
        blocks.append((i, rank, b))
        rank += a.shape[0]
    b_all = torch.zeros(sum(sizes), rank)  # (out, rank)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    for i, col, b in blocks:
        b_all[starts[i]: starts[i] + sizes[i], col: col + b.shape[1]] = b
    return torch.cat(a_list).contiguous(), b_all.contiguous()

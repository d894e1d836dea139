"""Training configuration, and the one contract that YAML files and command-line flags share.

`--model gpt2` picks a preset and `--model.n_layer 4` sets a field, as `model: gpt2` or `model: {preset: gpt2,
n_layer: 4}` do in YAML; training settings live under `train` (`--train.max_steps 100`, `train: {max_steps: 100}`).
Flags win over the file, the file over the preset, the preset over the defaults. The flags are generated from the
dataclasses' typed fields, so a new field is a new flag with no second list to keep in sync.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from gptlab.config import ModelConfig, check_fields
from gptlab.errors import GptlabError

OPTIMIZERS = ("adamw", "muon", "adamw8bit", "paged_adamw", "paged_adamw8bit")


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps in all (a resumed run goes on to this)
    batch_size: int = 12  # sequences per micro-batch, summed over all processes
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # None: 6e-4 for pretraining, the method's own for fine-tuning (gptlab finetune --help)
    min_lr: float | None = None  # the floor of the cosine; None means lr / 10
    warmup_steps: int | None = None  # None: a tenth of max_steps, at most 100
    lr_decay_steps: int | None = None  # where the decay reaches min_lr; None means max_steps
    schedule: str = "cosine"  # after warm-up: cosine (down to min_lr), or wsd (flat, then linear to min_lr over the
    # last cooldown_fraction of the decay steps: the speedrun's)
    cooldown_fraction: float = 0.4  # wsd: the share of the steps (after warm-up) that cools down
    weight_decay: float = 0.1
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    optimizer: str = "adamw"  # adamw (PyTorch); muon (Muon for the blocks' matrices, AdamW for the rest); or
    # bitsandbytes' adamw8bit, paged_adamw, paged_adamw8bit
    muon_lr: float = 0.02  # Muon's peak learning rate (train.optimizer muon); the schedule scales it as it scales lr
    muon_momentum: float = 0.95  # Muon's (Nesterov) momentum
    muon_weight_decay: float = 0.0  # Muon's decoupled weight decay: each step shrinks the matrices by its lr times this
    log_every: int = 10
    eval_every: int = 100  # 0 disables evaluation
    eval_steps: int = 20
    save_every: int = 100  # checkpoints also at the end
    seed: int = 1337  # initialization and batches: the same seed, the same run
    dtype: str = "float32"  # autocast dtype: float32 (off), bfloat16 or float16
    compile: bool = False
    activation_checkpointing: bool = False
    loss_chunk: int | None = None  # tokens per chunk of the fused output layer and loss; 0: unfused; None: 1024
    # on the CPU (faster there), unfused on a GPU
    distributed: str = "ddp"  # under torchrun: ddp, or fsdp (FSDP2 fully_shard) for models that do not fit one GPU
    device: str | None = None  # default: cuda if present, else cpu
    tensorboard: bool = False
    threads: int | None = None  # CPU threads; None keeps PyTorch's choice (one per physical core)

    def __post_init__(self) -> None:
        check_fields(self, "train")
        at_least(self, "train", 1, "max_steps", "batch_size", "grad_accum", "eval_steps", "log_every", "threads")
        at_least(self, "train", 0, "weight_decay", "grad_clip", "min_lr", "muon_weight_decay")
        if not self.muon_lr > 0:
            raise GptlabError(f"train.muon_lr must be > 0, got {self.muon_lr}")
        for name in ("beta1", "beta2", "muon_momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise GptlabError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.device is not None:
            from gptlab.api import resolve_device

            resolve_device(self.device)  # a device this machine has
        if self.loss_chunk is not None and self.loss_chunk < 0:
            raise GptlabError(f"train.loss_chunk must be >= 0 (0: the unfused loss), got {self.loss_chunk}")
        for name in ("warmup_steps", "eval_every", "save_every"):
            if (getattr(self, name) or 0) < 0:
                raise GptlabError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:  # also refuses nan
            raise GptlabError(f"train.lr must be > 0, got {self.lr}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise GptlabError(f"train.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.schedule not in ("cosine", "wsd"):
            raise GptlabError(f"train.schedule must be cosine or wsd, got {self.schedule!r}")
        if not 0 < self.cooldown_fraction <= 1:
            raise GptlabError(f"train.cooldown_fraction must be in (0, 1], got {self.cooldown_fraction}")
        if self.optimizer not in OPTIMIZERS:
            raise GptlabError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise GptlabError(f"train.distributed must be ddp or fsdp, got {self.distributed!r}")

    def resolved(self, default_lr: float) -> TrainConfig:
        """These settings with the defaults that depend on the run filled in: `lr` (the method's) and warm-up."""
        warmup = self.warmup_steps if self.warmup_steps is not None else min(100, self.max_steps // 10)
        return dataclasses.replace(self, lr=self.lr if self.lr is not None else default_lr, warmup_steps=warmup)

    @property
    def decay_steps(self) -> int:
        return self.lr_decay_steps if self.lr_decay_steps is not None else self.max_steps

    @property
    def floor_lr(self) -> float:
        return self.min_lr if self.min_lr is not None else self.lr / 10


def at_least(settings: Any, section: str, low: float, *names: str) -> None:
    """Each named field is None or >= low."""
    for name in names:
        value = getattr(settings, name)
        if value is not None and value < low:
            raise GptlabError(f"{section}.{name} must be >= {low:g}, got {value}")


class Checked:
    """Settings checked when made: field types (as for the model config), then the ranges `check` adds."""

    section = ""

    def __post_init__(self) -> None:
        check_fields(self, self.section)
        self.check()

    def check(self) -> None:
        pass


@dataclass
class LoRAConfig(Checked):
    r: int = 8  # the rank of each update B A
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input
    targets: str = "c_attn,c_proj,c_fc"  # module names (or name endings), comma-separated
    section = "lora"

    def check(self) -> None:
        at_least(self, self.section, 1, "r")
        if not self.alpha > 0:
            raise GptlabError(f"{self.section}.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise GptlabError(f"{self.section}.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class QLoRAConfig(LoRAConfig):
    scheme: str = "nf4"  # the base's format: nf4 (QLoRA's), fp4, int4 or int8
    group_size: int = 64  # weights per scale
    double_quant: bool = True  # quantize the scales too (QLoRA's double quantization)
    section = "qlora"

    def check(self) -> None:
        from gptlab.quant.formats import SCHEMES

        super().check()
        at_least(self, self.section, 1, "group_size")
        if self.scheme not in SCHEMES:
            raise GptlabError(f"qlora.scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")


@dataclass
class AdapterConfig(Checked):
    bottleneck: int = 64
    targets: str = "attn.c_proj,mlp.c_proj"
    train_norms: bool = True
    section = "adapter"

    def check(self) -> None:
        at_least(self, self.section, 1, "bottleneck")


@dataclass
class PrefixConfig(Checked):
    virtual_tokens: int = 20
    hidden: int | None = 512  # the reparameterisation MLP's width; 0 or None learns the keys/values directly
    section = "prefix"

    def check(self) -> None:
        at_least(self, self.section, 1, "virtual_tokens")
        at_least(self, self.section, 0, "hidden")


@dataclass
class PromptConfig(Checked):
    virtual_tokens: int = 20
    init_text: str | None = None  # start the soft prompt from this text's token embeddings
    section = "prompt"

    def check(self) -> None:
        at_least(self, self.section, 1, "virtual_tokens")


@dataclass
class LlamaAdapterConfig(Checked):
    virtual_tokens: int = 10
    layers: int | None = None  # the top layers that get adaption prompts (at most the model's); None: 8, or all
    section = "llama_adapter"

    def check(self) -> None:
        at_least(self, self.section, 1, "virtual_tokens", "layers")


@dataclass
class ORPOConfig(Checked):
    beta: float = 0.1  # the weight of the odds-ratio term (the paper's lambda)
    adapter: str = "lora"  # what trains: lora (its settings: the lora section) or full
    section = "orpo"

    def check(self) -> None:
        if not self.beta > 0:
            raise GptlabError(f"{self.section}.beta must be > 0, got {self.beta}")
        if self.adapter not in ("lora", "full"):
            raise GptlabError(f"{self.section}.adapter must be lora or full, got {self.adapter!r}")


@dataclass
class DPOConfig(ORPOConfig):
    beta: float = 0.1  # how far from the reference the policy may move (the KL weight)
    loss_type: str = "sigmoid"  # sigmoid (the DPO paper), robust (Chowdhury et al.) or ipo (Azar et al.)
    label_smoothing: float = 0.0  # the assumed share of flipped pairs (sigmoid: conservative DPO; robust)
    section = "dpo"

    def check(self) -> None:
        super().check()
        if self.loss_type not in ("sigmoid", "robust", "ipo"):
            raise GptlabError(f"dpo.loss_type must be sigmoid, robust or ipo, got {self.loss_type!r}")
        if not 0 <= self.label_smoothing < 0.5:
            raise GptlabError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


@dataclass
class QATConfig(Checked):
    scheme: str = "int4"  # the format trained for: int4 or nf4 (per group), int8 (per row)
    group_size: int | None = None  # weights per scale; None: the scheme's default (64; int8: one row)
    start_step: int = 0  # fake quantization from this step on (before it, plain training)
    adapter: str = "full"  # what trains: full, or lora (its settings: the lora section)
    section = "qat"

    def check(self) -> None:
        if self.scheme not in ("int4", "nf4", "int8"):
            raise GptlabError(f"qat.scheme must be int4, nf4 or int8, got {self.scheme!r}")
        if self.adapter not in ("full", "lora"):
            raise GptlabError(f"qat.adapter must be full or lora, got {self.adapter!r}")
        at_least(self, self.section, 0, "start_step")
        at_least(self, self.section, 2, "group_size")


@dataclass
class AutoPromptConfig(Checked):
    """Settings of `gptlab autoprompt`, the search for discrete trigger tokens (Shin et al. 2020)."""

    steps: int = 50  # greedy coordinate steps: one trigger position changes (or stays) per step
    candidates: int = 16  # tokens re-scored per step, the top of the gradient's first-order estimate
    batch_size: int = 16  # training examples each step's gradient and candidates are scored on
    seed: int = 0  # the start triggers, batches and positions; the same seed gives the same prompt
    val_fraction: float = 0.1  # the held-out share, split as `gptlab finetune` splits it
    device: str | None = None  # default: cuda if present, else cpu
    section = "autoprompt"

    def check(self) -> None:
        at_least(self, self.section, 1, "steps", "candidates", "batch_size")
        at_least(self, self.section, 0, "seed")
        if not 0 < self.val_fraction < 1:
            raise GptlabError(f"autoprompt.val_fraction must be in (0, 1): the held-out loss needs examples, got "
                              f"{self.val_fraction}")
        if self.device is not None:
            from gptlab.api import resolve_device

            resolve_device(self.device)


SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "lora": LoRAConfig,
                             "qlora": QLoRAConfig, "adapter": AdapterConfig, "prefix": PrefixConfig,
                             "prompt": PromptConfig, "llama_adapter": LlamaAdapterConfig, "dpo": DPOConfig,
                             "orpo": ORPOConfig, "qat": QATConfig,
                             "autoprompt": AutoPromptConfig}
_SKIP = {"model": {"name"}}  # fields that are not settings


def _fields(section: str) -> dict[str, Any]:
    hints = typing.get_type_hints(SECTIONS[section])
    skip = _SKIP.get(section, set())
    return {f.name: hints[f.name] for f in dataclasses.fields(SECTIONS[section]) if f.name not in skip}


def add_section_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...] = ("model", "train")) -> None:
    """`--model PRESET` and `--SECTION.FIELD VALUE` for every field of the named sections."""
    if "model" in sections:
        parser.add_argument("--model", dest="model.preset", default=argparse.SUPPRESS, metavar="PRESET",
                            help="a preset from `gptlab presets`")
    for section in sections:
        group = parser.add_argument_group(f"{section} settings")
        notes = _field_comments(SECTIONS[section])
        defaults = {f.name: f.default for f in dataclasses.fields(SECTIONS[section])}
        for name, kind in _fields(section).items():
            default = defaults.get(name, dataclasses.MISSING)
            shown = "" if default is dataclasses.MISSING else f" (default {default})"
            group.add_argument(f"--{section}.{name}", dest=f"{section}.{name}", default=argparse.SUPPRESS,
                               metavar=_type_name(kind),
                               help=(notes.get(name, "") + shown).strip().replace("%", "%%") or None)


def _field_comments(cls: type) -> dict[str, str]:
    """Each field's one-line comment in the class's source: the flag's help, written once beside the field."""
    import inspect
    import re

    notes: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # a subclass's own win
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # no source (a frozen build): flags without help
            continue
        notes.update(re.findall(r"^    (\w+): [^=\n]+=[^#\n]*#\s*(.+)$", source, flags=re.M))
    return notes


def _type_name(kind: Any) -> str:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return (args[0] if args else kind).__name__.upper()


def coerce(value: Any, kind: Any, where: str) -> Any:
    """Check (YAML) or convert (a flag's string) `value` to the field type `kind`; a clear error otherwise."""
    options = [a for a in typing.get_args(kind)] if isinstance(kind, types.UnionType) else [kind]
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in options:
            return None
        raise GptlabError(f"{where} cannot be empty")
    for option in options:
        if option is type(None):
            continue
        if option is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
        elif option is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                try:
                    return int(value)
                except ValueError:
                    pass
        elif option is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        elif option is str and isinstance(value, str):
            return value
    return _wrong_type(value, kind, where)


def _wrong_type(value: Any, kind: Any, where: str) -> Any:
    raise GptlabError(f"{where} must be {_type_name(kind).lower()}, got {value!r}")


def merge_sections(file_values: dict[str, Any], flags: dict[str, str], where: str = "config"
                   ) -> dict[str, dict[str, Any]]:
    """{section: {field: value}} from a YAML mapping and dotted flags, every value type-checked."""
    merged: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for section, values in file_values.items():
        if section not in SECTIONS:
            continue  # other top-level keys (data, out, ...) belong to the verb
        if section == "model" and isinstance(values, str):
            values = {"preset": values}
        if not isinstance(values, dict):
            raise GptlabError(f"{where}: `{section}` must be a mapping of field names to values")
        for name, value in values.items():
            merged[section][name] = _checked(section, name, value, f"{where}: {section}.{name}")
    for dest, value in flags.items():
        section, name = dest.split(".", 1)
        merged[section][name] = _checked(section, name, value, f"--{dest}")
    return merged


def _checked(section: str, name: str, value: Any, where: str) -> Any:
    if section == "model" and name == "preset":
        return value
    known = _fields(section)
    if name not in known:
        raise GptlabError(f"{where}: unknown field; {section} has {', '.join(known)}")
    return coerce(value, known[name], where)


def model_config(values: dict[str, Any], vocab_size: int) -> ModelConfig:
    """The model config from a preset and fields; the vocabulary follows the data's tokenizer unless set, rounded
    up to a multiple of 64 (faster matrix products; the extra rows are never produced by the tokenizer)."""
    values = dict(values)
    preset = values.pop("preset", None)
    if "vocab_size" not in values:
        values["vocab_size"] = -(-vocab_size // 64) * 64
    elif values["vocab_size"] < vocab_size:
        raise GptlabError(f"model.vocab_size {values['vocab_size']} is smaller than the tokenizer's {vocab_size}")
    return ModelConfig.from_preset(preset, **values) if preset else ModelConfig(**values)

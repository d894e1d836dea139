"""Model configuration and named presets.

Field names follow GPT-2 code (nanoGPT, Hugging Face) so that readers of either recognise them. Parameter counts are
never hard-coded: they come from building the model on the meta device, which costs no memory even at 175B.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from gptlab.errors import GptlabError


@dataclass
class ModelConfig:
    """Shape and architecture of a decoder-only GPT.

    The defaults are GPT-2's (learned positions, pre-LayerNorm, GELU-tanh MLP, tied embeddings, biases).
    """

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # the context length: positions the model can attend over
    vocab_size: int = 50257
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
    norm_eps: float = 1e-5
    mlp_hidden: int | None = None  # width of the MLP's hidden layer; None means 4 * n_embd
    tie_embeddings: bool = True  # the output head shares the token embedding matrix
    # Llama-family options (defaults are GPT-2's):
    pos: str = "learned"  # "learned" position embeddings, or "rope" (rotary, on queries and keys)
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # or "rmsnorm"
    norm_offset: bool = False  # RMSNorm scales by (1 + weight), as Gemma
    mlp: str = "gelu"  # "gelu" (GPT-2), "swiglu" (Llama, Mistral) or "geglu" (Gemma)
    n_kv_head: int | None = None  # grouped-query attention: key/value heads; None means n_head
    head_size: int | None = None  # per-head width when it is not n_embd / n_head (Gemma 7B)
    sliding_window: int | None = None  # each query sees at most this many positions back (Mistral)
    embed_scale: bool = False  # token embeddings times sqrt(n_embd), as Gemma
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_dim(self) -> int:
        return self.mlp_hidden if self.mlp_hidden is not None else 4 * self.n_embd

    def validate(self) -> None:
        for name, kind in (("dropout", (int, float)), ("norm_eps", (int, float)), ("bias", bool),
                           ("tie_embeddings", bool)):
            if not isinstance(getattr(self, name), kind):
                raise GptlabError(f"model.{name} has the wrong type: {getattr(self, name)!r}")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise GptlabError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head and not self.head_size:
            raise GptlabError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise GptlabError(f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head ({self.kv_heads})")
        for name, allowed in (("pos", ("learned", "rope")), ("norm", ("layernorm", "rmsnorm")),
                              ("mlp", ("gelu", "swiglu", "geglu"))):
            if getattr(self, name) not in allowed:
                raise GptlabError(f"model.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise GptlabError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.mlp_hidden is not None and self.mlp_hidden <= 0:
            raise GptlabError(f"model.mlp_hidden must be positive, got {self.mlp_hidden}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GptlabError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str) -> ModelConfig:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise GptlabError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise GptlabError(f"{path} must hold a JSON object")
        try:
            return cls.from_dict(data.get("model", data))
        except GptlabError as e:
            raise GptlabError(f"{path}: {e}") from None

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise GptlabError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], "name": name, **overrides})


def _gpt(n_layer: int, n_head: int, n_embd: int, block_size: int, family: str) -> dict[str, Any]:
    return dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=50257,
                family=family)


def _llama(n_layer: int, n_head: int, n_embd: int, n_kv_head: int, mlp_hidden: int, vocab_size: int,
           block_size: int, family: str, **extra: Any) -> dict[str, Any]:
    return {**dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_kv_head=n_kv_head, mlp_hidden=mlp_hidden,
                   vocab_size=vocab_size, block_size=block_size, bias=False, tie_embeddings=False, pos="rope",
                   norm="rmsnorm", mlp="swiglu", family=family), **extra}


_GEMMA = dict(head_size=256, mlp="geglu", norm_offset=True, embed_scale=True, tie_embeddings=True, norm_eps=1e-6)

# name -> ModelConfig fields (plus "family", used only for the presets table).
_PRESET_TABLE: dict[str, dict[str, Any]] = {
    # GPT-2 as released by OpenAI and mirrored on the Hugging Face hub.
    "gpt2": _gpt(12, 12, 768, 1024, "GPT-2"),
    "gpt2-medium": _gpt(24, 16, 1024, 1024, "GPT-2"),
    "gpt2-large": _gpt(36, 20, 1280, 1024, "GPT-2"),
    "gpt2-xl": _gpt(48, 25, 1600, 1024, "GPT-2"),
    # GPT-3, Table 2.1 of Brown et al. 2020 (context 2048, GPT-2's tokenizer). Two rows of the paper do not multiply
    # out: XL prints 24 heads of 128 for d_model 2048, and 13B prints d_model 5140 for 40 heads of 128. We take 16 heads
    # for XL (d_model and d_head as printed) and d_model 5120 for 13B (heads and d_head as printed).
    "gpt3-small": _gpt(12, 12, 768, 2048, "GPT-3"),
    "gpt3-medium": _gpt(24, 16, 1024, 2048, "GPT-3"),
    "gpt3-large": _gpt(24, 16, 1536, 2048, "GPT-3"),
    "gpt3-xl": _gpt(24, 16, 2048, 2048, "GPT-3"),
    "gpt3-2.7b": _gpt(32, 32, 2560, 2048, "GPT-3"),
    "gpt3-6.7b": _gpt(32, 32, 4096, 2048, "GPT-3"),
    "gpt3-13b": _gpt(40, 40, 5120, 2048, "GPT-3"),
    "gpt3-175b": _gpt(96, 96, 12288, 2048, "GPT-3"),
    # Open-weight families (their Hugging Face configs): rotary positions, RMSNorm, gated MLPs, no biases.
    "llama2-7b": _llama(32, 32, 4096, 32, 11008, 32000, 4096, "Llama-2"),
    "llama2-13b": _llama(40, 40, 5120, 40, 13824, 32000, 4096, "Llama-2"),
    "llama2-70b": _llama(80, 64, 8192, 8, 28672, 32000, 4096, "Llama-2"),
    "mistral-7b": _llama(32, 32, 4096, 8, 14336, 32000, 32768, "Mistral", sliding_window=4096),
    "gemma-2b": _llama(18, 8, 2048, 1, 16384, 256000, 8192, "Gemma", **_GEMMA),
    "gemma-7b": _llama(28, 16, 3072, 16, 24576, 256000, 8192, "Gemma", **_GEMMA),
    "tiny-llama": _llama(2, 4, 64, 2, 172, 512, 256, "tiny"),
    # Small shapes for laptops and tests.
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=512, family="tiny"),
    "small-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=512, family="tiny"),
}

PRESET_FAMILY: dict[str, str] = {name: fields["family"] for name, fields in _PRESET_TABLE.items()}
PRESETS: dict[str, dict[str, Any]] = {
    name: {k: v for k, v in fields.items() if k != "family"} for name, fields in _PRESET_TABLE.items()
}

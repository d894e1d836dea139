"""Model configuration and named presets.

Field names follow GPT-2 code (nanoGPT, Hugging Face) so that readers of either recognise them. Parameter counts are
never hard-coded: they come from building the model on the meta device, which costs no memory even at 175B.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from gptlab.errors import GptlabError

MAX_PARAMS = 10**13  # more than any model has: a config beyond it is a mistake, refused before anything is built
MAX_CONTEXT = 1 << 24  # 16M positions: past every model's context (position tables grow with it)


def type_name(kind: Any) -> str:
    """`int`, `float or null`, `list of int`, ... for messages."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return " or ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(kind))
    origin = typing.get_origin(kind)
    if origin is list:
        return f"list of {type_name(typing.get_args(kind)[0])}"
    if origin is dict:
        return "mapping"
    return {int: "integer", float: "number", bool: "true or false", str: "text"}.get(kind, getattr(kind, "__name__",
                                                                                                    str(kind)))


def holds(value: Any, kind: Any) -> bool:
    """Whether a JSON/YAML value is of an annotated field type (an int is a float; a bool is neither; a float is
    finite)."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return any(holds(value, a) for a in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind is Any:
        return True
    origin = typing.get_origin(kind)
    if origin is list:
        return isinstance(value, list) and all(holds(v, typing.get_args(kind)[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_fields(settings: Any, section: str) -> None:
    """Every field of a settings dataclass holds a value of its annotated type: the one check that config.json,
    YAML recipes, flags and Python callers all pass through."""
    hints = typing.get_type_hints(type(settings))
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if not holds(value, hints[f.name]):
            raise GptlabError(f"{section}.{f.name} must be {type_name(hints[f.name])}, got {value!r}")


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
    mlp: str = "gelu"  # "gelu" (GPT-2), "swiglu" (Llama, Mistral), "geglu" (Gemma) or "relu2" (ReLU squared: Primer,
    #     modded-nanogpt's speedrun)
    n_kv_head: int | None = None  # grouped-query attention: key/value heads; None means n_head
    head_size: int | None = None  # per-head width when it is not n_embd / n_head (Gemma 7B)
    sliding_window: int | None = None  # each query sees at most this many positions back (Mistral)
    embed_scale: bool = False  # token embeddings times sqrt(n_embd), as Gemma
    # Families since 2024 (defaults leave every earlier model unchanged):
    qkv_bias: bool | None = None  # biases on q, k and v only (Qwen2: True with bias False); None follows `bias`
    rope_scaling: dict[str, Any] | None = None  # transformers' rope_parameters past rope_theta: {"rope_type":
    #     "llama3" | "linear" | "dynamic" | "yarn" | "longrope", ...} (Llama 3.1+, Phi-3/4 long context, Qwen YaRN)
    rotary_fraction: float = 1.0  # the share of each head's dimensions that rotate (Phi-4-mini 0.75)
    rope_local_theta: float | None = None  # rope base of the sliding-window layers, unscaled (Gemma 3)
    nope_layers: list[int] | None = None  # layers with no positional encoding at all (SmolLM3)
    layer_types: list[str] | None = None  # "sliding_attention" | "full_attention" per layer (Gemma 2/3, Qwen2);
    #     None: every layer slides when sliding_window is set (Mistral, Phi-3)
    qk_norm: str | None = None  # RMSNorm of q and k: "head" per head (Qwen3, Gemma 3), "all" per projection (OLMo 2)
    block_norms: str = "pre"  # "pre": x + f(norm(x)) (GPT-2, Llama); "post": norm(x + f(x)) and no final norm
    #     (GPT-1); "output": x + norm(f(x)) (OLMo 2); "both": x + norm(f(norm(x))) (Gemma 2/3)
    attn_scalar: float | None = None  # scores scaled by attn_scalar ** -0.5, not head_dim's (Gemma 2/3)
    attn_softcap: float | None = None  # attention scores through cap * tanh(score / cap) (Gemma 2)
    logit_softcap: float | None = None  # output logits through cap * tanh(logit / cap) (Gemma 2)
    name: str = field(default="custom", compare=False)
    family: str | None = field(default=None, compare=False)  # the transformers model_type export hf writes (import
    #     and presets set it); None: the first family that holds the shape exactly

    def __post_init__(self) -> None:
        self.validate()
        if self.head_size and self.head_size * self.n_head == self.n_embd:
            self.head_size = None  # one spelling for one shape, so that equal shapes compare equal
        if self.n_kv_head == self.n_head:
            self.n_kv_head = None  # the same: a config read back from transformers (heads set) equals ours

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def rotary_dims(self) -> int:
        """Dimensions of each head that rotary embeddings turn (an even number)."""
        return int(self.head_dim * self.rotary_fraction)

    @property
    def attention_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    def layer_type(self, layer: int) -> str:
        """A layer's attention kind, named as transformers names it: sliding_attention or full_attention."""
        if self.layer_types is not None:
            return self.layer_types[layer]
        return "sliding_attention" if self.sliding_window else "full_attention"

    def layer_window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_type(layer) == "sliding_attention" else None

    @property
    def gated(self) -> bool:
        """Whether the MLP multiplies a gate by an up projection (two matrices in `c_fc`)."""
        return self.mlp in ("swiglu", "geglu")

    @property
    def hidden_dim(self) -> int:
        return self.mlp_hidden if self.mlp_hidden is not None else 4 * self.n_embd

    def approx_params(self) -> int:
        """The parameter count from the shape alone (the weight matrices, without norms and biases): what can be
        checked against a file or the memory before a model is built."""
        d, q, kv = self.n_embd, self.n_head * self.head_dim, self.kv_heads * self.head_dim
        mlp = (3 if self.gated else 2) * d * self.hidden_dim
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        positions = self.block_size * d if self.pos == "learned" else 0
        return self.n_layer * (2 * d * q + 2 * d * kv + mlp) + embeddings + positions

    def validate(self) -> None:
        check_fields(self, "model")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "n_kv_head", "head_size",
                     "mlp_hidden"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise GptlabError(f"model.{name} must be a positive integer, got {value!r}")
        if self.block_size > MAX_CONTEXT:
            raise GptlabError(f"model.block_size {self.block_size:,} is past any model's context (at most "
                              f"{MAX_CONTEXT:,})")
        if self.approx_params() > MAX_PARAMS:
            raise GptlabError(f"this model config describes about {self.approx_params():.2g} parameters, more than "
                              f"any model has ({MAX_PARAMS:.0e}); check n_layer, n_embd, mlp_hidden and vocab_size")
        if self.n_embd % self.n_head and not self.head_size:
            raise GptlabError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise GptlabError(f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head ({self.kv_heads})")
        for name, allowed in (("pos", ("learned", "rope")), ("norm", ("layernorm", "rmsnorm")),
                              ("mlp", ("gelu", "swiglu", "geglu", "relu2"))):
            if getattr(self, name) not in allowed:
                raise GptlabError(f"model.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise GptlabError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.mlp_hidden is not None and self.mlp_hidden <= 0:
            raise GptlabError(f"model.mlp_hidden must be positive, got {self.mlp_hidden}")
        for name, allowed in (("qk_norm", (None, "head", "all")), ("block_norms", ("pre", "post", "output", "both"))):
            if getattr(self, name) not in allowed:
                raise GptlabError(f"model.{name} must be one of {', '.join(map(str, allowed))}, "
                                  f"got {getattr(self, name)!r}")
        for name in ("attn_scalar", "attn_softcap", "logit_softcap", "rope_local_theta", "sliding_window"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise GptlabError(f"model.{name} must be a positive number or null, got {value!r}")
        if not isinstance(self.rotary_fraction, (int, float)) or not 0 < self.rotary_fraction <= 1 or \
                self.rotary_dims % 2:
            raise GptlabError(f"model.rotary_fraction must be in (0, 1] and turn an even number of the "
                              f"{self.head_dim} head dimensions, got {self.rotary_fraction!r}")
        if self.layer_types is not None:
            if not isinstance(self.layer_types, list) or len(self.layer_types) != self.n_layer or \
                    set(self.layer_types) - {"sliding_attention", "full_attention"}:
                raise GptlabError(f"model.layer_types must list sliding_attention or full_attention for each of the "
                                  f"{self.n_layer} layers, got {self.layer_types!r}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise GptlabError("model.layer_types has sliding_attention layers but model.sliding_window is not set")
        if self.nope_layers is not None and (not isinstance(self.nope_layers, list) or any(
                not isinstance(i, int) or not 0 <= i < self.n_layer for i in self.nope_layers)):
            raise GptlabError(f"model.nope_layers must list layer numbers below {self.n_layer}, "
                              f"got {self.nope_layers!r}")
        from gptlab.rope import check_scaling  # the rotary module knows each rope_type's parameters

        check_scaling(self.rope_scaling)

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
        from gptlab.files import read_json_object

        data = read_json_object(path, missing_ok=False)
        data = data.get("model", data)
        if not isinstance(data, dict):
            raise GptlabError(f"{path}: `model` must hold a JSON object")
        try:
            return cls.from_dict(data)
        except GptlabError as e:
            raise GptlabError(f"{path}: {e}") from None

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise GptlabError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], "name": name, **overrides})


def _gpt(n_layer: int, n_head: int, n_embd: int, block_size: int, series: str) -> dict[str, Any]:
    return dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=50257,
                series=series)


def _llama(n_layer: int, n_head: int, n_embd: int, n_kv_head: int, mlp_hidden: int, vocab_size: int,
           block_size: int, series: str, **extra: Any) -> dict[str, Any]:
    return {**dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_kv_head=n_kv_head, mlp_hidden=mlp_hidden,
                   vocab_size=vocab_size, block_size=block_size, bias=False, tie_embeddings=False, pos="rope",
                   norm="rmsnorm", mlp="swiglu", series=series), **extra}


_GEMMA = dict(head_size=256, mlp="geglu", norm_offset=True, embed_scale=True, tie_embeddings=True, norm_eps=1e-6)
# Llama 3.1+'s rotary scaling, as its config.json writes it
_LLAMA3_ROPE = dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                           high_freq_factor=4.0, original_max_position_embeddings=8192))
_QWEN = dict(rope_theta=1e6, tie_embeddings=True, norm_eps=1e-6)


def _qwen3(n_layer: int, n_head: int, n_embd: int, mlp_hidden: int, series: str) -> dict[str, Any]:
    return _llama(n_layer, n_head, n_embd, 8, mlp_hidden, 151936, 40960, series, head_size=128, qk_norm="head",
                  family="qwen3", **_QWEN)


def _smollm2(n_layer: int, n_head: int, n_embd: int, n_kv_head: int, mlp_hidden: int, theta: float) -> dict[str, Any]:
    return _llama(n_layer, n_head, n_embd, n_kv_head, mlp_hidden, 49152, 8192, "SmolLM2", rope_theta=theta,
                  tie_embeddings=True, norm_eps=1e-5, family="llama")

# name -> ModelConfig fields (plus "series", the row's group in the presets table).
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
    # The small open models people fine-tune today, as their config.json files give them.
    "llama-3.2-1b": _llama(16, 32, 2048, 8, 8192, 128256, 131072, "Llama-3", tie_embeddings=True, norm_eps=1e-5,
                           family="llama", **_LLAMA3_ROPE),
    "llama-3.2-3b": _llama(28, 24, 3072, 8, 8192, 128256, 131072, "Llama-3", tie_embeddings=True, norm_eps=1e-5,
                           family="llama", **_LLAMA3_ROPE),
    "qwen2.5-0.5b": _llama(24, 14, 896, 2, 4864, 151936, 32768, "Qwen2.5", qkv_bias=True, family="qwen2", **_QWEN),
    "qwen2.5-1.5b": _llama(28, 12, 1536, 2, 8960, 151936, 32768, "Qwen2.5", qkv_bias=True, family="qwen2", **_QWEN),
    "qwen2.5-3b": _llama(36, 16, 2048, 2, 11008, 151936, 32768, "Qwen2.5", qkv_bias=True, family="qwen2", **_QWEN),
    "qwen3-0.6b": _qwen3(28, 16, 1024, 3072, "Qwen3"),
    "qwen3-1.7b": _qwen3(28, 16, 2048, 6144, "Qwen3"),
    "qwen3-4b": _qwen3(36, 32, 2560, 9728, "Qwen3"),
    # Gemma 2: query_pre_attn_scalar equals head_dim (256), so no attn_scalar
    "gemma-2-2b": _llama(26, 8, 2304, 4, 9216, 256000, 8192, "Gemma 2", **_GEMMA, block_norms="both",
                         attn_softcap=50.0, logit_softcap=30.0, sliding_window=4096, family="gemma2",
                         layer_types=["sliding_attention", "full_attention"] * 13),
    "gemma-3-1b": _llama(26, 4, 1152, 1, 6912, 262144, 32768, "Gemma 3", **_GEMMA, block_norms="both",
                         qk_norm="head", rope_theta=1e6, rope_local_theta=10000.0, sliding_window=512,
                         family="gemma3_text", layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 4
                         + ["sliding_attention"] * 2),
    "phi-3-mini": _llama(32, 32, 3072, 32, 8192, 32064, 4096, "Phi-3", norm_eps=1e-5, sliding_window=2047,
                         family="phi3"),
    # Phi-4-mini at its original context (4096): the LongRoPE factors for 128K come with its weights (import hf)
    "phi-4-mini": _llama(32, 24, 3072, 8, 8192, 200064, 4096, "Phi-4", norm_eps=1e-5, tie_embeddings=True,
                         rotary_fraction=0.75, family="phi3"),
    "smollm2-135m": _smollm2(30, 9, 576, 3, 1536, 100000.0),
    "smollm2-360m": _smollm2(32, 15, 960, 5, 2560, 100000.0),
    "smollm2-1.7b": _smollm2(24, 32, 2048, 32, 8192, 130000.0),
    "smollm3-3b": _llama(36, 16, 2048, 4, 11008, 128256, 65536, "SmolLM3", rope_theta=5e6, tie_embeddings=True,
                         norm_eps=1e-6, nope_layers=list(range(3, 36, 4)), family="smollm3"),
    "olmo-2-1b": _llama(16, 16, 2048, 16, 8192, 100352, 4096, "OLMo 2", rope_theta=500000.0, norm_eps=1e-6,
                        qk_norm="all", block_norms="output", family="olmo2"),
    # GPT-1 (Radford et al. 2018), the course's first GPT: 12 post-LayerNorm blocks, 768 wide, context 512
    "gpt1": dict(n_layer=12, n_head=12, n_embd=768, block_size=512, vocab_size=40478, block_norms="post",
                 family="openai-gpt", series="GPT-1"),
    "tiny-llama": _llama(2, 4, 64, 2, 172, 512, 256, "tiny"),
    # Small shapes for laptops and tests.
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=512, series="tiny"),
    "small-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=512, series="tiny"),
}

PRESET_FAMILY: dict[str, str] = {name: fields["series"] for name, fields in _PRESET_TABLE.items()}
PRESETS: dict[str, dict[str, Any]] = {
    name: {k: v for k, v in fields.items() if k != "series"} for name, fields in _PRESET_TABLE.items()
}

"""The presets table: shapes from `config.PRESETS`, parameter counts from models built on the meta device."""

from __future__ import annotations

from typing import Any

from gptlab.config import PRESET_FAMILY, PRESETS, ModelConfig
from gptlab.model import build_on_meta

# Bytes per parameter of each storage format, every parameter counted at that width, as the usual size tables do
# (the course's among them). `nf4 (gptlab)` is the size of gptlab's own 4-bit checkpoint instead: 4-bit codes for
# every Linear but the output head, their scales (one per 64 weights, 8-bit with double quantization plus a float32
# per 256 scales), and the embedding, head and norms kept in 16 bits.
BYTES_PER_PARAM = {"fp32": 4.0, "fp16/bf16": 2.0, "int8": 1.0, "int4": 0.5}
OWN_FORMAT = "nf4 (gptlab)"


def quantized_bytes(cfg: ModelConfig, scheme: str = "nf4", double_quant: bool = True, float_bytes: int = 2
                    ) -> int | None:
    """Bytes of a checkpoint in gptlab's quantized layout, counted from the layout itself (built on the meta
    device): codes and scales at their own dtypes, the float tensors at `float_bytes` each. None where the default
    group of 64 does not divide a layer's width (`gptlab quantize` then needs a --group-size)."""
    from gptlab.errors import GptlabError
    from gptlab.quant.formats import QuantSpec
    from gptlab.quant.layers import quantize_model

    try:
        model = quantize_model(build_on_meta(cfg), QuantSpec(scheme, None, double_quant))
    except GptlabError:
        return None
    state = model.state_dict()
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return sum(t.numel() * (float_bytes if t.is_floating_point() and name.endswith(("weight", "bias")) and
                            "qweight" not in name else t.element_size()) for name, t in state.items())


def preset_rows(names: list[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    for name in names or PRESETS:
        cfg = ModelConfig.from_preset(name)
        params = build_on_meta(cfg).num_params()
        rows.append({
            "name": name, "family": PRESET_FAMILY[name], "layers": cfg.n_layer, "d_model": cfg.n_embd,
            "heads": cfg.n_head, "d_head": cfg.head_dim, "context": cfg.block_size, "vocab": cfg.vocab_size,
            "parameters": params,
            "bytes": {**{fmt: int(params * b) for fmt, b in BYTES_PER_PARAM.items()},
                      OWN_FORMAT: quantized_bytes(cfg)},
        })
    return rows


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K" if unit else "K")):
        if n >= div:
            return f"{n / div:.1f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def render_table(rows: list[dict[str, Any]], sizes: bool = False) -> str:
    formats = [*BYTES_PER_PARAM, OWN_FORMAT]
    head = ["name", "family", "layers", "d_model", "heads", "d_head", "context", "vocab", "parameters"]
    if sizes:
        head += formats
    lines = []
    for r in rows:
        cells = [str(r[h]) for h in head[:-1 - (len(formats) if sizes else 0)]]
        cells.append(f"{r['parameters']:,} ({human(r['parameters'])})")
        if sizes:
            cells += [human(r["bytes"][fmt], "B") if r["bytes"][fmt] is not None else "n/a" for fmt in formats]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), *(fmt.format(*c) for c in lines)])

"""The presets table: shapes from `config.PRESETS`, parameter counts from models built on the meta device."""

from __future__ import annotations

from typing import Any

from gptlab.config import PRESET_FAMILY, PRESETS, ModelConfig
from gptlab.model import build_on_meta

# Bytes per parameter of each storage format. int4 formats also keep one scale per block of weights (64 for NF4 in
# bitsandbytes, 32 in llama.cpp's Q4_0); the table counts the 4-bit codes, as the usual size tables do.
BYTES_PER_PARAM = {"fp32": 4.0, "fp16/bf16": 2.0, "int8": 1.0, "int4": 0.5}


def preset_rows(names: list[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    for name in names or PRESETS:
        cfg = ModelConfig.from_preset(name)
        params = build_on_meta(cfg).num_params()
        rows.append({
            "name": name, "family": PRESET_FAMILY[name], "layers": cfg.n_layer, "d_model": cfg.n_embd,
            "heads": cfg.n_head, "d_head": cfg.head_dim, "context": cfg.block_size, "vocab": cfg.vocab_size,
            "parameters": params,
            "bytes": {fmt: int(params * b) for fmt, b in BYTES_PER_PARAM.items()},
        })
    return rows


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K" if unit else "K")):
        if n >= div:
            return f"{n / div:.1f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def render_table(rows: list[dict[str, Any]], sizes: bool = False) -> str:
    head = ["name", "family", "layers", "d_model", "heads", "d_head", "context", "vocab", "parameters"]
    if sizes:
        head += list(BYTES_PER_PARAM)
    lines = []
    for r in rows:
        cells = [str(r[h]) for h in head[:-1 - (len(BYTES_PER_PARAM) if sizes else 0)]]
        cells.append(f"{r['parameters']:,} ({human(r['parameters'])})")
        if sizes:
            cells += [human(r["bytes"][fmt], "B") for fmt in BYTES_PER_PARAM]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), *(fmt.format(*c) for c in lines)])

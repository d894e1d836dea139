"""`gptlab quantize`: write a quantized checkpoint folder, or measure every scheme on one model (the report).

The report answers the questions one asks before choosing a format: how many bytes on disk and in memory, how much
perplexity it costs, and how fast it decodes here. It also says whether NF4 beats Int4 at the same size, as the
QLoRA paper found.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from gptlab.checkpoint import (
    check_folder,
    load_checkpoint,
    model_state,
    read_folders,
    read_quantization,
    save_checkpoint,
)
from gptlab.errors import GptlabError
from gptlab.files import atomic_write_text, check_new_folder, write_folder
from gptlab.model import GPT
from gptlab.quant.formats import QuantSpec
from gptlab.quant.layers import quantize_model
from gptlab.tokenizer import Tokenizer


def refuse_quantized(path: Path) -> None:
    spec = read_quantization(path)
    if spec is not None:
        raise GptlabError(f"{path} is already quantized ({spec.scheme}); quantize its float source instead")


def quantize_checkpoint(src: str | Path, out: str | Path, spec: QuantSpec) -> Path:
    """Quantize a float checkpoint into a new folder; the folder appears whole or not at all."""
    src, out = Path(src), Path(out)
    if not (src / "adapter_config.json").is_file():
        check_folder(src)
        refuse_quantized(src)
    check_new_folder(out, read_folders(src))
    model, tokenizer = load_checkpoint(src, quantize=spec)
    if model.quantization is None:  # a fine-tuned folder: its merged float model
        quantize_model(model, spec)
    # the tokenizer's files (chat template included) travel too
    return write_folder(out, lambda folder: save_checkpoint(folder, model, tokenizer), read_folders(src))


@dataclass
class Variant:
    name: str
    spec: QuantSpec | None = None
    dtype: torch.dtype | None = None  # a float variant: the weights cast to this dtype


def variants(group_size: int | None) -> list[Variant]:
    g4 = group_size or 64
    return [Variant("float32", dtype=torch.float32), Variant("bf16", dtype=torch.bfloat16),
            Variant("int8", QuantSpec("int8", group_size)), Variant("int4", QuantSpec("int4", g4)),
            Variant("nf4", QuantSpec("nf4", g4)), Variant("fp4", QuantSpec("fp4", g4)),
            Variant("nf4+dq", QuantSpec("nf4", g4, double_quant=True))]


def eval_tokens(data: str | None, tokenizer: Tokenizer) -> tuple[np.ndarray, str]:
    """Val tokens: a prepared data folder's val split, else the embedded default text (Python's own library)."""
    if data:
        from gptlab.data.loader import TokenShards

        shards = TokenShards(data)
        shards.check_tokenizer(tokenizer, "the checkpoint")
        return np.asarray(shards.data["val"]), f"{data} (val split)"
    import inspect
    import json as json_module
    import textwrap

    text = "\n".join(inspect.getsource(m) for m in (textwrap, json_module.decoder, json_module.encoder))
    return np.array(tokenizer.encode(text), dtype=np.int64), "Python's textwrap and json modules (no --data given)"


def decode_speed(model: GPT, tokenizer: Tokenizer, new_tokens: int = 32, reps: int = 3) -> float:
    """Greedy decode tokens/s for one sequence (median of `reps`)."""
    from gptlab.generate import Engine, SamplingParams
    from gptlab.inference import prepare_for_inference

    engine = Engine(prepare_for_inference(model), tokenizer)
    prompt = [tokenizer.encode("def main():\n")[:8] or [0]]
    greedy = SamplingParams(temperature=0.0)
    times = []
    for _ in range(reps + 1):  # the first run warms up
        t = time.perf_counter()
        for _ in engine.generate_ids(prompt, new_tokens, greedy):
            pass
        times.append(time.perf_counter() - t)
    return new_tokens / statistics.median(times[1:])


def measure(model: GPT, tokenizer: Tokenizer, tokens: np.ndarray, max_tokens: int) -> dict[str, Any]:
    from gptlab.api import LLM
    from gptlab.evaluate import perplexity

    state = model_state(model)
    on_disk = len(safetensors_bytes(state, metadata={"format": "pt"}))
    in_memory = sum(t.numel() * t.element_size() for t in state.values())
    shards = SimpleNamespace(data={"val": tokens})
    ppl = perplexity(LLM(model, tokenizer), shards, "val", max_tokens=max_tokens)  # type: ignore[arg-type]
    return {"disk_bytes": on_disk, "memory_bytes": in_memory, "perplexity": ppl["perplexity"],
            "eval_tokens": ppl["tokens"], "decode_tok_s": decode_speed(model, tokenizer)}


def report(src: str | Path, data: str | None = None, group_size: int | None = None, out: str | Path | None = None,
           max_tokens: int = 20_000) -> tuple[list[dict[str, Any]], str, Path]:
    """Rows (one per format), the rendered table, and the new folder `out` that holds it (None: written nowhere)."""
    src = Path(src)
    check_folder(src)
    if out is not None:
        check_new_folder(out, [src])
    refuse_quantized(src)
    base, tokenizer = load_checkpoint(src, dtype=torch.float32)
    tokens, where = eval_tokens(data, tokenizer)
    fp16_bytes = 2 * sum(t.numel() for t in model_state(base).values())
    rows = []
    for v in variants(group_size):
        model = copy.deepcopy(base)
        if v.dtype is not None:
            model.to(v.dtype)
        else:
            quantize_model(model, v.spec)
        row = {"format": v.name, **measure(model, tokenizer, tokens, max_tokens)}
        row["vs_fp16"] = row["memory_bytes"] / fp16_bytes
        row["bits_per_weight"] = 8 * row["memory_bytes"] / (fp16_bytes // 2)
        rows.append(row)
        del model
    ref = rows[0]["perplexity"]
    for row in rows:
        row["ppl_change"] = row["perplexity"] - ref
    table = render(rows, src, where, group_size or 64)
    if out is None:
        return rows, table, None

    def write(folder: Path) -> None:
        atomic_write_text(folder / "quantize-report.md", table + "\n")
        atomic_write_text(folder / "quantize-report.json", json.dumps(rows, indent=2) + "\n")

    return rows, table, write_folder(out, write, [src])


def render(rows: list[dict[str, Any]], src: Path, where: str, group: int) -> str:
    head = "| format | disk | weights in memory | vs fp16 | bits/weight | perplexity | change | decode tok/s |"
    lines = [f"Quantization report for {src} (perplexity on {rows[0]['eval_tokens']:,} tokens of {where}; 4-bit "
             f"groups of {group}; decode: greedy, batch 1, {torch.get_num_threads()} CPU threads)", "",
             head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['format']} | {r['disk_bytes'] / 2**20:.2f} MiB | {r['memory_bytes'] / 2**20:.2f} MiB | "
                     f"{r['vs_fp16']:.3f} | {r['bits_per_weight']:.2f} | {r['perplexity']:.4f} | "
                     f"{r['ppl_change']:+.4f} | {r['decode_tok_s']:.1f} |")
    by = {r["format"]: r for r in rows}
    nf4, int4 = by["nf4"]["perplexity"], by["int4"]["perplexity"]
    same = math.isclose(by["nf4"]["memory_bytes"], by["int4"]["memory_bytes"])
    verdict = "better than" if nf4 < int4 else "not better than"
    lines += ["", f"NF4 is {verdict} Int4 here: perplexity {nf4:.4f} vs {int4:.4f}"
              + (" at the same size" if same else "") + " (the QLoRA paper finds NF4 better)."]
    return "\n".join(lines)

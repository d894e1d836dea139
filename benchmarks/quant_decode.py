"""Decode speed of quantized models: gptlab float32 and bf16 against its int8, int4 and nf4 kernels (and, with
`--llama-cpp`, llama.cpp on GGUF files of the same weights). GPT-2 124M with random weights, one sequence, greedy.

Decoding one sequence reads every weight once per token, so fewer bytes per weight should mean more tokens per
second, as long as the product reads the codes directly (`gptlab/quant/kernels.py`). Each quantized model is run
with the rest of its weights (embeddings, the output head, norms) in float32 and in bf16: the 50257 x 768 head is a
third of GPT-2's weights, and in float32 it outweighs all the quantized blocks together. Rounds are interleaved so
that drift in the machine hits every variant alike; medians are quoted.

    python benchmarks/quant_decode.py [--reps 3] [--new-tokens 128] [--prompt-tokens 16] [--llama-cpp] [--unfused]

`--unfused` also times the per-product dequantization that a quantized layer does without its kernel (slow).
`--llama-cpp` needs llama-cpp-python (`make test-llama-cpp` builds it) and the gguf package (`gptlab[gguf]`).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gptlab.checkpoint import save_checkpoint
from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.generate import Engine, SamplingParams
from gptlab.inference import prepare_for_inference
from gptlab.model import GPT
from gptlab.quant.formats import QuantSpec
from gptlab.quant.kernels import FusedQuantLinear
from gptlab.quant.layers import QuantLinear, quantize_model
from gptlab.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0)
GGUF_TYPES = ("f16", "q8_0", "q4_0")


@dataclass
class Variant:
    name: str
    dtype: torch.dtype  # of the weights that stay float
    spec: QuantSpec | None = None
    fused: bool = True  # quantized layers on their kernels (False: QuantLinear's per-product dequantization)


def variants(unfused: bool) -> list[Variant]:
    f32, bf16 = torch.float32, torch.bfloat16
    out = [Variant("float32", f32), Variant("bf16", bf16)]
    for dtype in (f32, bf16):
        for spec in (QuantSpec("int8"), QuantSpec("int8", 64), QuantSpec("int4", 32), QuantSpec("int4", 128),
                     QuantSpec("nf4", 64)):
            out.append(Variant(f"{spec.scheme} g{spec.group_size}" if spec.group_size else spec.scheme, dtype, spec))
    if unfused:  # the float32 models only: these are slow
        out += [Variant(v.name, v.dtype, v.spec, fused=False) for v in out
                if v.spec is not None and v.dtype == f32 and v.name in ("int8", "int4 g32", "nf4 g64")]
    return out


def build(base: GPT, v: Variant) -> GPT:
    model = copy.deepcopy(base)
    if v.spec is not None:
        quantize_model(model, v.spec)
    return prepare_for_inference(model.to(v.dtype), quantized_kernels=v.fused)


def bytes_per_token(model: GPT) -> int:
    """Bytes of every tensor a decoding step reads in full: all but the embedding tables (one row each)."""
    skip = {model.transformer.wte.weight.data_ptr()}
    if hasattr(model.transformer, "wpe"):
        skip.add(model.transformer.wpe.weight.data_ptr())
    seen, total = set(skip), 0
    head = getattr(model.lm_head, "weight", None)
    if head is not None and head.data_ptr() in skip:  # a tied head that kept the embedding's storage: read whole
        total += head.numel() * head.element_size()
    for t in [*model.parameters(), *model.buffers()]:
        key = id(t) if t.is_mkldnn else t.data_ptr()  # oneDNN's packed weights have no plain storage
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def label(model: GPT, v: Variant) -> str:
    """How the quantized layers compute: on their kernel, or dequantized for each product."""
    if v.spec is None:
        return "-"
    kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, (FusedQuantLinear, QuantLinear))})
    return ", ".join("dequantized each product" if k == "QuantLinear" else k for k in kinds)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def llama_cpp_runners(base: GPT, prompt: list[int], new: int, tmp: Path) -> dict[str, tuple[Callable, int]]:
    """llama.cpp on GGUF exports of `base` (2 threads): name -> (run, file bytes). Types the exporter refuses are
    skipped with a message."""
    try:
        import llama_cpp
    except ImportError:
        print("# --llama-cpp: llama-cpp-python is not installed; `make test-llama-cpp` builds it (about 7 minutes on "
              "2 cores), or pip install llama-cpp-python")
        return {}
    from gptlab.interop.gguf import export_gguf

    folder = tmp / "ckpt"
    # GGUF files carry a tokenizer; any byte-level BPE will do (the benchmark feeds token ids)
    save_checkpoint(folder, base, Tokenizer.train_bpe(["The train left the station at noon. " * 20], 300))
    runners = {}
    for dtype in GGUF_TYPES:
        path = tmp / f"gpt2-{dtype}.gguf"
        try:
            export_gguf(folder, path, dtype)
        except GptlabError as e:
            print(f"# llama.cpp {dtype}: skipped, the GGUF export refuses it ({e})")
            continue
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)

        def run(llm=llm) -> list[int]:
            out = []
            for t in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
                out.append(t)
                if len(out) == new:
                    return out
            return out

        runners[f"llama.cpp {dtype}"] = (run, path.stat().st_size)
    return runners


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--llama-cpp", action="store_true", help="also run llama.cpp on f16 / q8_0 / q4_0 GGUF files")
    parser.add_argument("--unfused", action="store_true", help="also time quantized layers without their kernels")
    args = parser.parse_args()

    torch.manual_seed(0)
    base = GPT(ModelConfig.from_preset("gpt2")).eval()  # GPT-2 124M, random weights
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, base.config.vocab_size, (args.prompt_tokens,), generator=g).tolist()
    n = args.new_tokens
    print(f"# machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"# GPT-2 124M (random weights), batch 1, {args.prompt_tokens}-token prompt + {n} greedy tokens; "
          f"tok/s = {n} / (time of the whole generation), median of {args.reps} interleaved rounds")

    runs: dict[str, tuple[Callable, int, str]] = {}  # key -> (run, bytes read per token, how its layers compute)
    for v in variants(args.unfused):
        model = build(base, v)
        engine = Engine(model)
        key = f"gptlab {v.name}" + (f" (rest {str(v.dtype).removeprefix('torch.')})" if v.spec else "")
        run = lambda engine=engine: list(engine.generate_ids([prompt], n, GREEDY))
        runs[key + ("" if v.fused else ", unfused")] = (run, bytes_per_token(model), label(model, v))
    tmp = tempfile.TemporaryDirectory()
    if args.llama_cpp:
        for key, (run, size) in llama_cpp_runners(base, prompt, n, Path(tmp.name)).items():
            runs[key] = (run, size, "- (MB: the GGUF file)")

    for run, *_ in runs.values():
        run()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.reps):
        for key, (run, *_) in runs.items():
            times[key].append(timed(run))
    tmp.cleanup()

    tps = {k: n / statistics.median(v) for k, v in times.items()}
    ref = tps["gptlab float32"]
    print()
    print("| engine, weights | MB read per token | tok/s (median) | rounds (tok/s) | vs gptlab float32 | quantized "
          "layers |")
    print("|---|---:|---:|---:|---:|---|")
    for key, (_, nbytes, note) in runs.items():
        spread = f"{n / max(times[key]):.0f}-{n / min(times[key]):.0f}"
        print(f"| {key} | {nbytes / 1e6:.0f} | {tps[key]:.1f} | {spread} | {tps[key] / ref:.2f}x | {note} |")


if __name__ == "__main__":
    main()

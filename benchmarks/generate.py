"""Decode speed: gptlab's engine vs Hugging Face transformers `generate`, same weights, one process, interleaved.

Decoding one sequence is bound by reading every weight once per token, so each result is also given as a fraction of
that bound: (copy bandwidth measured here) / (weight bytes read per token).

    python benchmarks/generate.py [--device cpu|cuda] [--reps 3] [--new-tokens 128] [--shape gpt2|llama-3.2-1b|...]

`--shape` takes GPT-2 124M (the default) or any family preset (`gptlab presets`): transformers builds that family's
model with random weights of the real shape and gptlab imports the same weights.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from gptlab.checkpoint import load_model
from gptlab.config import ModelConfig
from gptlab.generate import Engine, SamplingParams
from gptlab.inference import prepare_for_inference
from gptlab.interop import families
from gptlab.interop.hf import config_from_hf, state_from_hf

GREEDY = SamplingParams(temperature=0)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[..., object], device: str, *args: object) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn(*args)
    sync(device)
    return time.perf_counter() - t0


def bandwidths(device: str, nbytes: int = 1 << 29) -> tuple[float, float]:
    """Bytes per second of a large tensor copy (each byte read once and written once) and of a large sum (read
    only). Reading every weight once per token is the ceiling for decoding one sequence."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy = min(timed(dst.copy_, device, src) for _ in range(5))
    read = min(timed(src.sum, device) for _ in range(5))
    return nbytes / copy, nbytes / read


def build_pair(shape: str, dev: str, dtype: str) -> tuple[torch.nn.Module, ModelConfig, dict[str, torch.Tensor]]:
    """transformers' model of `shape` with random weights, gptlab's config of it, and the same weights by gptlab's
    names (shared with transformers' tensors: no second copy)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if shape == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config()).eval().to(dev)  # GPT-2 124M
        config: ModelConfig = config_from_hf(hf.config.to_dict())
        return hf, config, {k: v.detach() for k, v in state_from_hf(hf.state_dict()).items() if k != "lm_head.weight"}
    config = ModelConfig.from_preset(shape)
    if config.family not in families.FAMILIES:
        raise SystemExit(f"--shape takes gpt2 or a rotary family preset, not {shape}")
    ids = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
    hf_config = AutoConfig.for_model(**families.config_to_hf(config, ids, config.family))
    hf = AutoModelForCausalLM.from_config(hf_config, dtype=getattr(torch, dtype)).eval().to(dev)
    state = families.state_from_hf({k: v.detach() for k, v in hf.state_dict().items()}, config, config.family)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return hf, config, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--compile", action="store_true", help="torch.compile gptlab's forward (GPU)")
    parser.add_argument("--cases", default="decode1,decodeB,prefill")
    parser.add_argument("--shape", default="gpt2", help="gpt2 (124M) or a family preset such as llama-3.2-1b")
    args = parser.parse_args()

    import transformers

    dev = args.device
    hf, config, state = build_pair(args.shape, dev, args.dtypes.split(",")[0])
    hf_cfg = hf.config
    bandwidth, read_bandwidth = bandwidths(dev)
    print(f"# machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, device {dev}"
          + (f" ({torch.cuda.get_device_name()})" if dev == "cuda" else ""))
    print(f"# copy bandwidth {bandwidth / 1e9:.1f} GB/s (bytes copied per second; the bound below), "
          f"read-only bandwidth {read_bandwidth / 1e9:.1f} GB/s")

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, hf_cfg.vocab_size, (1, args.prompt_tokens), generator=g).to(dev)
    batch = torch.randint(0, hf_cfg.vocab_size, (args.batch, args.prompt_tokens), generator=g).to(dev)
    long_prompt = torch.randint(0, hf_cfg.vocab_size, (1, args.prefill_tokens), generator=g).to(dev)
    n = args.new_tokens

    def hf_run(ids: torch.Tensor, new: int) -> torch.Tensor:
        with torch.inference_mode():
            return hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               attention_mask=torch.ones_like(ids), pad_token_id=0)[:, ids.shape[1]:]

    def our_run(ids: torch.Tensor, new: int) -> torch.Tensor:
        return torch.stack(list(engine.generate_ids(ids.tolist(), new, GREEDY)), dim=1)

    rows, agree = [], {}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        hf.to(dtype)
        ours = prepare_for_inference(load_model(config, {k: v.to(dtype) for k, v in state.items()}).to(dev, dtype))
        if args.compile:
            ours.forward = torch.compile(ours.forward, dynamic=False)
        engine = Engine(ours)
        # every weight but a position table (one row per token) is read once per decoded token
        positions = config.block_size * config.n_embd if config.pos == "learned" else 0
        weight_bytes = (hf.num_parameters() - positions) * torch.finfo(dtype).bits // 8
        bound = bandwidth / weight_bytes  # tokens/s if every weight is read once per token
        agree[dtype_name] = hf_run(prompt, 32).tolist() == our_run(prompt, 32).tolist()  # also warms up both
        cases = {  # name -> (label, prompt ids, new tokens, tokens counted)
            "decode1": (f"decode b=1, {args.prompt_tokens}+{n} tokens", prompt, n, n),
            "decodeB": (f"decode b={args.batch}, {args.prompt_tokens}+{n} tokens", batch, n, args.batch * n),
            "prefill": (f"prefill {args.prefill_tokens} tokens (time to first token)", long_prompt, 1,
                        args.prefill_tokens),
        }
        for key in args.cases.split(","):
            case, ids, new, tokens = cases[key]
            times: dict[str, list[float]] = {"gptlab": [], "transformers": []}
            hf_run(ids, new), our_run(ids, new)  # warm-up (and, on a GPU, the CUDA graph capture)
            for _ in range(args.reps):  # interleaved, so that drift in the machine hits both alike
                times["transformers"].append(timed(hf_run, dev, ids, new))
                times["gptlab"].append(timed(our_run, dev, ids, new))
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append((dtype_name, case, tokens / med["gptlab"], tokens / med["transformers"], bound,
                         bound * read_bandwidth / bandwidth, key == "decode1"))

    print()
    print("| dtype | case | gptlab tok/s | transformers tok/s | ratio | gptlab / copy bound | transformers / copy "
          "bound | gptlab / read bound |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for dtype_name, case, ours_tps, hf_tps, bound, read_bound, show_bound in rows:
        fb = (f"{ours_tps / bound:.0%} | {hf_tps / bound:.0%} | {ours_tps / read_bound:.0%}" if show_bound
              else "- | - | -")
        print(f"| {dtype_name} | {case} | {ours_tps:.1f} | {hf_tps:.1f} | {ours_tps / hf_tps:.2f}x | {fb} |")
    decode = {r[0]: r[2] for r in rows if r[6]}
    if "float32" in decode and "bfloat16" in decode:
        print(f"\nbf16 / fp32 decode speed (gptlab): {decode['bfloat16'] / decode['float32']:.2f}x")
    print("greedy tokens identical to transformers (first 32): " + ", ".join(f"{k}={v}" for k, v in agree.items()))


if __name__ == "__main__":
    main()

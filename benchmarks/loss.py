"""The output layer and the loss: time and peak memory of forward + backward, four ways, on GPT-2's shapes.

    python benchmarks/loss.py [--tokens 1024] [--chunk 256] [--rounds 3] [--frozen] [--device cpu|cuda]

- plain: `cross_entropy(lm_head(h).float())`, the whole (tokens x vocab) logits at once (nanoGPT, transformers).
- upcast-chunks: the logits made whole in bf16, the float32 loss taken a chunk at a time (torchtune's chunked loss).
- recompute: each chunk's output layer and loss under activation checkpointing, recomputed in backward.
- fused: gptlab's `train.loss_chunk` (gptlab/loss.py): each chunk's gradients computed in the forward, no recompute.

bf16 autocast, as training runs. `--frozen`: the output layer does not train (LoRA and the other frozen-base methods).
Each variant runs in its own process, rounds alternate them; memory is the peak anonymous resident memory during the
steps minus before them (CPU), or `max_memory_allocated` minus the inputs (CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from qlora import AnonPeak, rss_mb
from torch.utils.checkpoint import checkpoint

from gptlab.loss import linear_cross_entropy

VARIANTS = ("plain", "upcast-chunks", "recompute", "fused")


def loss_of(variant: str, h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, chunk: int) -> torch.Tensor:
    """The mean loss of hidden states `h` (N, C) through `w` (V, C) against `t` (N,), the variant's way."""
    if variant == "plain":
        return F.cross_entropy(F.linear(h, w).float(), t)
    if variant == "upcast-chunks":
        logits = F.linear(h, w)  # (N, V) in bf16
        return sum(F.cross_entropy(logits[i:i + chunk].float(), t[i:i + chunk], reduction="sum")
                   for i in range(0, len(t), chunk)) / len(t)
    if variant == "recompute":
        def part(hc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(F.linear(hc, w).float(), tc, reduction="sum")
        return sum(checkpoint(part, h[i:i + chunk], t[i:i + chunk], use_reentrant=False)
                   for i in range(0, len(t), chunk)) / len(t)
    return linear_cross_entropy(h, w, t, chunk)


def worker(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(args.vocab, args.width, generator=g) * 0.02).to(device).requires_grad_(not args.frozen)
    h0 = torch.randn(args.tokens, args.width, generator=g).to(device)
    t = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)
    before = rss_mb("RssAnon")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    sampler = AnonPeak(0.005)
    times = []
    for _ in range(args.steps + 1):  # the first warms up
        h = h0.clone().requires_grad_()  # the blocks' output: its gradient goes on to the blocks
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_of(args.variant, h, w, t, args.chunk)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        w.grad = None
    peak = sampler.stop() - before
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20 - before
    print(json.dumps({"variant": args.variant, "s": statistics.median(times[1:]), "peak_mb": peak,
                      "loss": loss.item()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per micro-batch (batch x context)")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frozen", action="store_true", help="the output layer does not train")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return worker(args)
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
            # freed large blocks go back to the system at once, so the resident peak is each variant's own
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}).stdout
            results[variant].append(json.loads(out.strip().splitlines()[-1]))
    print(f"{args.tokens} tokens x {args.width} wide -> {args.vocab} tokens, chunks of {args.chunk}, bf16 autocast, "
          f"{'frozen' if args.frozen else 'trained'} output layer, {args.device}, {torch.get_num_threads()} threads; "
          f"medians of {args.rounds} rounds x {args.steps} steps")
    print("| variant | forward + backward | peak memory | loss |")
    print("|---|---:|---:|---:|")
    for v, rs in results.items():
        s, mb = statistics.median(r["s"] for r in rs), statistics.median(r["peak_mb"] for r in rs)
        print(f"| {v} | {s * 1000:.0f} ms | {mb:.0f} MB | {rs[-1]['loss']:.5f} |")


if __name__ == "__main__":
    main()

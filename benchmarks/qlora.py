"""LoRA vs QLoRA: time per training step and peak memory, on the same model, data and adapters.

    python benchmarks/qlora.py [--preset gpt2-medium] [--steps 4] [--rounds 2] [--device cpu|cuda]

Both run gptlab's own pieces as `gptlab finetune` does: the base loaded (QLoRA: quantized to NF4 with double-quantized
scales while it is read), LoRA r=8 on every attention and MLP Linear, bf16 autocast (frozen float Linear weights kept
in bf16, as the loop does), fused AdamW (paged AdamW on CUDA for QLoRA), `train_step`. Each variant runs in its own
process so that its memory is its own; rounds alternate the variants. Memory on the CPU is the peak anonymous resident
memory during the steps (sampled every 20 ms; pages of the memory-mapped checkpoint are droppable page cache), minus
the process's before the model was loaded (Python, PyTorch and its libraries: the same for both). On CUDA it is
`max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from gptlab.checkpoint import load_checkpoint, save_checkpoint
from gptlab.config import ModelConfig
from gptlab.loss import default_chunk
from gptlab.model import GPT
from gptlab.peft.lora import LoRA, QLoRA
from gptlab.tokenizer import Tokenizer
from gptlab.train.config import TrainConfig
from gptlab.train.distributed import Dist
from gptlab.train.loop import store_frozen_linears, train_step
from gptlab.train.optim import build_optimizer


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class AnonPeak:
    """The peak of anonymous resident memory (RssAnon), sampled every `every` seconds on a thread. Pages of the
    memory-mapped checkpoint file are page cache the kernel can drop, so they are not counted (VmHWM would)."""

    def __init__(self, every: float = 0.02) -> None:
        self.peak, self.every, self.done = rss_mb("RssAnon"), every, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.peak = max(self.peak, rss_mb("RssAnon"))

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return max(self.peak, rss_mb("RssAnon"))


def worker(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    method = QLoRA() if args.variant == "qlora" else LoRA()
    cfg = TrainConfig(batch_size=args.batch, dtype="bfloat16", lr=1e-4, warmup_steps=0)
    d = Dist(device=device)
    before = rss_mb("RssAnon")
    model, _ = load_checkpoint(args.base, quantize=method.base_quantization)
    method.attach(model)
    store_frozen_linears(model, torch.bfloat16)
    model.to(device).train()
    model.activation_checkpointing = args.checkpointing
    model.loss_chunk = args.loss_chunk if args.loss_chunk is not None else default_chunk(device)
    named = method.trainable(model)
    optimizer = build_optimizer(named, cfg, device, paged=method.paged_optimizer)
    params = [p for _, p in named]
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, model.config.vocab_size, (args.steps + 1, args.batch, args.context + 1), generator=g)
    after_load = rss_mb("RssAnon")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sampler = AnonPeak()
    times = []
    for i in range(args.steps + 1):  # the first step warms up
        rows = data[i].to(device)
        t = time.perf_counter()
        train_step(model, model, optimizer, scaler, params, cfg, d, lambda _, rows=rows: (rows[:, :-1], rows[:, 1:]))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = sampler.stop() - before
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps({"variant": args.variant, "step_s": statistics.median(times[1:]), "peak_mb": peak,
                      "load_mb": after_load - before, "trainable": sum(p.numel() for p in params)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-medium")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in both variants")
    parser.add_argument("--loss-chunk", type=int, default=None,
                        help="train.loss_chunk in both variants (default: the loop's default for the device)")
    parser.add_argument("--base", help="an existing float checkpoint (default: random weights of --preset)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.base:
            torch.manual_seed(0)
            cfg = ModelConfig.from_preset(args.preset)
            tok = Tokenizer.train_bpe(["a b c d e f g h"], vocab_size=300)
            args.base = str(save_checkpoint(Path(tmp) / "base", GPT(cfg), tok))
        model_cfg = json.loads((Path(args.base) / "config.json").read_text())["model"]
        results: dict[str, list[dict]] = {"lora": [], "qlora": []}
        # glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so the resident size would
        # remember every tensor ever freed; a fixed threshold returns large blocks to the system when they are freed
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        for _ in range(args.rounds):
            for variant in ("lora", "qlora"):
                cmd = [sys.executable, __file__, "--variant", variant, "--base", args.base, "--steps", str(args.steps),
                       "--batch", str(args.batch), "--context", str(args.context), "--device", args.device]
                if args.checkpointing:
                    cmd.append("--checkpointing")
                if args.loss_chunk is not None:
                    cmd += ["--loss-chunk", str(args.loss_chunk)]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                results[variant].append(json.loads(out.strip().splitlines()[-1]))
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "peak_mb", "load_mb")}
           for v, rs in results.items()}
    options = (["activation checkpointing"] if args.checkpointing else []) + \
        ([f"loss in chunks of {args.loss_chunk} tokens"] if args.loss_chunk else
         ["unfused loss"] if args.loss_chunk == 0 else [])
    print(f"{model_cfg.get('name') or args.base} ({model_cfg['n_layer']} layers, {model_cfg['n_embd']} wide): batch "
          f"{args.batch} x context {args.context}, bf16 autocast, {', '.join(options + [''])}LoRA r=8 on "
          f"c_attn/c_proj/c_fc, {args.device}, {torch.get_num_threads()} threads; medians of {args.rounds} rounds x "
          f"{args.steps} steps")
    print("| variant | time/step | peak memory (training) | weights+state after load |")
    print("|---|---|---|---|")
    for v in ("lora", "qlora"):
        print(f"| {v} | {med[v]['step_s']:.2f} s | {med[v]['peak_mb']:.0f} MB | {med[v]['load_mb']:.0f} MB |")
    t = med["qlora"]["step_s"] / med["lora"]["step_s"]
    m = med["qlora"]["peak_mb"] / med["lora"]["peak_mb"]
    print(f"QLoRA / LoRA: {t:.2f}x the time for {m:.2f}x the memory (goal: at most 1.2x the time for at most 0.6x "
          "the memory)")


if __name__ == "__main__":
    main()

"""Time to a target val loss on a CPU: gptlab's speedrun recipe against nanoGPT's CPU quickstart.

    python benchmarks/speedrun.py [--out out/speedrun] [--repeats 2] [--config configs/speedrun-cpu.yaml]
                                  [--variant NAME:train.optimizer=muon,model.mlp=relu2 ...] [--compile-cache fresh]

The baseline is nanoGPT's model and loop as its README runs them on a CPU (`train.py config/train_shakespeare_char.py
--device=cpu --compile=False --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
--lr_decay_iters=2000 --dropout=0.0`), written out below in its own words: learned positions, LayerNorm without
biases, exact GELU, a tied head, AdamW (0.9, 0.99) at 1e-3 with weight decay 0.1 on every matrix, 100 warm-up steps,
a cosine to 1e-4, clipping at 1.0, float32, the for-loop AdamW PyTorch picks on a CPU. gptlab trains through its own
loop (`gptlab.train.loop.train`, what `gptlab pretrain --config` calls) from the YAML recipe.

Both read the same character-level corpus (Python's standard library, prepared by `gptlab prepare stdlib --tokenizer
char`, or `--data`) and are scored on the same held-out windows of its val split (context 64, whatever context a
recipe trains with). Each run is its own process and they alternate, so a busy machine slows both alike. The clock
is training time: it starts before the first step and stops while the model is evaluated or saved; with compile,
each run gets an empty compile cache (`--compile-cache fresh`: a user's first run, compilation on the clock) unless
`--compile-cache shared` (warm after the first run). The report gives the time to each val threshold (the
baseline's median val loss at a quarter, half, three quarters and the end of its run), interpolated between
evaluations, and the ratios; `curves.png` draws val loss against time, `results.json` holds every point.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 64  # the val windows' length: nanoGPT's CPU quickstart context
VAL_BATCHES, VAL_ROWS = 40, 12  # the shared val windows: 40 batches of 12 (30,720 scored tokens)


# -- nanoGPT, as its model.py and train.py write it (bias=False, its train.py default) -------------------------
class NanoBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.attn_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))  # nn.GELU(): the exact GELU


class NanoGPT(nn.Module):
    def __init__(self, vocab_size: int, n_layer: int = 4, n_head: int = 4, n_embd: int = 128,
                 block_size: int = CONTEXT) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([NanoBlock(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # residual projections, per GPT-2
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def nanogpt_lr(it: int, lr: float = 1e-3, min_lr: float = 1e-4, warmup: int = 100, decay: int = 2000) -> float:
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * (it - warmup) / (decay - warmup))) * (lr - min_lr)


def run_nanogpt(data: Path, steps: int, eval_every: int) -> list[dict[str, float]]:
    from gptlab.data.loader import TokenShards

    shards = TokenShards(data)
    train_bin, windows = shards.data["train"], val_windows(shards)
    torch.manual_seed(1337)
    model = NanoGPT(shards.tokenizer().vocab_size)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))
    points, aside, t0 = [], 0.0, time.perf_counter()
    for it in range(steps + 1):
        if it % eval_every == 0 or it == steps:
            t = time.perf_counter()
            points.append({"step": it, "train_s": t - t0 - aside, "val_loss": nano_eval(model, windows)})
            aside += time.perf_counter() - t
        if it == steps:
            break
        for g in opt.param_groups:
            g["lr"] = nanogpt_lr(it, decay=steps)
        ix = torch.randint(len(train_bin) - CONTEXT, (12,))
        x = torch.stack([torch.from_numpy(train_bin[i:i + CONTEXT].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(train_bin[i + 1:i + 1 + CONTEXT].astype(np.int64)) for i in ix])
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # log_interval=1: the loss is read every step
    return points


@torch.no_grad()
def nano_eval(model: nn.Module, windows: torch.Tensor) -> float:
    model.eval()
    loss = statistics.fmean(model(rows[:, :-1], rows[:, 1:]).item() for rows in windows)
    model.train()
    return loss


# -- the shared held-out windows, and gptlab through its own loop --------------------------------------------
def val_windows(shards: Any) -> torch.Tensor:
    """(VAL_BATCHES, VAL_ROWS, CONTEXT + 1) token windows at fixed positions of the val split."""
    val = shards.data["val"]
    starts = np.random.default_rng(0).integers(0, len(val) - CONTEXT - 1, size=(VAL_BATCHES, VAL_ROWS))
    return torch.from_numpy(val[starts[..., None] + np.arange(CONTEXT + 1)].astype(np.int64))


class SharedVal:
    """A prepared folder whose val batches are the benchmark's fixed windows, so that gptlab's loop is scored on the
    held-out tokens the baseline is scored on; training batches are the loop's own."""

    def __init__(self, shards: Any) -> None:
        self.shards, self.windows = shards, val_windows(shards)

    def check(self, block_size: int, batch_size: int, need_val: bool) -> None:
        self.shards.check(block_size, batch_size, need_val)

    def batch(self, split: str, key: tuple[int, ...], batch_size: int, block_size: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        if split == "val":
            rows = self.windows[key[-1] % VAL_BATCHES]  # (VAL_ROWS, CONTEXT + 1)
            return rows[:, :-1], rows[:, 1:]
        return self.shards.batch(split, key, batch_size, block_size)


def gptlab_sections(config: Path, overrides: list[str]) -> dict[str, dict[str, Any]]:
    import yaml

    from gptlab.train.config import merge_sections

    flags = dict(o.split("=", 1) for o in overrides)
    return merge_sections(yaml.safe_load(config.read_text()), {k.removeprefix("--"): v for k, v in flags.items()},
                          str(config))


def run_gptlab(data: Path, out: Path, config: Path, overrides: list[str], eval_every: int) -> list[dict[str, float]]:
    from gptlab.data.loader import TokenShards
    from gptlab.train.config import TrainConfig, model_config
    from gptlab.train.loop import Run, train

    sections = gptlab_sections(config, overrides)
    shards = TokenShards(data)
    tok = shards.tokenizer()
    settings = {**sections["train"], "eval_every": sections["train"].get("eval_every", eval_every),
                "eval_steps": VAL_BATCHES, "save_every": 0}
    train(Run(model=model_config(sections["model"], tok.vocab_size), train=TrainConfig(**settings),
              data=SharedVal(shards), tokenizer=tok, out=out / "run", progress=False, inputs=(data,)))
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], "train_s": r["train_s"], "val_loss": r["val_loss"]} for r in records
            if "val_loss" in r]


# -- the driver: alternate runs, each in its own process; thresholds, table, curve -------------------------------
def time_to(points: list[dict[str, float]], target: float) -> float | None:
    """Seconds until the val loss first reaches `target`, interpolated between the two evaluations around it."""
    for a, b in zip([{"train_s": 0.0, "val_loss": math.inf}, *points], points):
        if b["val_loss"] <= target:
            if not math.isfinite(a["val_loss"]):
                return b["train_s"]
            return a["train_s"] + (a["val_loss"] - target) / (a["val_loss"] - b["val_loss"]) * (
                b["train_s"] - a["train_s"])
    return None


def worker(args: argparse.Namespace) -> None:
    out = Path(args.run_dir)
    if args.worker == "nanogpt":
        points = run_nanogpt(Path(args.data), args.steps, args.eval_every)
    else:
        points = run_gptlab(Path(args.data), out, Path(args.config), args.overrides, args.eval_every)
    (out / "points.json").write_text(json.dumps(points))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/speedrun", help="a new folder for the data, runs and report")
    p.add_argument("--data", help="a prepared char-level folder (default: the standard library, prepared in OUT)")
    p.add_argument("--config", default=str(ROOT / "configs" / "speedrun-cpu.yaml"), help="gptlab's recipe")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="another gptlab run: the recipe with these overrides (repeatable; 'NAME:' alone: as is)")
    p.add_argument("--no-recipe", action="store_true", help="run only the baseline and the variants")
    p.add_argument("--repeats", type=int, default=2, help="runs of each, alternating")
    p.add_argument("--steps", type=int, default=2000, help="the baseline's steps (its max_iters)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations (a recipe may set its own)")
    p.add_argument("--compile-cache", choices=("fresh", "shared"), default="fresh",
                   help="fresh: an empty compile cache per run (a first run); shared: one cache for all runs")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} already exists and is not empty; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out / "data"
    if not args.data:
        from gptlab.data.prepare import prepare

        prepare(["stdlib"], data, tokenizer="char", progress=False)
    variants = ([] if args.no_recipe else [("gptlab", [])]) + [
        (name, [o for o in rest.split(",") if o]) for name, rest in (v.split(":", 1) for v in args.variant)]
    names = ["nanogpt", *[n for n, _ in variants]]
    results: dict[str, list[list[dict[str, float]]]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:  # ABBA: drift in the machine's load falls on both
            run_dir = out / "runs" / f"{name}-{r}"
            run_dir.mkdir(parents=True)
            cache = out / "compile-cache" if args.compile_cache == "shared" else run_dir / "compile-cache"
            overrides = dict(variants).get(name, [])
            cmd = [sys.executable, __file__, "--worker", name, "--data", str(data), "--run-dir", str(run_dir),
                   "--config", args.config, "--steps", str(args.steps), "--eval-every", str(args.eval_every),
                   "--overrides", *overrides]
            started = time.perf_counter()
            subprocess.run(cmd, check=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)})
            points = json.loads((run_dir / "points.json").read_text())
            results[name].append(points)
            print(f"{name} run {r + 1}: val {points[-1]['val_loss']:.4f} after {points[-1]['train_s']:.1f} s of "
                  f"training ({time.perf_counter() - started:.0f} s in all)", flush=True)
    report(out, results, args)


def report(out: Path, results: dict[str, list[list[dict[str, float]]]], args: argparse.Namespace) -> None:
    base = results["nanogpt"]
    marks = [args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps]
    targets = [statistics.median(next(pt["val_loss"] for pt in run if pt["step"] >= m) for run in base)
               for m in marks]
    rows = ["| run | " + " | ".join(f"to {t:.4f} (nanoGPT's step {m})" for t, m in zip(targets, marks))
            + " | final val | training s |", "|---" * (len(targets) + 3) + "|"]
    base_times = [statistics.median(time_to(run, t) or math.inf for run in base) for t in targets]
    for name, runs in results.items():
        cells = []
        for t, ref in zip(targets, base_times):
            times = [time_to(run, t) for run in runs]
            if any(x is None for x in times):
                cells.append(f"not reached in {sum(x is None for x in times)}/{len(times)}")
            else:
                med = statistics.median(times)
                cells.append(f"{med:.1f} s ({med / ref:.2f}x)")
        final = statistics.median(run[-1]["val_loss"] for run in runs)
        seconds = statistics.median(run[-1]["train_s"] for run in runs)
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {final:.4f} | {seconds:.1f} |")
    table = "\n".join(rows)
    print(f"\nmedians of {args.repeats} runs each; seconds of training (evaluation left out), ratio to nanoGPT\n")
    print(table)
    (out / "results.json").write_text(json.dumps({"targets": targets, "runs": results, "table": table}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, runs) in enumerate(results.items()):
        for j, run in enumerate(runs):
            ax.plot([pt["train_s"] for pt in run], [pt["val_loss"] for pt in run], color=f"C{i}", lw=1.2,
                    alpha=0.8, label=name if j == 0 else None)
    for t in targets:
        ax.axhline(t, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("val loss (nats/char)")
    ax.set_ylim(min(targets) - 0.15, targets[0] + 0.6)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    print(f"\ncurves in {out / 'curves.png'}, every point in {out / 'results.json'}")


if __name__ == "__main__":
    main()

"""`gptlab compare`: every method on the same data and budget, side by side — the table a student would otherwise
build by hand (method, trainable parameters, peak memory, time per step, final val loss, task metric).

Each method runs in its own process through `gptlab finetune`, so that its peak memory is its own.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from gptlab.checkpoint import load_checkpoint, read_folders
from gptlab.data.builtin_tasks import BUILTIN, builtin_examples
from gptlab.data.tasks import load_examples
from gptlab.errors import GptlabError
from gptlab.files import atomic_write_text, check_new_folder, write_folder
from gptlab.peft import METHODS


def count_parameters(checkpoint: Path, method: str) -> tuple[int, int]:
    model, _ = load_checkpoint(checkpoint)
    total = sum(p.numel() for p in model.parameters())  # before a method quantizes the base (QLoRA)
    m = METHODS[method]()
    m.attach(model)
    trainable = sum(p.numel() for _, p in m.trainable(model))
    return trainable, total + trainable * (m.name != "full")


def exact_match(folder: Path, examples: list, limit: int) -> float:
    """Share of val examples whose greedy completion equals the reference (whitespace-trimmed)."""
    import gptlab
    from gptlab.evaluate import evaluate_task

    llm = gptlab.load(folder, device="cpu" if not torch.cuda.is_available() else None)
    return evaluate_task(llm, examples, limit=limit, metrics=["exact"])["exact"] if examples else float("nan")


def compare(checkpoint: str, data: str, methods: list[str], steps: int, out: str, lr: float | None = None,
            batch_size: int = 8, task_token: str | None = None, eval_examples: int = 50,
            extra: list[str] | None = None) -> list[dict[str, Any]]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise GptlabError(f"unknown method(s) {', '.join(unknown)}; methods: {', '.join(METHODS)}")
    ckpt = Path(checkpoint)
    inputs = [*read_folders(ckpt), *([data] if Path(data).exists() else [])]
    check_new_folder(out, inputs)
    examples = builtin_examples(data) if data in BUILTIN else load_examples(data, task_token)
    random.Random(0).shuffle(examples)  # the same order `gptlab finetune` uses, so its val split is this one
    n_val = max(1, int(len(examples) * 0.1)) if len(examples) > 1 else 0
    val = examples[:n_val]
    rows: list[dict[str, Any]] = []

    def run_all(root: Path) -> None:  # in a staging folder, renamed to `out` once every method has run
        for method in methods:
            run = root / method
            cmd = [sys.executable, "-m", "gptlab", "finetune", str(ckpt), "--method", method, "--data", data,
                   "--out", str(run), "--quiet", f"--train.max_steps={steps}", f"--train.batch_size={batch_size}",
                   *([f"--train.lr={lr}"] if lr else []), f"--train.eval_every={steps}",
                   f"--train.save_every={steps}", f"--train.log_every={max(1, steps // 20)}",
                   f"--train.warmup_steps={max(1, steps // 10)}", *(["--task-token", task_token] if task_token else []),
                   *(extra or [])]
            print(f"gptlab compare: {method} ...", file=sys.stderr, flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise GptlabError(f"{method} failed: {done.stderr.strip().splitlines()[-1] if done.stderr else '?'}")
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            logged = [r for r in records if "loss" in r]
            trainable, total = count_parameters(ckpt, method)
            last = logged[-1]
            rows.append({
                "method": method, "trainable": trainable, "total": total, "trainable_pct": 100 * trainable / total,
                "peak_memory_mb": max(r.get("peak_memory_mb", 0) for r in logged),
                "ms_per_step": 1000 * last["elapsed_s"] / max(1, last["step"]),
                "val_loss": next((r["val_loss"] for r in reversed(records) if "val_loss" in r), float("nan")),
                "exact_match": exact_match(run, val, eval_examples),
            })
        write_report(root, rows, checkpoint, data, steps)

    write_folder(out, run_all, inputs)
    return rows


def write_report(root: Path, rows: list[dict[str, Any]], checkpoint: str, data: str, steps: int) -> None:
    lines = ["# Fine-tuning methods compared\n", f"Base `{checkpoint}`, data `{data}`, {steps} steps each.\n",
             "| method | trainable parameters | % of total | peak memory (MB) | time per step (ms) | final val loss "
             "| exact match |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['trainable_pct']:.3f}% | {r['peak_memory_mb']:.0f} "
                     f"| {r['ms_per_step']:.1f} | {r['val_loss']:.4f} | {r['exact_match']:.1%} |")
    atomic_write_text(root / "report.md", "\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    panels = [("trainable_pct", "trainable parameters (%)"), ("peak_memory_mb", "peak memory (MB)"),
              ("ms_per_step", "time per step (ms)"), ("val_loss", "final val loss"), ("exact_match", "exact match")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels):
        ax.bar(names, [r[key] for r in rows], color="tab:blue")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=30)
        if key == "exact_match":
            ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(root / "compare.png", dpi=100)
    plt.close(fig)

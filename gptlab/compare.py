"""`gptlab compare`: every method on the same data and budget, side by side — the table a student would otherwise
build by hand (method, trainable parameters, peak memory, time per step, final val loss, task metric).

Each method runs in its own process through `gptlab finetune`, so that its peak memory is its own. Hard prompts sit
in the same table (the course's taxonomy of interaction, from a hand-written prompt to a fine-tuned model): a
hand-written template is scored on the frozen base, and `autoprompt` searches trigger tokens through `gptlab
autoprompt` with the same steps and batch size.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from gptlab.api import resolve_device
from gptlab.autoprompt import DEFAULT_TEMPLATE, check_template, template_loss
from gptlab.checkpoint import load_checkpoint, read_folders
from gptlab.errors import GptlabError
from gptlab.files import atomic_write_text, check_new_folder, read_json_object, write_folder
from gptlab.finetuning import split_examples, task_examples
from gptlab.peft import METHODS
from gptlab.prompts import resolve_template

PROMPTS = ("autoprompt",)  # methods that train no weight: a hard prompt found on the frozen base


def count_parameters(checkpoint: Path, method: str) -> tuple[int, int]:
    """(trainable, total): the total is the base's (before a method quantizes it: QLoRA) and what the method adds."""
    model, _ = load_checkpoint(checkpoint)
    base = {id(p): p.numel() for p in model.parameters()}
    m = METHODS[method]()
    m.attach(model)
    trainable = m.trainable(model)
    added = sum(p.numel() for _, p in trainable if id(p) not in base)  # adapters; none when the base itself trains
    return sum(p.numel() for _, p in trainable), sum(base.values()) + added


def exact_match(folder: Path, examples: list, limit: int, template: str | None = None) -> float:
    """Share of val examples whose greedy completion (under `template`, else their own prompts) equals the reference
    (whitespace-trimmed)."""
    import gptlab
    from gptlab.evaluate import evaluate_task

    llm = gptlab.load(folder, device=_device())
    return evaluate_task(llm, examples, template, limit=limit, metrics=["exact"])["exact"] if examples \
        else float("nan")


def _device() -> str | None:
    return "cpu" if not torch.cuda.is_available() else None


def compare(checkpoint: str, data: str, methods: list[str], steps: int, out: str, lr: float | None = None,
            batch_size: int = 8, task_token: str | None = None, eval_examples: int = 50,
            extra: list[str] | None = None, templates: list[str] | None = None,
            autoprompt_template: str = DEFAULT_TEMPLATE) -> list[dict[str, Any]]:
    """Rows for each hand-written template (first), then each method in order; report.md and compare.png in `out`.
    `templates` are hard templates (names, texts with {input}, template files); `autoprompt` among the methods
    searches triggers for `autoprompt_template`."""
    supervised = [m for m in METHODS if getattr(METHODS[m], "data", None) != "preferences"]
    unknown = [m for m in methods if m not in supervised and m not in PROMPTS]
    if unknown:
        preference = [m for m in unknown if m in METHODS]
        if preference:
            raise GptlabError(f"compare runs every method on one task's examples; {', '.join(preference)} "
                              "train(s) on preference pairs: run it with gptlab finetune")
        raise GptlabError(f"unknown method(s) {', '.join(unknown)}; methods: {', '.join([*supervised, *PROMPTS])}")
    templates = [resolve_template(t) for t in templates or ()]
    if "autoprompt" in methods:
        check_template(autoprompt_template)
    if not methods and not templates:
        raise GptlabError("nothing to compare: name --methods, or give hand-written templates with --template")
    ckpt = Path(checkpoint)
    inputs = [*read_folders(ckpt), *([data] if Path(data).exists() else [])]
    check_new_folder(out, inputs)
    _, val = split_examples(task_examples(data, task_token), 0.1)  # the split `gptlab finetune` makes
    rows: list[dict[str, Any]] = []

    def prompt_row(name: str, template: str, ms_per_step: float, peak: float) -> dict[str, Any]:
        base, tokenizer = load_checkpoint(ckpt, resolve_device(_device()))  # not held while the methods train
        total = sum(p.numel() for p in base.parameters())
        return {"method": name, "template": template, "trainable": 0, "total": total, "trainable_pct": 0.0,
                "peak_memory_mb": peak, "ms_per_step": ms_per_step,
                "val_loss": template_loss(base, tokenizer, val, template) if val else float("nan"),
                "exact_match": exact_match(ckpt, val, eval_examples, template)}

    def run_all(root: Path) -> None:  # in a staging folder, renamed to `out` once every method has run
        for n, template in enumerate(templates, 1):
            print(f"gptlab compare: template {n} ...", file=sys.stderr, flush=True)
            rows.append(prompt_row(f"template {n}", template, float("nan"), float("nan")))
        for method in methods:
            run = root / method
            print(f"gptlab compare: {method} ...", file=sys.stderr, flush=True)
            if method == "autoprompt":
                cmd = [sys.executable, "-m", "gptlab", "autoprompt", str(ckpt), "--data", data, "--template",
                       autoprompt_template, "--steps", str(steps), "--batch-size", str(batch_size), "--out", str(run),
                       "--quiet", *(["--task-token", task_token] if task_token else [])]
            else:
                cmd = [sys.executable, "-m", "gptlab", "finetune", str(ckpt), "--method", method, "--data", data,
                       "--out", str(run), "--quiet", f"--train.max_steps={steps}", f"--train.batch_size={batch_size}",
                       *([f"--train.lr={lr}"] if lr else []), f"--train.eval_every={steps}",
                       f"--train.save_every={steps}", f"--train.log_every={max(1, steps // 20)}",
                       f"--train.warmup_steps={max(1, steps // 10)}",
                       *(["--task-token", task_token] if task_token else []), *(extra or [])]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                why = done.stderr.strip().splitlines()[-1].removeprefix("gptlab: error: ") if done.stderr else "?"
                raise GptlabError(f"{method} failed: {why}")
            if method == "autoprompt":
                found = read_json_object(run / "autoprompt.json")
                rows.append(prompt_row(method, found["prompt"], found["ms_per_step"], found["peak_memory_mb"]))
                continue
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
        write_report(root, rows, checkpoint, data, steps, len(val), min(len(val), eval_examples))

    write_folder(out, run_all, inputs)
    return rows


def _cell(value: float, form: str) -> str:
    return "n/a" if value != value else format(value, form)  # nan: not measured for this row


def _code(text: str) -> str:
    """A template as one line of Markdown code."""
    return "`" + text.replace("`", "'").replace("\n", "\\n") + "`"


def write_report(root: Path, rows: list[dict[str, Any]], checkpoint: str, data: str, steps: int,
                 n_val: int = 0, n_exact: int = 0) -> None:
    lines = ["# Fine-tuning methods compared\n", f"Base `{checkpoint}`, data `{data}`, {steps} steps each.\n",
             "| method | trainable parameters | % of total | peak memory (MB) | time per step (ms) | final val loss "
             "| exact match |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['trainable_pct']:.3f}% | "
                     f"{_cell(r['peak_memory_mb'], '.0f')} | {_cell(r['ms_per_step'], '.1f')} | "
                     f"{_cell(r['val_loss'], '.4f')} | {_cell(r['exact_match'], '.1%')} |")
    prompts = [r for r in rows if "template" in r]
    if prompts:
        lines += ["", "Hard prompts (nothing trained; the frozen base under each template, as `gptlab evaluate "
                  "--template` reads it):", ""]
        lines += [f"- {r['method']}: {_code(r['template'])}" for r in prompts]
        lines += ["", f"Final val loss: for a fine-tuned method, the run's own val loss (its completion tokens and "
                  f"the end-of-text token, on batches drawn from the val split); for a hard prompt, the mean loss of "
                  f"the completion tokens (not the end-of-text token: a frozen model is not taught to stop) under the "
                  f"template, on each of the same {n_val} val examples once. Time per "
                  f"step: autoprompt's is one search step (a gradient, then every candidate scored); a hand-written "
                  f"template has no steps. Exact match: the greedy completions of {n_exact} val examples under "
                  f"each row's prompt."]
    atomic_write_text(root / "report.md", "\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    panels = [("trainable_pct", "trainable parameters (%)"), ("peak_memory_mb", "peak memory (MB)"),
              ("ms_per_step", "time per step (ms)"), ("val_loss", "final val loss"), ("exact_match", "exact match")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels):
        ax.bar(names, [0 if r[key] != r[key] else r[key] for r in rows], color="tab:blue")  # n/a: no bar
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=30)
        if key == "exact_match":
            ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(root / "compare.png", dpi=100)
    plt.close(fig)

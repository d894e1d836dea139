"""Learning rates per fine-tuning method: the evidence behind each method's default (`gptlab finetune --help`).

    python benchmarks/method_lr.py BASE [--data stdlib-summaries] [--steps 150] [--methods lora,prefix]

Each method runs `gptlab.finetune` on the same base, data, batches and step budget at its default learning rate and
at 1/10, 1/3 and 3x it; the table gives the final val loss (and, with --examples N, the exact match of greedy
completions on N held-out examples: a tiny model after a short budget matches none). A default is right when no rate
nearby is clearly better. BASE is a pretrained checkpoint (the
quickstart's: `make demo` leaves one in out/demo/run).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import gptlab
from gptlab.evaluate import evaluate_task
from gptlab.finetuning import split_examples, task_examples
from gptlab.peft import METHODS

FACTORS = (0.1, 1 / 3, 1.0, 3.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("--data", default="stdlib-summaries")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--methods", default=",".join(m for m in METHODS if m != "qlora"))
    parser.add_argument("--examples", type=int, default=0, help="held-out examples scored for exact match")
    args = parser.parse_args()
    _, val = split_examples(task_examples(args.data), 0.1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            default = METHODS[method].lr
            for factor in FACTORS:
                lr = default * factor
                out = Path(tmp) / f"{method}-{factor:g}"
                t0 = time.perf_counter()
                gptlab.finetune(args.base, args.data, out, method=method, progress=False,
                                sections={"train": {"max_steps": args.steps, "batch_size": args.batch_size,
                                                    "lr": lr, "eval_every": args.steps, "eval_steps": 10,
                                                    "save_every": args.steps}})
                seconds = time.perf_counter() - t0
                records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                val_loss = next(r["val_loss"] for r in reversed(records) if "val_loss" in r)
                exact = evaluate_task(gptlab.load(out, device="cpu"), val, limit=args.examples,
                                      metrics=["exact"])["exact"] if args.examples else float("nan")
                rows.append((method, lr, factor == 1.0, val_loss, exact, seconds))
                print(f"{method:14s} lr {lr:.2g}{' (default)' if factor == 1.0 else '':10s} val loss {val_loss:.4f}"
                      f"  exact {exact:.0%}  {seconds:.0f} s", flush=True)
    print(f"\n| method | lr | val loss | exact match ({args.examples} held out) | seconds |\n|---|---:|---:|---:|---:|")
    for method, lr, is_default, val_loss, exact, seconds in rows:
        mark = " **(default)**" if is_default else ""
        print(f"| {method} | {lr:.2g}{mark} | {val_loss:.4f} | {exact:.0%} | {seconds:.0f} |")


if __name__ == "__main__":
    main()

"""PTQ vs QAT: the share of post-training quantization's perplexity cost that quantization-aware training wins back.

    python benchmarks/qat.py BASE DATA [--steps 300] [--scheme int4] [--group-size 64] [--lr 1e-4] [--min-lr LR]
                             [--adapter full]

BASE is a pretrained checkpoint and DATA the prepared folder it was trained on (`make demo` leaves both in out/demo);
perplexity is over DATA's val split. From BASE, with the same data, batches, learning rate and step budget:

- PTQ: `gptlab quantize` of BASE, and of BASE after N more steps of plain training (the fair baseline: QAT's extra
  steps without the quantization);
- QAT: N steps of `gptlab finetune --method qat`, whose checkpoint is already the quantized model.

recovered = (ppl(PTQ after training) - ppl(QAT)) / (ppl(PTQ after training) - ppl(float after training)): how much of
PTQ's perplexity increase QAT removes, the figure torchao reports (96% of wikitext perplexity for Llama 3 8B int4).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import gptlab
from gptlab.data.loader import TokenShards
from gptlab.evaluate import perplexity
from gptlab.quant.formats import QuantSpec
from gptlab.quant.report import quantize_checkpoint


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("data")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--scheme", default="int4", choices=["int4", "nf4", "int8"])
    parser.add_argument("--group-size", type=int, default=None, help="weights per scale (default: the scheme's)")
    parser.add_argument("--lr", type=float, default=1e-4, help="the same for plain training and QAT")
    parser.add_argument("--min-lr", type=float, default=None, help="cosine decay to this by the last step "
                                                                   "(default: --lr, a constant rate)")
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--adapter", default="full", choices=["full", "lora"], help="what trains in both runs")
    parser.add_argument("--max-tokens", type=int, default=100_000, help="val tokens scored per model")
    args = parser.parse_args()
    shards = TokenShards(args.data)
    spec = QuantSpec(args.scheme, args.group_size)
    train = {"max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
             "min_lr": args.lr if args.min_lr is None else args.min_lr,
             "warmup_steps": max(1, args.steps // 20), "eval_every": 0, "save_every": args.steps,
             "log_every": max(1, args.steps // 10)}

    def ppl(folder: Path) -> float:
        return perplexity(gptlab.load(folder, device="cpu"), shards, max_tokens=args.max_tokens)["perplexity"]

    rows: dict[str, float] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows["base (float)"] = ppl(Path(args.base))
        quantize_checkpoint(args.base, root / "ptq-base", spec)
        rows["base, PTQ"] = ppl(root / "ptq-base")
        plain_method = "lora" if args.adapter == "lora" else "full"
        for name, method, sections in (
                ("trained (float)", plain_method, {}),
                ("QAT", "qat", {"qat": {"scheme": args.scheme, "group_size": args.group_size,
                                        "adapter": args.adapter}})):
            start = time.perf_counter()
            gptlab.finetune(args.base, args.data, root / method, method=method, progress=False,
                            sections={"train": train, **sections})
            seconds[name] = time.perf_counter() - start
            rows[name] = ppl(root / method)
            if method != "qat":
                quantize_checkpoint(root / method, root / "ptq-trained", spec)
                rows["trained, PTQ"] = ppl(root / "ptq-trained")
    float_ppl, ptq, qat = rows["trained (float)"], rows["trained, PTQ"], rows["QAT"]
    recovered = (ptq - qat) / (ptq - float_ppl) if ptq != float_ppl else float("nan")
    group = spec.group_size or ("one row" if args.scheme == "int8" else 64)
    print(f"# {args.base} on {args.data} (val split, {args.max_tokens:,} tokens at most); {args.scheme}, group "
          f"{group}; {args.steps} steps of {args.adapter} training at lr {args.lr:g}"
          f"{'' if args.min_lr is None else f' decaying to {args.min_lr:g}'}, batch {args.batch_size}")
    print(f"# {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| model | val perplexity |\n|---|---:|")
    for name, value in rows.items():
        print(f"| {name} | {value:.4f} |")
    print(f"\nPTQ's increase after training: {ptq - float_ppl:+.4f}; QAT's: {qat - float_ppl:+.4f}; "
          f"recovered by QAT: {recovered:.1%}")
    print(f"time: plain {seconds['trained (float)']:.0f} s, QAT {seconds['QAT']:.0f} s")
    print(json.dumps({"perplexity": rows, "recovered": recovered, "seconds": seconds}))


if __name__ == "__main__":
    main()

"""The quickstart, on data every machine has: the Python standard library's own source.

prepare (character-level) -> a sample from the untrained model -> pretrain on the CPU -> a sample after training
-> LoRA fine-tuning on `def signature <summarize> first docstring line` pairs -> a summary from the adapter
-> the pretrained model quantized to NF4, a sample from it, and the size/perplexity/speed report of every scheme.
Each step is the `gptlab` command a user would type; this script only strings them together.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from gptlab import GPT
from gptlab.checkpoint import save_checkpoint
from gptlab.data.loader import TokenShards
from gptlab.train.config import merge_sections, model_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart-cpu.yaml"
PROMPT = "def "


def gptlab(*args: str) -> None:
    print("\n$ gptlab " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "gptlab", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--steps", default="2000")
    parser.add_argument("--finetune-steps", default="300")
    args = parser.parse_args()
    out = Path(args.out)
    data, run, untrained = out / "data", out / "run", out / "untrained"

    if not (data / "meta.json").exists():
        gptlab("prepare", "stdlib", "--out", str(data), "--tokenizer", "char")

    # The same model the config describes, before any training, to compare against.
    import yaml

    shards = TokenShards(data)
    sections = merge_sections(yaml.safe_load(CONFIG.read_text()), {})
    torch.manual_seed(0)
    save_checkpoint(untrained, GPT(model_config(sections["model"], shards.tokenizer().vocab_size)),
                    shards.tokenizer())
    gptlab("generate", str(untrained), "--prompt", PROMPT, "--max-new-tokens", "120", "--seed", "0",
           "--temperature", "0.8")

    resume = ["--resume"] if (run / "train_state.pt").exists() else []
    gptlab("pretrain", "--config", str(CONFIG), "--data", str(data), "--out", str(run), "--train.max_steps",
           args.steps, *resume)
    gptlab("generate", str(run), "--prompt", PROMPT, "--max-new-tokens", "200", "--seed", "0", "--temperature", "0.8")

    lora = out / "lora"
    resume = ["--resume"] if (lora / "train_state.pt").exists() else []
    gptlab("finetune", str(run), "--method", "lora", "--data", "stdlib-summaries", "--out", str(lora),
           "--lora.r", "8", "--train.max_steps", args.finetune_steps, "--train.eval_every", "100",
           "--train.save_every", "100", "--train.log_every", "20", *resume)  # LoRA's default learning rate
    gptlab("generate", str(lora), "--prompt", "def read_file(path): <summarize>", "--max-new-tokens", "40",
           "--temperature", "0", "--stop", "\n")

    nf4 = out / "nf4"
    if not (nf4 / "model.safetensors").exists():
        gptlab("quantize", str(run), "--scheme", "nf4", "--double-quant", "--out", str(nf4))
    gptlab("generate", str(nf4), "--prompt", PROMPT, "--max-new-tokens", "200", "--seed", "0", "--temperature", "0.8")
    gptlab("quantize", str(run), "--report", "--data", str(data), "--out", str(out / "quantize-report"))
    print(f"\ncheckpoint: {run}/ (model.safetensors, config.json, tokenizer.json); LoRA adapter: {lora}/; "
          f"NF4 copy: {nf4}/")
    print(f"loss curves: {run}/loss.png, {lora}/loss.png; every logged step: metrics.jsonl beside them")


if __name__ == "__main__":
    main()

"""The quickstart on data every machine has: the Python standard library's own source.

Trains a byte-level BPE tokenizer on part of the standard library, builds a small GPT, saves a checkpoint folder and
generates from it through the `gptlab` command. The model is freshly initialised, so its text is noise until it is
trained.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

from gptlab import GPT, ModelConfig, Tokenizer
from gptlab.checkpoint import save_checkpoint


def stdlib_texts(limit_bytes: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= limit_bytes:
            break
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out/demo")
    args = parser.parse_args()
    out = Path(args.out)

    texts = stdlib_texts(2_000_000)
    print(f"training a BPE tokenizer on {sum(map(len, texts)) / 1e6:.1f} MB of the standard library")
    tokenizer = Tokenizer.train_bpe(texts, vocab_size=2048)
    torch.manual_seed(0)
    config = ModelConfig.from_preset("small-cpu", vocab_size=tokenizer.vocab_size)
    model = GPT(config)
    print(f"model: {config.n_layer} layers, {config.n_embd} wide, {model.num_params():,} parameters")
    save_checkpoint(out, model, tokenizer)
    print(f"checkpoint: {out}")
    cmd = [sys.executable, "-m", "gptlab", "generate", str(out), "--prompt", "def ", "--max-new-tokens", "40",
           "--seed", "0"]
    print("$ gptlab " + " ".join(cmd[3:]))
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()

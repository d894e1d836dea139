"""`gptlab prepare` of one large file: peak resident memory and speed against the file's size.

    python benchmarks/prepare.py [--sizes 25,50,100,200] [--tokenizer bpe-4096|char]

Each size is one text file made of Python's standard library source repeated to that many MB; `gptlab prepare FILE
--tokenizer TOKENIZER.json` runs in its own process (the tokenizer is trained once beforehand, on a 2 MB sample, so
the measure is reading and encoding), and its peak RSS comes from the kernel's accounting of that child. Memory
should stay flat in the file's size; the previous implementation read the file whole and encoded all of its pieces in
one batch (about 100 bytes per input byte).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gptlab.data.sources import stdlib_files
from gptlab.tokenizer import Tokenizer


def corpus(path: Path, mb: int, sample: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(-(-mb * 2**20 // len(sample.encode("utf-8")))):
            f.write(sample)


def run(src: Path, tokenizer: Path, out: Path) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of one `gptlab prepare` process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gptlab", "prepare", str(src), "--tokenizer", str(tokenizer),
                             "--out", str(out), "--quiet"], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"prepare failed on {src} (status {status})")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="25,50,100,200", help="file sizes in MB")
    parser.add_argument("--tokenizer", default="bpe-4096", choices=["bpe-4096", "char"])
    args = parser.parse_args()
    texts = []
    for p in stdlib_files():
        texts.append(p.read_text(encoding="utf-8", errors="replace"))
        if sum(map(len, texts)) > 2 * 2**20:
            break
    sample = "".join(texts)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = Tokenizer.train_bpe([sample], 4096) if args.tokenizer == "bpe-4096" else Tokenizer.train_char([sample])
        tok.save(str(tmp / "tokenizer.json"))
        print(f"| file | peak RSS | time | MB/s |  ({args.tokenizer}, {os.cpu_count()} cores)")
        print("|---:|---:|---:|---:|")
        for mb in map(int, args.sizes.split(",")):
            src = tmp / f"{mb}mb.txt"
            corpus(src, mb, sample)
            rss, seconds = run(src, tmp / "tokenizer.json", tmp / f"out{mb}")
            size = src.stat().st_size / 1e6
            print(f"| {size:.0f} MB | {rss:.0f} MB | {seconds:.1f} s | {size / seconds:.2f} |", flush=True)
            src.unlink()
            for f in (tmp / f"out{mb}").iterdir():
                f.unlink()


if __name__ == "__main__":
    main()

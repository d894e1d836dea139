"""Batches from token shards, as a pure function of (seed, step, micro-step): resuming a run replays exactly the
batches it would have seen, with no loader state to save."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gptlab.errors import GptlabError
from gptlab.tokenizer import Tokenizer

SPLITS = {"train": 0, "val": 1}


class TokenShards:
    """The `train.bin` / `val.bin` of a prepared data folder, memory-mapped."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise GptlabError(f"data folder {folder} does not exist (make one with `gptlab prepare`)")
        needed = ("meta.json", "train.bin", "val.bin", "tokenizer.json")
        missing = [f for f in needed if not (self.folder / f).is_file()]
        if missing:
            raise GptlabError(f"{folder} is not a prepared data folder: missing {', '.join(missing)}")
        self.meta = json.loads((self.folder / "meta.json").read_text())
        dtype = np.dtype(self.meta["dtype"])
        self.data = {s: np.memmap(self.folder / f"{s}.bin", dtype=dtype, mode="r") if
                     (self.folder / f"{s}.bin").stat().st_size else np.zeros(0, dtype) for s in SPLITS}

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_folder(self.folder)

    def check(self, block_size: int, batch_size: int, need_val: bool) -> None:
        n = len(self.data["train"])
        if n < batch_size * block_size + 1:
            raise GptlabError(f"the train split has {n:,} tokens, less than one batch ({batch_size} x {block_size} "
                              f"= {batch_size * block_size:,}); use a smaller batch or context, or more data")
        if need_val and len(self.data["val"]) < block_size + 1:
            raise GptlabError(f"the val split has {len(self.data['val']):,} tokens, fewer than one block "
                              f"({block_size} + 1); prepare with a larger --val-fraction, or set train.eval_every 0")

    def batch(self, split: str, key: tuple[int, ...], batch_size: int, block_size: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets (B, T), drawn at random positions chosen by `key` alone."""
        data = self.data[split]
        rng = np.random.default_rng([SPLITS[split], *key])
        starts = rng.integers(0, len(data) - block_size, size=batch_size)  # (B,)
        rows = torch.from_numpy(data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))  # (B, T+1)
        return rows[:, :-1], rows[:, 1:]

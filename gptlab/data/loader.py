"""Batches from token shards, as a pure function of (seed, step, micro-step): resuming a run replays exactly the
batches it would have seen, with no loader state to save."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gptlab.errors import GptlabError
from gptlab.files import read_json_object
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
        self.meta = read_json_object(self.folder / "meta.json", missing_ok=False)
        if self.meta.get("dtype") not in ("uint16", "uint32"):
            raise GptlabError(f"{self.folder / 'meta.json'} names no token dtype (uint16 or uint32): "
                              f"{self.meta.get('dtype')!r}")
        dtype = np.dtype(self.meta["dtype"])
        self.data = {}
        for s in SPLITS:
            path = self.folder / f"{s}.bin"
            size = path.stat().st_size
            if size % dtype.itemsize:
                raise GptlabError(f"{path} has {size:,} bytes, not a whole number of {dtype.name} tokens: it is "
                                  "truncated or not from this folder; prepare the data again")
            self.data[s] = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_folder(self.folder)

    def check_tokenizer(self, tokenizer: Tokenizer, model: str) -> None:
        """These tokens must be the model's: data prepared with another tokenizer scores a model on wrong ids. (The
        model's may have more: task tokens added in fine-tuning.)"""
        ours = self.tokenizer().backend.get_vocab(with_added_tokens=True)
        if not ours.items() <= tokenizer.backend.get_vocab(with_added_tokens=True).items():
            raise GptlabError(f"{self.folder} was prepared with another tokenizer than {model}'s; prepare it with "
                              f"`gptlab prepare SOURCES --out NEW --tokenizer CHECKPOINT`")

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


class ShardWindows:
    """A prepared token folder as fine-tuning data (continued pretraining: QAT's recovery is measured this way).

    Windows are the run's own context, which a method that reserves positions (prompt and prefix tuning) makes
    shorter than the base's, so the loop's block size is overridden here as examples do theirs."""

    truncated = 0  # windows are cut to the context by construction

    def __init__(self, shards: TokenShards, block_size: int) -> None:
        self.shards, self.block_size = shards, block_size

    def check(self, block_size: int, batch_size: int, need_val: bool) -> None:
        self.shards.check(self.block_size, batch_size, need_val)

    def batch(self, split: str, key: tuple[int, ...], batch_size: int, block_size: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.shards.batch(split, key, batch_size, self.block_size)

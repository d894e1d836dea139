"""Corpus -> token shards: `train.bin`, `val.bin`, `tokenizer.json`, `meta.json`.

The shards are flat arrays of token ids (uint16 when the vocabulary fits, else uint32), documents separated by
`<|endoftext|>`, as nanoGPT's. Text is read and encoded in pieces, so memory stays flat; encoding runs on every core
(Hugging Face tokenizers' `encode_batch`). A piece goes to the val split whenever val holds less than `val_fraction`
of the text before it, so the split is exact to a piece and the same on every run, for a single large file as for a
folder of small ones.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gptlab.data.sources import DEFAULT_EXTENSIONS, SourceReport, documents, resolve, total_bytes
from gptlab.errors import GptlabError
from gptlab.files import atomic_write_text
from gptlab.tokenizer import Tokenizer

PIECE_CHARS = 1 << 14  # text is encoded in pieces of about this many characters, cut at line ends
BATCH_PIECES = 256


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def pieces(text: str) -> Iterator[str]:
    """Cut a document at line ends into pieces of about PIECE_CHARS characters (BPE never merges across a cut that
    falls on a newline it would keep whole anyway)."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        cut = text.rfind("\n", start, start + PIECE_CHARS) + 1
        cut = cut if cut > start else start + PIECE_CHARS
        yield text[start:cut]
        start = cut
    yield text[start:]


def build_tokenizer(spec: str, files: Sequence[tuple[str, Path]], vocab_size: int, text_field: str) -> Tokenizer:
    """`bpe` and `char` train on the sources; anything else is a tokenizer.json or a folder holding one (or GPT-2's
    vocab.json + merges.txt)."""
    if spec == "bpe":
        return Tokenizer.train_bpe(documents(files, text_field, SourceReport()), vocab_size)
    if spec == "char":
        return Tokenizer.train_char(documents(files, text_field, SourceReport()))
    path = Path(spec)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return Tokenizer.from_file(path / "tokenizer.json")
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return Tokenizer.from_vocab_merges(path / "vocab.json", path / "merges.txt")
        raise GptlabError(f"{spec} holds no tokenizer.json nor vocab.json + merges.txt")
    if path.is_file():
        return Tokenizer.from_file(path)
    raise GptlabError(f"--tokenizer must be bpe, char, or a tokenizer file or folder; {spec!r} is none of these")


def prepare(sources: Sequence[str], out: str | Path, tokenizer: str = "bpe", vocab_size: int = 4096,
            val_fraction: float = 0.05, extensions: Sequence[str] = DEFAULT_EXTENSIONS, text_field: str = "text",
            progress: bool = True) -> dict[str, Any]:
    """Tokenize `sources` into `out`; returns the contents of meta.json."""
    if not 0 <= val_fraction < 1:
        raise GptlabError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if tokenizer == "bpe" and vocab_size < 257:
        raise GptlabError(f"--vocab-size must be at least 257 for a byte-level BPE (256 bytes + <|endoftext|>), "
                          f"got {vocab_size}")
    out = Path(out)
    if out.exists() and any((out / f).exists() for f in ("train.bin", "val.bin", "meta.json")):
        raise GptlabError(f"{out} already holds prepared data; choose a new --out (nothing was written)")
    files = resolve(sources, tuple(e if e.startswith(".") else f".{e}" for e in extensions))
    t0 = time.perf_counter()
    tok = build_tokenizer(tokenizer, files, vocab_size, text_field)
    eos = tok.eos_id
    if eos is None:
        raise GptlabError("the tokenizer has no <|endoftext|> token to separate documents")
    dtype = token_dtype(tok.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tmp = {split: out / f".{split}.bin.tmp" for split in ("train", "val")}
    counts = {"train": 0, "val": 0}
    chars = {"train": 0, "val": 0}
    report = SourceReport()
    bar = tqdm(total=total_bytes(files), unit="B", unit_scale=True, desc="prepare", disable=not progress)
    try:
        with open(tmp["train"], "wb") as f_train, open(tmp["val"], "wb") as f_val:
            sinks = {"train": f_train, "val": f_val}
            batch: list[tuple[str, str, bool]] = []  # (split, text, ends a document)

            def flush() -> None:
                encodings = tok.backend.encode_batch([text for _, text, _ in batch], add_special_tokens=False)
                for (split, text, last), enc in zip(batch, encodings):
                    ids = enc.ids + [eos] if last else enc.ids
                    np.asarray(ids, dtype=dtype).tofile(sinks[split])
                    counts[split] += len(ids)
                    bar.update(len(text.encode("utf-8")))
                batch.clear()

            for doc in documents(files, text_field, report):
                parts = list(pieces(doc))
                for i, part in enumerate(parts):
                    split = "val" if chars["val"] < val_fraction * (chars["train"] + chars["val"]) else "train"
                    chars[split] += len(part)
                    batch.append((split, part, i == len(parts) - 1))
                if len(batch) >= BATCH_PIECES:
                    flush()
            if batch:
                flush()
        bar.close()
        if report.documents == 0:
            raise GptlabError("the sources hold no text (empty files, or every file was skipped)")
        for split, path in tmp.items():
            path.replace(out / f"{split}.bin")
    finally:
        bar.close()
        for path in tmp.values():
            path.unlink(missing_ok=True)
    if val_fraction > 0 and counts["val"] == 0:
        print("gptlab: warning: the val split is empty (the corpus is a single piece); evaluation will need more text",
              file=sys.stderr)
    seconds = time.perf_counter() - t0
    tok.save(out / "tokenizer.json")
    meta = {
        "train_tokens": counts["train"], "val_tokens": counts["val"], "dtype": dtype.name,
        "vocab_size": tok.vocab_size, "tokenizer": tokenizer if tokenizer in ("bpe", "char") else str(tokenizer),
        "sources": list(sources), "documents": report.documents, "bytes": report.bytes,
        "skipped": report.skipped, "val_fraction": val_fraction,
        "seconds": round(seconds, 3), "mb_per_s": round(report.bytes / 1e6 / max(seconds, 1e-9), 2),
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta

"""Corpus -> token shards: `train.bin`, `val.bin`, `tokenizer.json`, `meta.json`.

The shards are flat arrays of token ids (uint16 when the vocabulary fits, else uint32), each document ended by the
tokenizer's EOS (`<|endoftext|>` for gptlab's own, `</s>`, `<|end_of_text|>`, ... for a model's) and started by its
BOS where it adds one, as nanoGPT's and as the model was pretrained. Text is read and encoded in pieces (a file is
never read whole), so memory stays flat in the size of the corpus and of any one file; encoding runs on every core
(Hugging Face tokenizers' `encode_batch_fast`).

The val split holds out text the model never trains on: whole documents, chosen as they stream by so that val keeps
`val_fraction` of the bytes seen; a document too large for that (more than half of the val budget: one big file, say)
gives the contiguous tail of its text instead, as nanoGPT holds out the last 10% of its one text. The split is the
same on every run, and `meta.json` says how it was made and what fraction it came to.
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

from gptlab.data.sources import DEFAULT_EXTENSIONS, Document, SourceReport, documents, resolve, texts, total_bytes
from gptlab.errors import GptlabError
from gptlab.files import atomic_write_text, check_new_folder, write_folder
from gptlab.tokenizer import Tokenizer

BATCH_PIECES = 256  # pieces encoded at once (on every core); with PIECE_CHARS, about 4 MB of text in memory
BIG_DOCUMENT = 0.5  # of the val budget: a larger document gives its tail to val rather than going there whole
LINE_SEARCH = 1000  # characters after the tail's exact start within which it moves to the next line start


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def split_pieces(doc: Document, split: str | None, val_chars: int) -> Iterator[tuple[str, str, bool, bool]]:
    """(split, piece, starts the document, ends it) for each piece of `doc`: all of it in `split`, or (split None)
    its last `val_chars` characters in val and the rest in train, the cut moved to the next line start when one is
    near."""
    cut = doc.chars - val_chars if split is None else None
    pos, first, pending = 0, True, None
    for piece in doc.read():
        parts = [(split or ("train" if pos < cut else "val"), piece)]
        if cut is not None and pos < cut < pos + len(piece):  # the tail starts inside this piece
            at = cut - pos
            line = piece.find("\n", at - 1, at + LINE_SEARCH) + 1  # a line start at or after the exact cut
            if line == len(piece):  # the next piece starts the tail
                parts = [("train", piece)]
            else:
                at = line or at
                parts = [("train", piece[:at]), ("val", piece[at:])]
        pos += len(piece)
        for part in parts:
            if pending is not None:
                yield (*pending, first, False)
                first = False
            pending = part
    if pending is not None:
        yield (*pending, first, True)


def build_tokenizer(spec: str, files: Sequence[tuple[str, Path]], vocab_size: int, text_field: str) -> Tokenizer:
    """`bpe` and `char` train on the sources; anything else is a tokenizer.json, or a folder holding one: a gptlab
    checkpoint or data folder, or a Hugging Face model's (read as `AutoTokenizer` reads it, special tokens
    included), or GPT-2's vocab.json + merges.txt."""
    if spec == "bpe":
        return Tokenizer.train_bpe(texts(files, text_field), vocab_size)
    if spec == "char":
        return Tokenizer.train_char(texts(files, text_field))
    path = Path(spec)
    if path.is_dir():
        from gptlab.interop.hf import read_hf_tokenizer

        return read_hf_tokenizer(path)
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
    if out.is_file():
        check_new_folder(out)
    if out.exists() and any(out.iterdir()):
        what = "prepared data" if (out / "meta.json").exists() else "files"
        raise GptlabError(f"{out} already holds {what}; choose a new or empty --out (nothing was written)")
    inputs = [s for s in sources if s != "stdlib" and Path(s).exists()]
    check_new_folder(out, inputs)
    files = resolve(sources, tuple(e if e.startswith(".") else f".{e}" for e in extensions))
    t0 = time.perf_counter()
    tok = build_tokenizer(tokenizer, files, vocab_size, text_field)
    eos = tok.eos_id
    if eos is None:
        raise GptlabError("the tokenizer has no end-of-text token (eos_token) to separate documents")
    meta: dict[str, Any] = {}
    write_folder(out, lambda folder: meta.update(_write(folder, files, tok, tokenizer, sources, val_fraction,
                                                        text_field, progress, t0)), inputs)
    return meta


def _write(folder: Path, files: list[tuple[str, Path]], tok: Tokenizer, tokenizer: str, sources: Sequence[str],
           val_fraction: float, text_field: str, progress: bool, t0: float) -> dict[str, Any]:
    """The shards, tokenizer and meta.json, written into the staging `folder`; returns meta.json's contents."""
    eos, bos, dtype = tok.eos_id, tok.prefix_ids, token_dtype(tok.vocab_size)
    shards = {split: folder / f"{split}.bin" for split in ("train", "val")}
    counts = {"train": 0, "val": 0}
    seen = {"train": 0, "val": 0}  # bytes
    held = {"documents": 0, "tails": 0}
    budget = val_fraction * total_bytes(files)  # of val, in bytes
    report = SourceReport()
    bar = tqdm(total=total_bytes(files), unit="B", unit_scale=True, desc="prepare", disable=not progress)
    try:
        with open(shards["train"], "wb") as f_train, open(shards["val"], "wb") as f_val:
            sinks = {"train": f_train, "val": f_val}
            batch: list[tuple[str, str, bool, bool]] = []  # (split, text, starts a document, ends it)

            def flush() -> None:
                encodings = tok.backend.encode_batch_fast([text for _, text, _, _ in batch], add_special_tokens=False)
                for (split, _, first, last), enc in zip(batch, encodings):
                    ids = (bos if first else []) + enc.ids + ([eos] if last else [])
                    np.asarray(ids, dtype=dtype).tofile(sinks[split])
                    counts[split] += len(ids)
                batch.clear()

            for doc in documents(files, text_field, report):
                if val_fraction == 0:
                    split, val_chars = "train", 0
                elif doc.bytes > BIG_DOCUMENT * budget:  # the tail of this document is held out
                    split, val_chars = None, max(1, round(val_fraction * doc.chars))
                    held["tails"] += 1
                else:  # the whole document, when val is short of its share of the bytes so far
                    total = seen["train"] + seen["val"] + doc.bytes
                    split = "val" if seen["val"] + doc.bytes / 2 <= val_fraction * total else "train"
                    val_chars = 0
                    held["documents"] += split == "val"
                for part in split_pieces(doc, split, val_chars):
                    size = len(part[1].encode("utf-8"))
                    seen[part[0]] += size
                    bar.update(size)
                    batch.append(part)
                    if len(batch) >= BATCH_PIECES:
                        flush()
            if batch:
                flush()
        bar.close()
        if report.documents == 0:
            raise GptlabError("the sources hold no text (empty files, or every file was skipped)")
    finally:
        bar.close()
    made = seen["val"] / max(1, seen["train"] + seen["val"])
    if val_fraction > 0 and abs(made - val_fraction) > 0.2 * val_fraction:
        print(f"gptlab: warning: the val split is {made:.1%} of the text where {val_fraction:.1%} was asked: "
              f"{report.documents} document(s) of these sizes cannot be held out closer to it (whole documents, or "
              "the tails of large ones)", file=sys.stderr)
    if val_fraction > 0 and counts["val"] == 0:
        print("gptlab: warning: the val split is empty (the corpus is too small); evaluation will need more text",
              file=sys.stderr)
    seconds = time.perf_counter() - t0
    tok.save_folder(folder)
    meta = {
        "train_tokens": counts["train"], "val_tokens": counts["val"], "dtype": dtype.name,
        "vocab_size": tok.vocab_size, "tokenizer": tokenizer if tokenizer in ("bpe", "char") else str(tokenizer),
        "sources": list(sources), "documents": report.documents, "bytes": report.bytes,
        "skipped": report.skipped, "val_fraction": val_fraction, "val_fraction_made": round(made, 6),
        "split": {"rule": "whole documents to val while it holds less than val_fraction of the bytes so far; a "
                          f"document over {BIG_DOCUMENT:g} of the val budget gives the last val_fraction of its text",
                  "val_documents": held["documents"], "val_tails": held["tails"]},
        "bos": bool(bos), "eos_token": tok.specials["eos_token"],
        "seconds": round(seconds, 3), "mb_per_s": round(report.bytes / 1e6 / max(seconds, 1e-9), 2),
    }
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta

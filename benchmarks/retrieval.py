"""Retrieval on Python's own documentation: recall@1/5/10 and MRR of BM25, dense and hybrid search, index build speed
and query latency.

    python benchmarks/retrieval.py [--dense ENCODER]... [--train-steps 0,300] [--modules os,json,...]

The corpus is on every machine: each public function of a set of standard-library modules that has a docstring is one
document, `module.name(signature)` and its docstring; its question is the docstring's first sentence, with the
function's name taken out and turned into a question by rule ("Return the base name of pathname p." -> "Which
function returns the base name of pathname p?"). The one right answer is that function's document (any passage of
it); a question two functions share is left out. Documents go to `gptlab index` as a JSONL file, with the default
passage settings.

The dense encoders are those `--dense` names, and small gptlab models made here (a BPE tokenizer trained on the
documents, 2 layers, 128 wide), random or pretrained on the documents for each of `--train-steps`. A GPT's mean-pooled
hidden states were never trained to put a question near its answer, so these dense numbers are a floor: what a real
sentence embedding model (a sentence-transformers folder, given with --dense) would be measured against.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODULES = ("os,os.path,shutil,glob,fnmatch,json,re,string,textwrap,difflib,itertools,functools,operator,heapq,bisect,"
           "math,cmath,statistics,random,time,calendar,zlib,gzip,bz2,lzma,zipfile,tarfile,csv,base64,binascii,"
           "hashlib,secrets,struct,codecs,unicodedata,urllib.parse,html,email.utils,inspect,ast,tokenize,shlex,"
           "subprocess,tempfile,copy,pprint,warnings,logging,socket,platform,sysconfig,locale,gettext,uuid,ipaddress,"
           "mimetypes,importlib.util,traceback,dis,stat")  # 60 modules
VERBS = {"return": "returns", "get": "gets", "compute": "computes", "create": "creates", "convert": "converts",
         "make": "makes", "read": "reads", "write": "writes", "test": "tests", "check": "checks", "find": "finds",
         "open": "opens", "decode": "decodes", "encode": "encodes", "parse": "parses", "set": "sets", "add": "adds",
         "remove": "removes", "split": "splits", "join": "joins", "copy": "copies", "build": "builds",
         "calculate": "calculates", "run": "runs", "execute": "executes", "format": "formats", "load": "loads",
         "change": "changes", "determine": "determines", "generate": "generates", "register": "registers",
         "translate": "translates", "normalize": "normalizes", "compress": "compresses", "decompress": "decompresses",
         "raise": "raises", "print": "prints", "shuffle": "shuffles", "choose": "chooses", "search": "searches",
         "match": "matches", "apply": "applies", "call": "calls", "wait": "waits", "send": "sends",
         "receive": "receives", "extract": "extracts", "update": "updates", "delete": "deletes", "yield": "yields"}
FIRST_SENTENCE = re.compile(r"^(.+?[.!?])(?:\s|$)", re.S)


def documents(modules: list[str]) -> list[tuple[str, str]]:
    """(passage, question) for each public function with a docstring; questions two functions share are dropped."""
    seen: set[int] = set()  # a function several modules hold (os.path is posixpath) is one document
    pairs: list[tuple[str, str]] = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module this Python lacks (removed, or not built) is skipped
            continue
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj)
            if not doc or id(obj) in seen:
                continue
            question = ask_of(attr, doc)
            if question is None:
                continue
            try:
                signature = str(inspect.signature(obj))
            except (TypeError, ValueError):
                signature = "(...)"
            seen.add(id(obj))
            pairs.append((f"{name}.{attr}{signature}\n{doc}", question))
    counts: dict[str, int] = {}
    for _, q in pairs:
        counts[q.lower()] = counts.get(q.lower(), 0) + 1
    return [(p, q) for p, q in pairs if counts[q.lower()] == 1]


def ask_of(name: str, doc: str) -> str | None:
    """The question a docstring answers, made from its first sentence without the function's name; None for a
    docstring too short to ask about."""
    paragraphs = [p for p in doc.split("\n\n") if p.strip()]
    while paragraphs and re.match(rf"\s*{re.escape(name)}\s*\(", paragraphs[0]):  # an old-style signature line
        paragraphs.pop(0)
    if not paragraphs:
        return None
    text = " ".join(paragraphs[0].split())
    match = FIRST_SENTENCE.match(text)
    sentence = (match.group(1) if match else text).rstrip(".!?")
    sentence = re.sub(rf"\b{re.escape(name)}\b(\(\))?", "it", sentence)
    words = sentence.split()
    if len(words) < 4:
        return None
    verb = words[0].lower()
    if verb in VERBS:
        return f"Which function {VERBS[verb]} {' '.join(words[1:])}?"
    if verb.endswith("s") and verb[:-1] in VERBS:  # "Returns ..."
        return f"Which function {verb} {' '.join(words[1:])}?"
    return f"Which function is this: {sentence[0].lower()}{sentence[1:]}?"


def tiny_checkpoint(texts: list[str], folder: Path, steps: int) -> Path:
    """A small gptlab model: BPE on the documents, random weights, or pretrained on them for `steps`."""
    import torch

    from gptlab.checkpoint import save_checkpoint
    from gptlab.cli import main
    from gptlab.config import ModelConfig
    from gptlab.model import GPT
    from gptlab.tokenizer import Tokenizer

    shape = {"n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 512}
    folder.mkdir(parents=True, exist_ok=True)
    if steps == 0:
        tokenizer = Tokenizer.train_bpe(texts, vocab_size=4096)
        torch.manual_seed(0)
        return save_checkpoint(folder / "random", GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **shape)),
                               tokenizer)
    (folder / "docs.txt").write_text("\n\n".join(texts), encoding="utf-8")
    assert main(["prepare", str(folder / "docs.txt"), "--out", str(folder / "data"), "--vocab-size", "4096",
                 "--quiet"]) == 0
    assert main(["pretrain", "--data", str(folder / "data"), "--out", str(folder / "trained"), "--quiet",
                 *(f"--model.{k}={v}" for k, v in shape.items()), "--model.block_size=256",
                 f"--train.max_steps={steps}", "--train.batch_size=16", "--train.lr=2e-3", "--train.eval_every=0",
                 f"--train.threads={os.cpu_count()}"]) == 0
    return folder / "trained"


def measure(index, questions: list[tuple[str, str]], mode: str) -> dict[str, float]:
    """Recall@1/5/10, MRR (over the first 10) and the median query time, against each question's own document."""
    ranks, times = [], []
    for question, source in questions:
        t0 = time.perf_counter()
        hits = index.search(question, k=10 * 3, mode=mode)  # passages; several may be of one document
        times.append(time.perf_counter() - t0)
        docs = list(dict.fromkeys(h.source for h in hits))[:10]
        ranks.append(docs.index(source) + 1 if source in docs else None)
    n = len(ranks)
    return {f"r@{k}": sum(r is not None and r <= k for r in ranks) / n for k in (1, 5, 10)} | {
        "mrr": sum(1 / r for r in ranks if r is not None) / n, "ms": 1000 * statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", default=MODULES, help="standard-library modules whose functions are documents")
    parser.add_argument("--dense", action="append", default=[], help="an encoder folder (gptlab checkpoint or "
                                                                     "sentence-transformers); repeatable")
    parser.add_argument("--train-steps", default="0,300", help="the small gptlab models made here as encoders: "
                                                               "pretrained for each of these numbers of steps (0: "
                                                               "random); empty for none")
    parser.add_argument("--no-stdlib", action="store_true", help="skip timing a BM25 index of the stdlib's source")
    parser.add_argument("--show", type=int, default=0, help="print this many (question, passage) examples")
    args = parser.parse_args()
    from gptlab.data.sources import stdlib_files
    from gptlab.rag import Index

    pairs = documents(args.modules.split(","))
    for passage, question in pairs[:args.show]:
        print(f"Q: {question}\nA: {passage.splitlines()[0]}\n")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jsonl = tmp / "stdlib-docs.jsonl"
        jsonl.write_text("".join(json.dumps({"text": p}) + "\n" for p, _ in pairs), encoding="utf-8")
        size = jsonl.stat().st_size
        questions = [(q, f"{jsonl}:{n}") for n, (_, q) in enumerate(pairs, 1)]
        Index.build([str(jsonl)], tmp / "warm")  # imports and caches (NLTK, bm25s) out of the timing
        rows = []
        for label, stemmer in (("BM25 (Porter stems, the default)", "porter"), ("BM25 (words as written)", "none")):
            t0 = time.perf_counter()
            index = Index.build([str(jsonl)], tmp / f"bm25-{stemmer}", stemmer=stemmer)
            rows.append((label, index, "bm25", time.perf_counter() - t0))
        encoders = [(f"`{d}`", Path(d)) for d in args.dense]
        texts = [p for p, _ in pairs]
        for steps in (int(s) for s in args.train_steps.split(",") if s):
            name = "random" if steps == 0 else f"pretrained {steps} steps on the documents"
            encoders.append((f"gptlab 2x128 ({name})", tiny_checkpoint(texts, tmp / f"model-{steps}", steps)))
        notes = []
        for n, (label, folder) in enumerate(encoders):
            t0 = time.perf_counter()
            index = Index.build([str(jsonl)], tmp / f"dense-{n}", dense=folder)
            seconds = time.perf_counter() - t0
            rows += [(f"dense: {label}", index, "dense", seconds), (f"hybrid (RRF): BM25 + {label}", index, "hybrid",
                                                                     seconds)]
            if index.manifest["dense"]["truncated"]:
                notes.append(f"{label}: {index.manifest['dense']['truncated']} passages cut to "
                             f"{index.manifest['dense']['max_tokens']} tokens")
        print(f"{len(pairs)} functions of {len(args.modules.split(','))} modules, {len(rows[0][1])} passages, "
              f"{size / 1e6:.2f} MB; Python {platform.python_version()}, {os.cpu_count()} cores "
              f"({platform.processor() or platform.machine()})" + "".join(f"; {n}" for n in notes))
        print()
        print("| search | recall@1 | recall@5 | recall@10 | MRR@10 | median query | index build |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label, index, mode, seconds in rows:
            r = measure(index, questions, mode)
            print(f"| {label} | {r['r@1']:.3f} | {r['r@5']:.3f} | {r['r@10']:.3f} | {r['mrr']:.3f} | "
                  f"{r['ms']:.2f} ms | {size / 1e6 / seconds:.3g} MB/s ({seconds:.1f} s) |")
        print(f"\nchance recall@10: {10 / len(pairs):.3f}; a question's answer is its function's document (any of "
              "its passages); an index build's time includes embedding")
        if not args.no_stdlib:
            mb = sum(f.stat().st_size for f in stdlib_files()) / 1e6
            t0 = time.perf_counter()
            index = Index.build(["stdlib"], tmp / "stdlib")
            seconds = time.perf_counter() - t0
            print(f"BM25 index of `stdlib` (the standard library's source, {mb:.1f} MB, {len(index):,} passages): "
                  f"{seconds:.1f} s, {mb / seconds:.2f} MB/s")
        print(f"`{' '.join(['python', *sys.argv])}`")


if __name__ == "__main__":
    main()

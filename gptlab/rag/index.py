"""A retrieval index: passages, their BM25 index and, when asked, their dense vectors, in a folder of plain files.

    INDEX/
      manifest.json    the format, the sources (documents, passages, bytes of each), the settings, the encoder
                       (kind, path, fingerprint, dimension), the sizes and how long the last build took
      passages.jsonl   a passage a line: {"text", "source", "lines": [first, last], "doc"}
      bm25/            bm25s's own files: params.index.json, vocab.index.json, {data,indices,indptr}.csc.index.npy
      vectors.npy      (passages, dim) float32 unit vectors, only in a dense index

Nothing is pickled. An index is written whole into a staging folder and renamed into place; an update writes a new
copy (the old passages' vectors copied, not computed again) and swaps it in.

Hybrid search fuses the BM25 and the dense rankings by reciprocal rank fusion (Cormack et al., 2009): a passage
scores sum(1 / (60 + rank)) over the rankings it is in. Ranks, unlike scores, need no scaling between BM25's
unbounded, corpus-dependent scores and cosine similarities, so the fusion has no weight to tune per corpus or model.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gptlab.data.sources import DEFAULT_EXTENSIONS, SourceReport, documents, resolve, total_bytes
from gptlab.errors import GptlabError
from gptlab.files import (
    atomic_write_text,
    check_new_folder,
    check_outside,
    read_json_object,
    recover_replaced,
    replace_folder,
    write_folder,
)
from gptlab.rag.encoders import Encoder, check_same, load_encoder
from gptlab.rag.lexical import BM25, SETTINGS, STEMMERS
from gptlab.rag.passages import Passage, check_settings, split

FORMAT, VERSION = "gptlab-rag-index", 1
MANIFEST, PASSAGES, BM25_FOLDER, VECTORS = "manifest.json", "passages.jsonl", "bm25", "vectors.npy"
MODES = ("bm25", "dense", "hybrid")
RRF_K = 60  # the constant of reciprocal rank fusion, as its authors and most search engines set it
RRF_DEPTH = 100  # how far down each ranking the fusion looks
ENCODE_BATCH = 64
DEFAULTS = {"passage_chars": 800, "overlap": 100, "stemmer": "porter"}


@dataclass(frozen=True)
class Hit:
    """A passage found for a query: its text, score (BM25, cosine, or fused), where it is from, its rank (1-based)
    and its id in the index."""

    passage: str
    score: float
    source: str
    lines: tuple[int, int]
    id: int
    rank: int

    @property
    def where(self) -> str:
        """`source:first-last`, the lines the passage spans."""
        first, last = self.lines
        return f"{self.source}:{first}" if first == last else f"{self.source}:{first}-{last}"

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "id": self.id, "score": self.score, "source": self.source,
                "lines": list(self.lines), "passage": self.passage}


def is_index(folder: Path) -> bool:
    return read_json_object(folder / MANIFEST).get("format") == FORMAT if folder.is_dir() else False


def top(scores: np.ndarray, k: int, positive: bool = False) -> np.ndarray:
    """The ids of the `k` best scores, best first (ties by id); with `positive`, only scores above 0."""
    ids = np.flatnonzero(scores > 0) if positive else np.arange(len(scores))
    if len(ids) > k:
        ids = ids[np.argpartition(-scores[ids], k - 1)[:k]]
    return ids[np.lexsort((ids, -scores[ids]))]


def fuse(rankings: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Reciprocal rank fusion of rankings (ids, best first): a score for each of `size` passages (0 where in
    none)."""
    fused = np.zeros(size, dtype=np.float64)
    for ranking in rankings:
        fused[ranking] += 1.0 / (RRF_K + np.arange(1, len(ranking) + 1))
    return fused


def source_key(source: str) -> str:
    """What makes two sources the same: `stdlib`, or the file or folder's absolute path."""
    return source if source == "stdlib" else str(Path(source).resolve())


class Index:
    """Passages with a BM25 index and, for a dense index, their vectors; `Index.build` makes one, `Index.load`
    reads one, `search` queries it."""

    def __init__(self, folder: Path, manifest: dict[str, Any], passages: list[Passage], bm25: BM25,
                 vectors: np.ndarray | None, encoder: Encoder | None = None, device: str | None = None) -> None:
        self.folder = folder
        self.manifest = manifest
        self.passages = passages
        self.bm25 = bm25
        self.vectors = vectors
        self._encoder = encoder
        self._device = device

    def __len__(self) -> int:
        return len(self.passages)

    # -- build, update, load -------------------------------------------------------------------------------------
    @classmethod
    def build(cls, sources: Sequence[str], out: str | os.PathLike[str], dense: str | os.PathLike[str] | None = None,
              passage_chars: int | None = None, overlap: int | None = None, stemmer: str | None = None,
              extensions: Sequence[str] | None = None, text_field: str | None = None, update: bool = False,
              device: str | None = None, progress: bool = False) -> Index:
        """Index `sources` (files, folders, JSONL files, `stdlib`, as `gptlab prepare` reads them) into the new
        folder `out`, with dense vectors from the encoder folder `dense` if given; with `update`, add them to the
        index already in `out` (its settings and encoder). A setting left None is the default (DEFAULTS,
        DEFAULT_EXTENSIONS, the JSONL field "text"), or on update the index's own."""
        out = Path(out)
        if update:
            return cls.load(out, dense, device).add(sources, passage_chars, overlap, stemmer, extensions, text_field,
                                                    progress)
        recover_replaced(out)
        if is_index(out):
            raise GptlabError(f"{out} already holds an index; add to it with --update, or choose a new --out "
                              "(nothing was written)")
        if out.is_dir() and any(out.iterdir()):
            raise GptlabError(f"{out} exists and is not an index; choose a new or empty --out (nothing was written)")
        settings = {"passage_chars": DEFAULTS["passage_chars"] if passage_chars is None else passage_chars,
                    "overlap": DEFAULTS["overlap"] if overlap is None else overlap,
                    "stemmer": stemmer or DEFAULTS["stemmer"], "text_field": text_field or "text",
                    "extensions": _extensions(extensions or DEFAULT_EXTENSIONS)}
        _check(settings)
        inputs = [s for s in sources if s != "stdlib" and Path(s).exists()]
        check_new_folder(out, inputs)
        resolved = _resolve(sources, settings)
        encoder = load_encoder(dense, device) if dense is not None else None
        empty = {"format": FORMAT, "version": VERSION, "sources": [], "documents": 0, "bytes": 0, "settings": settings,
                 "bm25": {**SETTINGS, "stemmer": settings["stemmer"]},
                 "dense": None if encoder is None else {**encoder.info, "truncated": 0}}
        built: list[Index] = []
        write_folder(out, lambda staging: built.append(_write(staging, empty, [], None, resolved, encoder,
                                                              progress)), inputs)
        index = built[0]
        index.folder = out
        return index

    def add(self, sources: Sequence[str], passage_chars: int | None = None, overlap: int | None = None,
            stemmer: str | None = None, extensions: Sequence[str] | None = None, text_field: str | None = None,
            progress: bool = False) -> Index:
        """Add `sources` to this index: a new copy of its folder, with the old passages and vectors as they were and
        the new ones after them, is swapped in; returns the new index."""
        settings = dict(self.manifest["settings"])
        given = {"passage_chars": passage_chars, "overlap": overlap, "stemmer": stemmer, "text_field": text_field}
        for name, value in given.items():
            if value is not None and value != settings[name]:
                raise GptlabError(f"{self.folder} was built with --{name.replace('_', '-')} {settings[name]}, not "
                                  f"{value}: an update keeps the index's settings (nothing was written)")
        if extensions is not None:
            settings["extensions"] = _extensions(extensions)
        known = {s["path"] for s in self.manifest["sources"]}
        for src in sources:
            if source_key(src) in known:
                raise GptlabError(f"{src} is already in {self.folder} (nothing was written)")
        inputs = [s for s in sources if s != "stdlib" and Path(s).exists()]
        check_outside(self.folder, inputs)
        resolved = _resolve(sources, settings)
        encoder = self.encoder() if self.vectors is not None else None
        manifest = {**self.manifest, "settings": settings}
        built: list[Index] = []
        replace_folder(self.folder, lambda staging: built.append(_write(staging, manifest, self.passages,
                                                                        self.vectors, resolved, encoder, progress)))
        index = built[0]
        index.folder = self.folder
        return index

    @classmethod
    def load(cls, folder: str | os.PathLike[str], dense: str | os.PathLike[str] | Encoder | None = None,
             device: str | None = None) -> Index:
        """Read the index in `folder`; `dense`: the encoder for dense queries (a folder, or one already loaded),
        which must be the one the index was built with (default: that one, from the path the index records)."""
        folder = Path(folder)
        recover_replaced(folder)
        if not folder.is_dir():
            raise GptlabError(f"index {folder} does not exist" if not folder.exists() else
                              f"{folder} is not an index folder")
        manifest = read_json_object(folder / MANIFEST)
        if manifest.get("format") != FORMAT:
            raise GptlabError(f"{folder} is not an index (no {MANIFEST} of gptlab's index format): build one with "
                              "gptlab index")
        if manifest.get("version") != VERSION:
            raise GptlabError(f"{folder} is an index of format version {manifest.get('version')}; this gptlab reads "
                              f"version {VERSION}: build it again")
        passages = _read_passages(folder / PASSAGES)
        if len(passages) != manifest["passages"]:
            raise GptlabError(f"{folder / PASSAGES} has {len(passages)} passages where {MANIFEST} says "
                              f"{manifest['passages']}: the index is damaged, build it again")
        bm25 = BM25.load(folder / BM25_FOLDER, manifest["bm25"]["stemmer"])
        vectors = None
        if manifest.get("dense"):
            try:
                vectors = np.load(folder / VECTORS, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise GptlabError(f"cannot read {folder / VECTORS}: {e}") from None
            if vectors.shape != (len(passages), manifest["dense"]["dim"]):
                raise GptlabError(f"{folder / VECTORS} holds {vectors.shape} vectors where the index has "
                                  f"{len(passages)} passages of dimension {manifest['dense']['dim']}: build it again")
        index = cls(folder, manifest, passages, bm25, vectors, device=device)
        if dense is not None:
            index.use_encoder(dense)
        return index

    # -- the encoder ---------------------------------------------------------------------------------------------
    def use_encoder(self, dense: str | os.PathLike[str] | Encoder, llm: Any = None) -> None:
        """Query with this encoder (a folder, or one already loaded; `llm`: a gptlab LLM loaded from that folder),
        once it is checked to be the index's own."""
        if not self.manifest.get("dense"):
            raise GptlabError(f"{self.folder} has no dense vectors (it was built without --dense), so it takes no "
                              "encoder")
        encoder = load_encoder(dense, self._device, llm) if isinstance(dense, (str, os.PathLike)) else dense
        check_same(self.manifest["dense"], encoder, str(self.folder))
        self._encoder = encoder

    def encoder(self) -> Encoder:
        """The dense encoder, loaded from the path the index records when none was given."""
        if self._encoder is None:
            recorded = self.manifest["dense"]
            if not Path(recorded["path"]).exists():
                raise GptlabError(f"the encoder {recorded['path']} that {self.folder} was built with is not there; "
                                  "give its new place with --dense")
            self.use_encoder(recorded["path"])
        assert self._encoder is not None
        return self._encoder

    # -- search --------------------------------------------------------------------------------------------------
    def search(self, query: str, k: int = 4, mode: str | None = None) -> list[Hit]:
        """The `k` best passages for `query`, best first: by BM25 (only passages that hold a word of the query),
        by the dense vectors' cosine similarity, or both fused ("hybrid", the default for a dense index)."""
        if not isinstance(query, str) or not query.strip():
            raise GptlabError("the query is empty")
        if k < 1:
            raise GptlabError(f"k must be at least 1, got {k}")
        mode = mode or ("hybrid" if self.vectors is not None else "bm25")
        if mode not in MODES:
            raise GptlabError(f"unknown search mode {mode!r}; use one of {', '.join(MODES)}")
        if mode != "bm25" and self.vectors is None:
            raise GptlabError(f"{self.folder} has no dense vectors (it was built without --dense): search it with "
                              "mode bm25")
        if not self.passages:
            return []
        if mode == "bm25":
            scores = self.bm25.scores(query)
            ids = top(scores, k, positive=True)
        else:
            assert self.vectors is not None
            scores = self.vectors @ self.encoder().queries([query])[0]
            ids = top(scores, k)
            if mode == "hybrid":
                depth = max(k, RRF_DEPTH)
                scores = fuse([top(self.bm25.scores(query), depth, positive=True), top(scores, depth)], len(self))
                ids = top(scores, k, positive=True)
        return [Hit(self.passages[i].text, float(scores[i]), self.passages[i].source, self.passages[i].lines, int(i),
                    rank) for rank, i in enumerate(ids, 1)]


# -- building ------------------------------------------------------------------------------------------------------
def _check(settings: dict[str, Any]) -> None:
    check_settings(settings["passage_chars"], settings["overlap"])
    if settings["stemmer"] not in STEMMERS:
        raise GptlabError(f"unknown stemmer {settings['stemmer']!r}; use one of {', '.join(STEMMERS)}")


def _extensions(extensions: Sequence[str]) -> list[str]:
    return [e if e.startswith(".") else f".{e}" for e in extensions]


def _resolve(sources: Sequence[str], settings: dict[str, Any]) -> list[tuple[str, list[tuple[str, Path]]]]:
    """Each source with its files; a missing source is an error before anything is read."""
    if not sources:
        raise GptlabError("no source given: name files, folders, JSONL files, or stdlib")
    seen: set[str] = set()
    for src in sources:
        if source_key(src) in seen:
            raise GptlabError(f"{src} is named twice")
        seen.add(source_key(src))
    return [(src, resolve([src], tuple(settings["extensions"]))) for src in sources]


def _read_passages(path: Path) -> list[Passage]:
    try:
        with open(path, encoding="utf-8") as f:
            return [Passage.from_json(json.loads(line)) for line in f if line.strip()]
    except OSError as e:
        raise GptlabError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise GptlabError(f"{path} is damaged ({e}): build the index again") from None


def _encode(encoder: Encoder, texts: list[str], progress: bool) -> np.ndarray:
    dim = encoder.info["dim"]
    parts = [np.empty((0, dim), dtype=np.float32)]
    with tqdm(total=len(texts), unit="passage", desc="embed", disable=not progress) as bar:
        for start in range(0, len(texts), ENCODE_BATCH):
            parts.append(encoder.documents(texts[start:start + ENCODE_BATCH]))
            bar.update(len(parts[-1]))
    return np.concatenate(parts)


def _write(folder: Path, manifest: dict[str, Any], old: list[Passage], old_vectors: np.ndarray | None,
           sources: list[tuple[str, list[tuple[str, Path]]]], encoder: Encoder | None, progress: bool) -> Index:
    """Read `sources` into passages after `old`, and write the whole index into the staging `folder`."""
    t0 = time.perf_counter()
    settings = manifest["settings"]
    passages = list(old)
    doc = 1 + max((p.doc for p in old), default=-1)
    stats = []
    total = sum(total_bytes(files) for _, files in sources)
    with tqdm(total=total, unit="B", unit_scale=True, desc="index", disable=not progress) as bar:
        for src, files in sources:
            report, before = SourceReport(), len(passages)
            for d in documents(files, settings["text_field"], report):
                for text, first, last in split(d.read(), settings["passage_chars"], settings["overlap"]):
                    passages.append(Passage(text, d.where, (first, last), doc))
                doc += 1
            bar.update(total_bytes(files))
            if report.documents == 0:
                raise GptlabError(f"{src} holds no text (empty files, or every file was skipped); nothing was "
                                  "written")
            stats.append({"source": src, "path": source_key(src), "documents": report.documents,
                          "bytes": report.bytes, "passages": len(passages) - before, "skipped": report.skipped})
    new = passages[len(old):]
    bm25 = BM25.build([p.text for p in passages], settings["stemmer"])
    t1 = time.perf_counter()
    vectors = None
    if encoder is not None:
        fresh = _encode(encoder, [p.text for p in new], progress)
        vectors = fresh if old_vectors is None else np.concatenate([old_vectors, fresh])
    seconds = time.perf_counter() - t0
    added = sum(s["bytes"] for s in stats)
    dense = manifest["dense"]
    if encoder is not None:
        truncated = getattr(encoder, "truncated", 0)
        dense = {**encoder.info, "truncated": dense.get("truncated", 0) + truncated}
        if truncated:
            print(f"gptlab: note: {truncated} passage(s) are longer than the encoder's {encoder.info['max_tokens']} "
                  "tokens; their vectors are of their first tokens", file=sys.stderr)
    from gptlab import __version__

    manifest = {**manifest, "gptlab_version": __version__, "sources": [*manifest["sources"], *stats],
                "documents": manifest["documents"] + sum(s["documents"] for s in stats),
                "bytes": manifest["bytes"] + added, "passages": len(passages), "dense": dense,
                "bm25": {**manifest["bm25"], "library": f"bm25s {_version('bm25s')}"},
                "last_build": {"documents": sum(s["documents"] for s in stats), "bytes": added,
                               "passages": len(new), "seconds": round(seconds, 3),
                               "index_seconds": round(t1 - t0, 3), "embed_seconds": round(seconds - (t1 - t0), 3),
                               "mb_per_s": round(added / 1e6 / max(seconds, 1e-9), 3)}}
    with open(folder / PASSAGES, "w", encoding="utf-8") as f:  # the staging folder: renamed into place whole
        for p in passages:
            f.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
    (folder / BM25_FOLDER).mkdir()
    bm25.save(folder / BM25_FOLDER)
    if vectors is not None:
        with open(folder / VECTORS, "wb") as f:
            np.save(f, vectors, allow_pickle=False)
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return Index(folder, manifest, passages, bm25, vectors, encoder)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"

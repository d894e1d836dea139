"""BM25 over the passages, by the `bm25s` library, saved in its own files (.npy arrays with pickling off, JSON).

Words are what bm25s's tokenizer takes (runs of two or more word characters, lower-cased, English stop words left
out), each reduced to its Porter stem (NLTK's, which gptlab's ROUGE already depends on) so that "returns" finds
"return". BM25's weights depend on every passage (IDF, average length), so an update indexes the words of all
passages again: that is fast, unlike embedding them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.errors import GptlabError

STEMMERS = ("porter", "none")
SETTINGS = {"method": "lucene", "k1": 1.5, "b": 0.75, "stopwords": "en"}


def _bm25s() -> Any:
    try:
        import bm25s
    except ImportError:
        raise GptlabError("retrieval needs the bm25s package: pip install 'gptlab[rag]'") from None
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


@cache
def _stemmer(name: str) -> Callable[[list[str]], list[str]] | None:
    if name == "none":
        return None
    if name != "porter":
        raise GptlabError(f"unknown stemmer {name!r}; use one of {', '.join(STEMMERS)}")
    from nltk.stem.porter import PorterStemmer

    stem = PorterStemmer().stem
    return lambda words: [stem(w) for w in words]


def words(texts: Sequence[str], stemmer: str) -> list[list[str]]:
    """Each text as the words BM25 counts."""
    return _bm25s().tokenize(list(texts), stopwords=SETTINGS["stopwords"], stemmer=_stemmer(stemmer),
                             return_ids=False, show_progress=False)


class BM25:
    """A bm25s index and the stemmer its words were made with."""

    def __init__(self, retriever: Any, stemmer: str) -> None:
        self.retriever = retriever
        self.stemmer = stemmer

    @classmethod
    def build(cls, texts: Sequence[str], stemmer: str = "porter") -> BM25:
        bm25s = _bm25s()
        retriever = bm25s.BM25(method=SETTINGS["method"], k1=SETTINGS["k1"], b=SETTINGS["b"])
        retriever.index(words(texts, stemmer), show_progress=False)
        return cls(retriever, stemmer)

    def save(self, folder: Path) -> None:
        self.retriever.save(str(folder), allow_pickle=False, show_progress=False)

    @classmethod
    def load(cls, folder: Path, stemmer: str) -> BM25:
        try:
            retriever = _bm25s().BM25.load(str(folder), allow_pickle=False, show_progress=False)
        except (OSError, ValueError) as e:
            raise GptlabError(f"cannot read the BM25 index in {folder}: {e}") from None
        return cls(retriever, stemmer)

    @property
    def size(self) -> int:
        return int(self.retriever.scores["num_docs"])

    def scores(self, query: str) -> np.ndarray:
        """The BM25 score of every passage for `query` (zeros where no word of it is in the index)."""
        vocab = self.retriever.vocab_dict
        ids = [vocab[w] for w in words([query], self.stemmer)[0] if w in vocab]
        if not ids:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self.retriever.get_scores(ids), dtype=np.float32)

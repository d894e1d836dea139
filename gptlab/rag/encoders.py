"""Dense encoders: text -> unit vectors, from a gptlab checkpoint or a sentence-transformers / Hugging Face folder.

Either kind is named by its folder and recognized by a fingerprint of what is in it (configs and tokenizer whole, the
weights by their size and evenly spaced blocks), so that an index is never searched or extended with vectors of
another model, even one of the same shape or kept at the same path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gptlab.errors import GptlabError
from gptlab.files import read_json_object

SKIP = {"README.md", "metrics.jsonl", "loss.png", "train_state.pt"}  # beside a model, but not the model
WHOLE_BYTES = 1 << 20  # files up to this size are hashed whole; larger ones (weights) by samples
SAMPLES, SAMPLE_BYTES = 16, 1 << 16
BATCH = 32


class Encoder(Protocol):
    """What an index asks of a dense encoder."""

    info: dict[str, Any]  # kind, path, fingerprint, dim, max_tokens: recorded in the index's manifest

    def documents(self, texts: Sequence[str]) -> np.ndarray: ...  # (N, dim) float32 unit vectors

    def queries(self, texts: Sequence[str]) -> np.ndarray: ...


def fingerprint(folder: Path) -> str:
    """A hash of a model folder's files: small ones whole, large ones by size and SAMPLES blocks."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder)
        if f.name in SKIP or any(part.startswith(".") for part in rel.parts):
            continue
        size = f.stat().st_size
        h.update(f"{rel.as_posix()}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= WHOLE_BYTES:
                h.update(fh.read())
                continue
            for i in range(SAMPLES):
                fh.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                h.update(fh.read(SAMPLE_BYTES))
    return "sha256:" + h.hexdigest()


def kind_of(folder: Path) -> str:
    """"gptlab" for a gptlab checkpoint folder, "sentence-transformers" for any other model folder."""
    if not folder.is_dir():
        raise GptlabError(f"encoder {folder} is not a folder: give a gptlab checkpoint or a sentence-transformers "
                          "/ Hugging Face encoder folder")
    config = read_json_object(folder / "config.json")
    if "gptlab_version" in config or isinstance(config.get("model"), dict):
        return "gptlab"
    if (folder / "modules.json").is_file() or "model_type" in config:
        return "sentence-transformers"
    raise GptlabError(f"{folder} is neither a gptlab checkpoint nor a sentence-transformers / Hugging Face model "
                      "folder (no config.json or modules.json)")


class GptlabEncoder:
    """A gptlab checkpoint's mean-pooled last hidden states (`LLM.embed`); a text longer than the model's context
    keeps its first tokens (how many texts were cut is counted in `truncated`)."""

    def __init__(self, folder: Path, device: str | None = None, llm: Any = None) -> None:
        from gptlab.api import load

        self.llm = llm if llm is not None else load(folder, device=device)
        self.context = self.llm.engine.context
        self.truncated = 0
        self.info = {"kind": "gptlab", "path": str(folder.resolve()), "fingerprint": fingerprint(folder),
                     "dim": self.llm.model.config.n_embd, "max_tokens": self.context}

    def _encode(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        ids = [self.llm.engine.encode(t) for t in texts]
        vectors = self.llm.embed([i[:self.context] for i in ids])
        return vectors.cpu().numpy().astype(np.float32), sum(len(i) > self.context for i in ids)

    def documents(self, texts: Sequence[str]) -> np.ndarray:
        vectors, cut = self._encode(texts)
        self.truncated += cut
        return vectors

    def queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts)[0]


class SentenceTransformerEncoder:
    """A sentence-transformers folder, or a Hugging Face encoder folder (which sentence-transformers mean-pools),
    read offline; texts beyond its `max_seq_length` tokens are truncated by sentence-transformers. Queries and
    documents get the model's own prompts where it has them (`encode_query`, `encode_document`)."""

    def __init__(self, folder: Path, device: str | None = None) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise GptlabError("a sentence-transformers encoder needs the sentence-transformers package: pip install "
                              "'gptlab[rag]'") from None
        try:
            self.model = SentenceTransformer(str(folder), device=device, local_files_only=True)
        except (OSError, ValueError) as e:
            raise GptlabError(f"cannot load {folder} with sentence-transformers: {e}") from None
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.info = {"kind": "sentence-transformers", "path": str(folder.resolve()), "fingerprint": fingerprint(folder),
                     "dim": int(dim()), "max_tokens": self.model.max_seq_length}

    def _encode(self, texts: Sequence[str], method: str) -> np.ndarray:
        encode = getattr(self.model, method, self.model.encode)
        vectors = encode(list(texts), batch_size=BATCH, normalize_embeddings=True, convert_to_numpy=True,
                         show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)

    def documents(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, "encode_document")

    def queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, "encode_query")


def load_encoder(folder: str | os.PathLike[str], device: str | None = None, llm: Any = None) -> Encoder:
    """The encoder in `folder`; `llm`: a gptlab LLM already loaded from it (so `ask` reads a checkpoint once)."""
    folder = Path(folder)
    if not folder.exists():
        raise GptlabError(f"encoder {folder} does not exist: give a model folder on this machine (a model on the hub: "
                          "download it first)")
    if kind_of(folder) == "gptlab":
        return GptlabEncoder(folder, device, llm)
    return SentenceTransformerEncoder(folder, device)


def check_same(recorded: dict[str, Any], encoder: Encoder, index: str) -> None:
    """The encoder must be the one the index's vectors were made with."""
    if encoder.info["fingerprint"] != recorded.get("fingerprint"):
        raise GptlabError(f"{index} was built with the encoder {recorded.get('path')} ({recorded.get('kind')}, "
                          f"{str(recorded.get('fingerprint'))[:19]}) but {encoder.info['path']} "
                          f"({encoder.info['kind']}, {encoder.info['fingerprint'][:19]}) was given: use that one, or "
                          "build a new index")

"""Tokenizers: a thin layer over Hugging Face `tokenizers`, which does the real work (BPE, byte-level, training).

gptlab's own convention is small: `<|endoftext|>` ends a document and is the end-of-text token for generation, as in
GPT-2; every tokenizer gptlab trains has it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from gptlab.errors import GptlabError

EOS = "<|endoftext|>"


class Tokenizer:
    """Text <-> token ids, with the end-of-text id that generation stops on."""

    def __init__(self, backend: HFTokenizer) -> None:
        self.backend = backend

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises plain Exception subclasses with a message worth keeping
            raise GptlabError(f"cannot read tokenizer {path}: {str(e).splitlines()[0]}") from None

    @classmethod
    def from_vocab_merges(cls, vocab: str | os.PathLike[str], merges: str | os.PathLike[str]) -> Tokenizer:
        """GPT-2's original files: byte-level BPE from `vocab.json` and `merges.txt`."""
        try:
            bpe = models.BPE.from_file(str(vocab), str(merges))
        except Exception as e:
            raise GptlabError(f"cannot read {vocab} / {merges}: {str(e).splitlines()[0]}") from None
        tok = cls._byte_level(bpe)
        if tok.backend.token_to_id(EOS) is not None:
            tok.backend.add_special_tokens([EOS])
        return tok

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, special_tokens: Iterable[str] = ()) -> Tokenizer:
        """Train a GPT-2-style byte-level BPE: every byte is in the alphabet, so any UTF-8 text round-trips."""
        tok = cls._byte_level(models.BPE())
        specials = [EOS, *[s for s in special_tokens if s != EOS]]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.backend.train_from_iterator(texts, trainer)
        return tok

    @staticmethod
    def _byte_level(model: models.Model) -> Tokenizer:
        backend = HFTokenizer(model)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        return Tokenizer(backend)

    # -- use -----------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        return self.backend.token_to_id(EOS)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | os.PathLike[str]) -> None:
        self.backend.save(str(path))

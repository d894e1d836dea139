"""Tokenizers: a thin layer over Hugging Face `tokenizers`, which does the real work (BPE, byte-level, training).

gptlab's own convention is small: `<|endoftext|>` ends a document and is the end-of-text token for generation, as in
GPT-2; every tokenizer gptlab trains has it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

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

    @classmethod
    def train_char(cls, texts: Iterable[str], special_tokens: Iterable[str] = ()) -> Tokenizer:
        """One token per character seen in `texts`, plus the 256 bytes as fallback tokens, so that a character never
        seen still round-trips (as its UTF-8 bytes) instead of becoming an unknown token."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        specials = [EOS, *[s for s in special_tokens if s != EOS]]
        byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
        vocab = {tok: i for i, tok in enumerate([*specials, *byte_tokens, *sorted(chars)])}
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
        backend.normalizer = normalizers.Sequence([])  # keep the text exactly as it is
        backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        backend.add_special_tokens(specials)
        return Tokenizer(backend)

    def add_special_tokens(self, tokens: Iterable[str]) -> list[int]:
        """Add tokens that are never split (task tokens such as `<to-fr>`, chat roles); returns their ids. A model
        trained with this tokenizer must grow its embedding to `vocab_size` (`GPT.resize_vocab`)."""
        tokens = list(tokens)
        self.backend.add_special_tokens(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

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

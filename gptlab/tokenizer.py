"""Tokenizers: a thin layer over Hugging Face `tokenizers`, which does the real work (BPE, byte-level, training).

A tokenizer is more than its vocabulary: a model was trained with its own special tokens (a BOS that starts every
text, an EOS that ends it, end-of-turn markers such as `<|eot_id|>` or `<end_of_turn>`) and, for chat models, a chat
template. All of it is kept beside `tokenizer.json` in the shape Hugging Face folders use, so a folder reads the same
here and in transformers:

- `tokenizer.json`: the pipeline, its post-processor included (which is what adds a BOS, as `AutoTokenizer` does);
- `tokenizer_config.json`: the named special tokens (`bos_token`, `eos_token`, `pad_token`, `unk_token`);
- `generation_config.json`: the ids generation stops at (`eos_token_id`, one or a list);
- `chat_template.jinja`: the chat template, when the model has one.

gptlab's own convention is small: `<|endoftext|>` ends a document and is the end-of-text token for generation, as in
GPT-2; every tokenizer gptlab trains has it, and a folder with only a `tokenizer.json` is read that way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from gptlab.errors import GptlabError
from gptlab.files import atomic_write, atomic_write_text, read_json_object

EOS = "<|endoftext|>"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE = "chat_template.jinja"
TOKENIZER_FILES = (TOKENIZER, TOKENIZER_CONFIG, GENERATION_CONFIG, CHAT_TEMPLATE)
SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


class Tokenizer:
    """Text <-> token ids, with the special tokens, stop ids and chat template the model was trained with."""

    def __init__(self, backend: HFTokenizer, specials: Mapping[str, str | None] | None = None,
                 stop_ids: Sequence[int] | None = None, chat_template: str | None = None) -> None:
        self.backend = backend
        backend.no_padding()  # a tokenizer.json may carry padding or truncation for another use: never ours
        backend.no_truncation()
        if specials is None:  # gptlab's convention
            specials = {"eos_token": EOS} if backend.token_to_id(EOS) is not None else {}
        self.specials = {k: specials.get(k) for k in SPECIAL_NAMES}
        for name, token in self.specials.items():
            if token is not None and backend.token_to_id(token) is None:
                raise GptlabError(f"the tokenizer's {name} {token!r} is not in its vocabulary")
        self.generation_stops = [int(i) for i in stop_ids] if stop_ids else None
        vocab = self.vocab_size
        for i in self.generation_stops or ():
            if not 0 <= i < vocab:
                raise GptlabError(f"the stop token id {i} (generation_config.json eos_token_id) lies outside the "
                                  f"tokenizer's vocabulary of {vocab}")
        self._chat_template = chat_template

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        self._chat_template = template
        self.__dict__.pop("end_of_turn", None)

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """A bare `tokenizer.json`, read with gptlab's convention for its special tokens."""
        return cls(_read_backend(Path(path)))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str]) -> Tokenizer:
        """The tokenizer files of a folder (gptlab's or a Hugging Face model's, which have the same names).

        As transformers' `TokenizersBackend` reads such a folder: `tokenizer.json`'s post-processor decides what is
        added around a text (transformers ignores `add_bos_token` beside a `tokenizer.json`), and the named special
        tokens become special added tokens, so that they are never split."""
        folder = Path(folder)
        backend = _read_backend(folder / TOKENIZER)
        config = read_json_object(folder / TOKENIZER_CONFIG)
        older = read_json_object(folder / "special_tokens_map.json")  # where older folders name them
        generation = read_json_object(folder / GENERATION_CONFIG)
        if not config and not older:
            return cls(backend, None, stop_list(generation.get("eos_token_id")), _read_template(folder, config))
        specials = {name: _token_text(config.get(name, older.get(name))) for name in SPECIAL_NAMES}
        named = [t for t in specials.values() if t is not None]
        for name, token in specials.items():  # a named special token must exist before it can be added as one
            if token is not None and backend.token_to_id(token) is None:
                raise GptlabError(f"{folder / TOKENIZER_CONFIG} names {name} {token!r}, which {TOKENIZER} does not "
                                  "have")
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in named
                                    if t not in {a.content for a in backend.get_added_tokens_decoder().values()}])
        return cls(backend, specials, stop_list(generation.get("eos_token_id")), _read_template(folder, config))

    @classmethod
    def from_vocab_merges(cls, vocab: str | os.PathLike[str], merges: str | os.PathLike[str]) -> Tokenizer:
        """GPT-2's original files: byte-level BPE from `vocab.json` and `merges.txt`."""
        try:
            bpe = models.BPE.from_file(str(vocab), str(merges))
        except Exception as e:
            raise GptlabError(f"cannot read {vocab} / {merges}: {str(e).splitlines()[0]}") from None
        backend = _byte_level(bpe)
        if backend.token_to_id(EOS) is not None:
            backend.add_special_tokens([EOS])
        return cls(backend)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, special_tokens: Iterable[str] = ()) -> Tokenizer:
        """Train a GPT-2-style byte-level BPE: every byte is in the alphabet, so any UTF-8 text round-trips."""
        backend = _byte_level(models.BPE())
        specials = [EOS, *[s for s in special_tokens if s != EOS]]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator(texts, trainer)
        return cls(backend)

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
        return cls(backend)

    def add_special_tokens(self, tokens: Iterable[str]) -> list[int]:
        """Add tokens that are never split (task tokens such as `<to-fr>`, chat roles); returns their ids. A model
        trained with this tokenizer must grow its embedding to `vocab_size` (`GPT.resize_vocab`)."""
        tokens = list(tokens)
        self.backend.add_special_tokens(tokens)
        for cached in ("added", "affixes", "end_of_turn"):
            self.__dict__.pop(cached, None)
        return [self.backend.token_to_id(t) for t in tokens]

    # -- special tokens ------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _id(self, name: str) -> int | None:
        token = self.specials.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_id(self) -> int | None:
        """The token that ends a text (documents in `prepare`, completions in fine-tuning)."""
        return self._id("eos_token")

    @property
    def bos_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def pad_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Where generation stops: generation_config.json's eos_token_id (one or several), else the EOS token; the
        same ids transformers' `generate` stops at."""
        if self.generation_stops:
            return tuple(self.generation_stops)
        return () if self.eos_id is None else (self.eos_id,)

    @cached_property
    def added(self) -> dict[int, bool]:
        """Added tokens: id -> whether it is special."""
        return {i: t.special for i, t in self.backend.get_added_tokens_decoder().items()}

    @cached_property
    def byte_tokens(self) -> frozenset[int]:
        """The `<0x00>`..`<0xFF>` pieces of a byte-fallback BPE (SentencePiece-style, gptlab's character tokenizer):
        its decoder turns a run of them into text together, so a run is only text once it has ended."""
        if not getattr(self.backend.model, "byte_fallback", False):
            return frozenset()
        return frozenset(i for b in range(256) if (i := self.backend.token_to_id(f"<0x{b:02X}>")) is not None)

    @cached_property
    def affixes(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor puts before and after a text (a BOS, rarely an EOS)."""
        probe = "a b"
        bare = self.backend.encode(probe, add_special_tokens=False).ids
        full = self.backend.encode(probe, add_special_tokens=True).ids
        for start in range(len(full) - len(bare) + 1):
            if full[start: start + len(bare)] == bare:
                return full[:start], full[start + len(bare):]
        return [], []

    @property
    def prefix_ids(self) -> list[int]:
        """What starts every text the model reads (its BOS where it has one), as `AutoTokenizer` adds it."""
        return list(self.affixes[0])

    # -- text ----------------------------------------------------------------------------------------------------
    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text`; with `special` (the default, as in transformers) the post-processor adds what the
        model expects around a text, such as Llama's BOS. Pieces that are joined afterwards use `special=False`."""
        return self.backend.encode(text, add_special_tokens=special).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    # -- chat ----------------------------------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    tools: Sequence[Mapping] | None = None) -> str:
        """The conversation as text through the model's chat template (gptlab's own when it has none), equal to
        `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`."""
        from gptlab.chat import render

        return render(self.chat_template, messages, add_generation_prompt, self.specials, tools)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    tools: Sequence[Mapping] | None = None) -> list[int]:
        """Token ids of the rendered conversation, as `apply_chat_template(messages, tokenize=True)` gives them: the
        template writes the BOS itself, so nothing is added."""
        return self.encode(self.render_chat(messages, add_generation_prompt, tools), special=False)

    def chat_tokens(self, messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[bool]]:
        """Token ids of a whole conversation and, for each, whether it belongs to an assistant turn (the tokens chat
        fine-tuning scores). A token counts as the assistant's if any of its characters lie in an assistant turn."""
        from gptlab.chat import assistant_spans

        text, spans = assistant_spans(self.chat_template, messages, self.specials, self._shared_tokens)
        enc = self.backend.encode(text, add_special_tokens=False)
        mask = [any(start < e and end > s for s, e in spans) for start, end in enc.offsets]
        if not self.end_of_turn and self.eos_id is not None:  # a template without an end-of-turn token (gptlab's own)
            return enc.ids + [self.eos_id], mask + [True]
        return list(enc.ids), mask

    def _shared_tokens(self, a: str, b: str) -> int:
        """Characters of the tokens `a` and `b` share from the start: a cut between tokens, never inside one."""
        ea = self.backend.encode(a, add_special_tokens=False)
        eb = self.backend.encode(b, add_special_tokens=False)
        n = 0
        while n < min(len(ea.ids), len(eb.ids)) and ea.ids[n] == eb.ids[n]:
            n += 1
        return ea.offsets[n - 1][1] if n else 0

    @cached_property
    def end_of_turn(self) -> tuple[int, ...]:
        """The special token that closes an assistant turn under the chat template (`<|eot_id|>`, `<|im_end|>`,
        `<end_of_turn>`, Mistral's `</s>`), found by rendering one exchange; () when the template has none."""
        from gptlab.chat import render

        if not self.chat_template:
            return ()
        try:
            text = render(self.chat_template, [{"role": "user", "content": "PING"},
                                               {"role": "assistant", "content": "PONG"}], False, self.specials)
        except GptlabError:
            return ()
        if "PONG" not in text:
            return ()
        tail = self.encode(text[text.rindex("PONG") + 4:], special=False)
        return tuple(t for t in tail if self.added.get(t))[:1]

    def check_chat_template(self) -> None:
        """A chat template must parse and render a plain exchange: one clear error otherwise, found when a model is
        imported or served rather than at its first conversation."""
        if self.chat_template:
            try:
                self.render_chat([{"role": "user", "content": "Hello"}])
            except GptlabError as e:
                raise GptlabError(f"the model's chat template is broken: {e}") from None

    @property
    def chat_stop_ids(self) -> tuple[int, ...]:
        """Where an assistant turn ends: the stop ids and the template's end-of-turn token."""
        return tuple(dict.fromkeys([*self.stop_ids, *self.end_of_turn]))

    @property
    def chat_stop_strings(self) -> list[str]:
        """Stop strings for templates whose turns end without a token (gptlab's default)."""
        from gptlab.chat import DEFAULT_STOPS

        return [] if self.chat_template and self.end_of_turn else list(DEFAULT_STOPS)

    # -- files ---------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """The bare `tokenizer.json` (special tokens and template are in `save_folder`'s other files)."""
        self.backend.save(str(path))

    def config(self) -> dict[str, Any]:
        """`tokenizer_config.json`: transformers' generic class reads `tokenizer.json` as it is, so `AutoTokenizer`
        on a gptlab folder gives gptlab's ids."""
        return {"tokenizer_class": "PreTrainedTokenizerFast", **{k: v for k, v in self.specials.items() if v},
                "clean_up_tokenization_spaces": False}

    def generation_config(self) -> dict[str, Any]:
        stops = list(self.stop_ids)
        out: dict[str, Any] = {"bos_token_id": self.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops}
        if self.pad_id is not None:
            out["pad_token_id"] = self.pad_id
        return out

    def save_folder(self, folder: str | os.PathLike[str]) -> None:
        """Write the tokenizer files into `folder`, each atomically; a stale chat template is removed."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / TOKENIZER, self.save)
        atomic_write_text(folder / TOKENIZER_CONFIG, json.dumps(self.config(), indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(folder / GENERATION_CONFIG, json.dumps(self.generation_config(), indent=2) + "\n")
        if self.chat_template:
            atomic_write_text(folder / CHAT_TEMPLATE, self.chat_template)
        else:
            (folder / CHAT_TEMPLATE).unlink(missing_ok=True)


def _byte_level(model: models.Model) -> HFTokenizer:
    backend = HFTokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _read_backend(path: Path) -> HFTokenizer:
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception subclasses with a message worth keeping
        raise GptlabError(f"cannot read tokenizer {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken's {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise GptlabError(f"a special token must be a string, got {value!r}")
    return value


def stop_list(value: Any) -> list[int] | None:
    """eos_token_id as generation_config.json writes it (an id, or a list of them) -> a list."""
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise GptlabError(f"eos_token_id must be an id or a list of ids, got {value!r}")
    return values


def _read_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """`chat_template.jinja`, else tokenizer_config.json's `chat_template` (a text, or named templates of which the
    default is taken, as transformers does without tools)."""
    if (folder / CHAT_TEMPLATE).is_file():
        return (folder / CHAT_TEMPLATE).read_text(encoding="utf-8")
    template = config.get("chat_template")
    if (folder / "chat_template.json").is_file():
        template = read_json_object(folder / "chat_template.json").get("chat_template", template)
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    if template is not None and not isinstance(template, str):
        raise GptlabError(f"{folder}: the chat template must be a text, got {type(template).__name__}")
    return template

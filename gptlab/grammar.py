"""Constrained decoding: a grammar (a JSON schema, a tool call's shape) masks the tokens it does not allow.

The grammar engine is llguidance, the one behind llama.cpp's and vLLM's structured outputs. It was picked over
xgrammar, outlines-core and lm-format-enforcer because it installs here as one prebuilt wheel with no tie to a torch
version (xgrammar's wheels pin one), reads the tokenizer's own `tokenizer.json` (byte-level BPE and SentencePiece
byte fallback alike), compiles a JSON schema in milliseconds and computes the next token's mask in about a
millisecond (its Earley parser walks a token trie; lm-format-enforcer walks the vocabulary in Python), and it
supports lazy triggers, which let a tool call start anywhere in free text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import cached_property
from typing import Any

import torch

from gptlab.errors import GptlabError
from gptlab.tokenizer import Tokenizer


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise GptlabError("constrained decoding needs llguidance: pip install llguidance") from None
    return llguidance


def json_schema_grammar(schema: Mapping[str, Any]) -> str:
    """An llguidance grammar for JSON values that validate against `schema`, written compactly (no free whitespace,
    so that a model cannot spend its tokens on blanks)."""
    ll = _llguidance()
    try:
        return ll.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})
    except (ValueError, TypeError) as e:
        raise GptlabError(f"the JSON schema cannot be used: {e}") from None


def lark_grammar(lark: str) -> str:
    return _llguidance().LLMatcher.grammar_from_lark(lark)


class Grammars:
    """Compiles grammars for one tokenizer and vocabulary; `constraint` gives a row its own matcher."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_ids: Iterable[int]) -> None:
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, list(stop_ids)

    @cached_property
    def ll_tokenizer(self):  # -> llguidance.LLTokenizer, built once (about a second for a large vocabulary)
        ll = _llguidance()
        if not self.stop_ids:
            raise GptlabError("constrained decoding needs an end-of-text token to end on; this tokenizer has none")
        try:
            return ll.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.vocab_size, eos_token=self.stop_ids)
        except Exception as e:  # a tokenizer kind llguidance cannot read
            raise GptlabError(f"constrained decoding cannot use this tokenizer: {e}") from None

    def check(self, grammar: str) -> None:
        """A grammar that does not compile is the caller's mistake: one line saying why."""
        ll = _llguidance()
        error, messages = ll.LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        if error:
            raise GptlabError(messages[0] if messages else "the grammar does not compile")

    def constraint(self, grammar: str) -> Constraint:
        self.check(grammar)
        return Constraint(_llguidance().LLMatcher(self.ll_tokenizer, grammar, log_level=0), self.vocab_size)


class Constraint:
    """One row's grammar state: which tokens may come next, and whether the grammar is complete."""

    def __init__(self, matcher, vocab_size: int) -> None:
        self.matcher, self.vocab_size = matcher, vocab_size
        self.bits = torch.arange(8, dtype=torch.uint8)

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool: the tokens the grammar allows next (one bit per token, lowest bit first)."""
        packed = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)  # (ceil(V/8),)
        return ((packed[:, None] >> self.bits) & 1).flatten()[: self.vocab_size].bool()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (1, vocab) with the tokens the grammar forbids at -inf."""
        allowed = self.allowed().to(logits.device)
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, token: int) -> bool:
        """Take the chosen token; True once the grammar is complete (nothing but the end may follow)."""
        self.matcher.consume_token(token)
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error()

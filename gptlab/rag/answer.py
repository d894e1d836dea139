"""Answers with citations: retrieve passages, number them in a prompt, generate, and read back which ones the
answer cites ([1], [2, 3], [1][4]).

The model is anything with `generate(prompt, **sampling) -> str` (a base model) or `chat(messages, **sampling) ->
str` (a model with a chat template): a `gptlab.LLM`, or a small adapter over an OpenAI-compatible client.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError
from gptlab.rag.index import Hit, Index

DEFAULT_TEMPLATE = """\
Answer the question using only the numbered sources below. Cite each source you use by its number in brackets, \
as in [1] or [2]. If the sources do not hold the answer, say so.

{sources}

Question: {question}
Answer:"""
PLACES = ("{sources}", "{question}")
CITATION = re.compile(r"\[(\d+(?:\s*[,;]\s*\d+)*)\]")


@dataclass
class Answer:
    """The generated text, the passages it cites (in the order it first cites them), every passage the prompt held
    (numbered from 1), the citation numbers, and the prompt itself."""

    text: str
    sources: list[Hit]
    hits: list[Hit] = field(default_factory=list)
    citations: list[int] = field(default_factory=list)
    prompt: str = ""
    left_out: int = 0  # retrieved passages left out of the prompt to fit the model's context

    def to_json(self) -> dict[str, Any]:
        return {"answer": self.text, "citations": self.citations,
                "sources": [{"n": n, **h.to_json()} for n, h in zip(self.citations, self.sources)],
                "retrieved": [{"n": n, **h.to_json()} for n, h in enumerate(self.hits, 1)],
                "left_out": self.left_out}


def read_template(path: str | os.PathLike[str]) -> str:
    """A prompt template file: text with `{sources}` and `{question}` where they go."""
    try:
        template = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise GptlabError(f"cannot read the template {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise GptlabError(f"the template {path} is not UTF-8 text") from None
    check_template(template, str(path))
    return template


def check_template(template: str, where: str = "the template") -> None:
    missing = [p for p in PLACES if p not in template]
    if missing:
        raise GptlabError(f"{where} has no {' or '.join(missing)}: a template shows where the sources and the question "
                          "go")


def render(template: str, question: str, hits: list[Hit]) -> str:
    """The prompt: each passage as `[n] (source:lines)` and its text. Filled by replacement, not `str.format`, so
    the braces of code in a passage stay as they are."""
    sources = "\n\n".join(f"[{n}] ({h.where})\n{h.passage}" for n, h in enumerate(hits, 1))
    return template.replace("{question}", question).replace("{sources}", sources)


def citations(text: str, count: int) -> list[int]:
    """The source numbers `text` cites, once each, in the order it first cites them; numbers that name no source
    (0, or more than `count`) are left out."""
    found: list[int] = []
    for group in CITATION.finditer(text):
        for n in map(int, re.split(r"[,;]", group.group(1))):
            if 1 <= n <= count and n not in found:
                found.append(n)
    return found


def _uses_chat(llm: Any) -> bool:
    """A model with a chat template is asked as a chat; one without (or an object with only `chat`) as text."""
    if not hasattr(llm, "generate"):
        return True
    return bool(getattr(getattr(llm, "tokenizer", None), "chat_template", None)) and hasattr(llm, "chat")


def _prompt_tokens(llm: Any, prompt: str, chat: bool) -> int | None:
    """How many tokens the prompt is for a gptlab model (None for a model that does not say)."""
    tokenizer, engine = getattr(llm, "tokenizer", None), getattr(llm, "engine", None)
    if tokenizer is None or engine is None:
        return None
    if chat:
        return len(tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True))
    return len(engine.encode(prompt))


def fit(llm: Any, template: str, question: str, hits: list[Hit], chat: bool, max_new_tokens: int) -> list[Hit]:
    """The best passages whose prompt leaves room for the answer in a gptlab model's context: the lowest ranked are
    left out first, and the best one keeps only the start that fits if even it alone does not."""
    context = getattr(getattr(llm, "engine", None), "context", None)
    tokens = lambda hs: _prompt_tokens(llm, render(template, question, hs), chat) or 0
    if context is None or _prompt_tokens(llm, render(template, question, hits), chat) is None:
        return hits
    budget = context - min(max_new_tokens, context // 2)
    hits = list(hits)
    while len(hits) > 1 and tokens(hits) > budget:
        hits.pop()
    if hits and tokens(hits) > budget:
        best = hits[0]
        start = lambda n: [replace(best, passage=best.passage[:n])]
        low, high = 0, len(best.passage)  # the longest start of the passage that fits
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if tokens(start(mid)) <= budget else (low, mid - 1)
        hits = start(low)
    if tokens(hits) > budget:
        raise GptlabError(f"the question does not fit the model's context of {context} tokens with room for the "
                          "answer; ask a shorter one or lower --max-new-tokens")
    return hits


def ask(index: Index, llm: Any, question: str, k: int = 4, mode: str | None = None, template: str | None = None,
        max_new_tokens: int = 256, temperature: float = 0.0, chat: bool | None = None, **sampling: Any) -> Answer:
    """Retrieve `k` passages for `question`, generate an answer from a prompt that numbers them (`template`: a
    text with `{sources}` and `{question}`, default DEFAULT_TEMPLATE), and return it with the passages it cites."""
    if not isinstance(question, str) or not question.strip():
        raise GptlabError("the question is empty")
    template = DEFAULT_TEMPLATE if template is None else template
    check_template(template)
    chat = _uses_chat(llm) if chat is None else chat
    found = index.search(question, k, mode)
    hits = fit(llm, template, question, found, chat, max_new_tokens)
    prompt = render(template, question, hits)
    kwargs = {"max_new_tokens": max_new_tokens, "temperature": temperature, **sampling}
    if chat:
        text = llm.chat([{"role": "user", "content": prompt}], **kwargs)
    else:
        text = llm.generate(prompt, stop=["\nQuestion:"], **kwargs)
    text = str(text).strip()
    cited = citations(text, len(hits))
    return Answer(text, [hits[n - 1] for n in cited], hits, cited, prompt, len(found) - len(hits))

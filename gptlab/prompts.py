"""Hard prompts: templates, zero-shot and few-shot prompt builders (chat templates are in `gptlab/chat.py`).

A template is a prompt with `{input}` where the example's input goes; the model's continuation is its answer.
The three translation templates are the course's own, with the target language as a parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

from gptlab.data.tasks import Example
from gptlab.errors import GptlabError

TEMPLATES = {
    "translate-sentence": "Translate the English sentence '{input}' into {lang}:",
    "translate-pipe": "English: '{input}' | {lang}:",
    "translate-arrow": "From English to {lang}: '{input}' ->",
    "summarize": "{input} <summarize>",
    "to-fr": "{input} <to-fr>",
    "plain": "{input}",
}

def resolve_template(name_or_text: str) -> str:
    """A template by name, or a template text of the user's own (it must contain `{input}`)."""
    template = TEMPLATES.get(name_or_text, name_or_text)
    if "{input}" not in template:
        raise GptlabError(f"template {name_or_text!r} is neither a known name ({', '.join(TEMPLATES)}) nor a text "
                          "with {input}")
    return template


def fill(template: str, text: str, lang: str = "French") -> str:
    return template.replace("{input}", text).replace("{lang}", lang)


def source_of(example: Example, task_tokens: Sequence[str] = ("<to-fr>", "<summarize>")) -> str:
    """The input an example's prompt was made from: its prompt without a trailing task token."""
    prompt = example.prompt
    for token in task_tokens:
        if prompt.endswith(token):
            return prompt[: -len(token)].rstrip()
    return prompt


def build_prompt(template: str, query: str, shots: Sequence[Example] = (), lang: str = "French") -> str:
    """Zero-shot (no shots) or few-shot: each shot filled in with its answer, one per line, then the query."""
    lines = [fill(template, source_of(s), lang) + " " + s.completion.strip() for s in shots]
    return "\n".join([*lines, fill(template, query, lang)])

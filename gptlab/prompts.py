"""Hard prompts: templates, zero-shot and few-shot prompt builders (chat templates are in `gptlab/chat.py`).

A template is a prompt with `{input}` where the example's input goes; the model's continuation is its answer. It may
end with `{answer}` to say how an answer joins the prompt (after a space if one stands before it, else directly); a
template without it takes its answer after one space, unless it ends with whitespace.
The three translation templates are the course's own, with the target language as a parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
ANSWER = "{answer}"


def _exists(text: str) -> bool:
    try:
        return bool(text) and Path(text).exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: text, not a path
        return False


def read_template_file(path: Path) -> str:
    """A template file's text (one trailing newline dropped); a folder stands for its template.txt, which
    `gptlab autoprompt --out` writes."""
    file = path / "template.txt" if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        raise GptlabError(f"{path} is a folder without template.txt (the file `gptlab autoprompt --out` writes)")
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        raise GptlabError(f"cannot read template {file}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise GptlabError(f"template {file} is not UTF-8 text (byte {e.start})") from None
    text = text[:-1] if text.endswith("\n") else text
    text = text[:-1] if text.endswith("\r") else text
    if "{input}" not in text:
        raise GptlabError(f"template file {file} has no {{input}} (where each example's input goes)")
    return text


def resolve_template(name_or_text: str) -> str:
    """A template by name, a template file (or a folder holding template.txt), or a template text of the user's own
    (it must contain `{input}`)."""
    source = repr(name_or_text)
    if name_or_text not in TEMPLATES and "{input}" not in name_or_text and _exists(name_or_text):
        template, source = read_template_file(Path(name_or_text)), f"in {name_or_text}"
    else:
        template = TEMPLATES.get(name_or_text, name_or_text)
        if "{input}" not in template:
            raise GptlabError(f"template {name_or_text!r} is neither a known name ({', '.join(TEMPLATES)}), a "
                              "template file, nor a text with {input}")
    if "[T]" in template:
        raise GptlabError(f"template {source} has trigger slots [T]: find their tokens with `gptlab autoprompt "
                          "--template ... --out DIR`, then pass DIR/template.txt")
    split_answer(template)
    return template


def split_answer(template: str) -> tuple[str, str]:
    """(the prompt template, what joins it to an answer: " " or "")."""
    if ANSWER in template:
        if template.count(ANSWER) > 1 or not template.rstrip().endswith(ANSWER):
            raise GptlabError(f"template {template!r}: {ANSWER} may only end the template (where the answer goes)")
        prompt = template.rstrip()[: -len(ANSWER)]
        return (prompt.rstrip(), " ") if prompt[-1:].isspace() else (prompt, "")
    return template, "" if template[-1:].isspace() else " "


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
    template, sep = split_answer(template)
    lines = [fill(template, source_of(s), lang) + sep + s.completion.strip() for s in shots]
    return "\n".join([*lines, fill(template, query, lang)])

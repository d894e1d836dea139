"""Chat templates: a conversation as the text a model was trained on, rendered as Hugging Face renders it.

A model's chat template is Jinja that ships with its tokenizer (`chat_template.jinja`, or `chat_template` in
`tokenizer_config.json`). `render` runs it in the same sandboxed environment transformers' `apply_chat_template`
builds (trim_blocks, lstrip_blocks, loop controls, its `tojson`, `raise_exception`, `strftime_now`, the special
tokens as variables), so the text, and so the token ids, are the same. A template is data from the hub: it runs
sandboxed and never sees anything but the messages.

`assistant_spans` finds where each assistant turn lies in a rendered conversation, by rendering it turn by turn,
which is what chat fine-tuning needs to score those turns only, with any template.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from gptlab.errors import GptlabError

# gptlab's own template, for models that come without one: a role marker line, then the message.
DEFAULT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DEFAULT_STOPS = ["<|user|>", "<|system|>"]  # where an assistant turn ends under the default template (no token)


@lru_cache(maxsize=16)
def compile_template(template: str):  # -> jinja2.Template
    """The template compiled in transformers' environment; a template that does not parse is one clear error."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (templates that mark assistant text for masking): rendered as is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise GptlabError(f"the chat template does not parse (line {e.lineno}: {e.message})") from None


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Messages as plain dicts with a string role; keys whose value is None dropped, as transformers drops them."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise GptlabError("a conversation is a non-empty list of {role, content} messages")
    out = []
    for m in messages:
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise GptlabError(f"a chat message must be an object with a string role, got {m!r}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def render(template: str | None, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
           specials: Mapping[str, str | None] | None = None, tools: Sequence[Mapping] | None = None,
           **extra: Any) -> str:
    """The conversation as text, as `tokenizer.apply_chat_template(messages, tokenize=False, ...)` gives it.
    `specials` are the tokenizer's named special tokens (bos_token, eos_token, ...), visible to the template."""
    import jinja2

    compiled = compile_template(template or DEFAULT_TEMPLATE)
    names = {k: v for k, v in (specials or {}).items() if v is not None}
    try:
        return compiled.render(messages=check_messages(messages), tools=list(tools) if tools else None,
                               documents=None, add_generation_prompt=add_generation_prompt, **names, **extra)
    except jinja2.TemplateError as e:
        raise GptlabError(f"the chat template cannot render this conversation: {e}") from None
    except Exception as e:  # raised inside the template's own code (a division by zero, a wrong type, ...)
        raise GptlabError(f"the chat template cannot render this conversation: {type(e).__name__}: {e}") from None


def common_prefix(a: str, b: str) -> int:
    """Characters that `a` and `b` share from the start."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def assistant_spans(template: str | None, messages: Sequence[Mapping[str, Any]],
                    specials: Mapping[str, str | None] | None = None,
                    shared: Callable[[str, str], int] = common_prefix) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns: each from where the generation
    prompt ends to where the turn's own text ends (its end-of-turn marker included), found by rendering the turns one
    by one. Where a template closes the conversation with more than a turn's end (Phi-3 adds an EOS after the last
    turn), the turn ends where what follows it, another turn or the end, no longer agree: `shared(a, b)`, which the
    tokenizer gives so that the cut falls between tokens. A template that renders earlier turns differently once later
    ones follow (one that drops past reasoning, say) gets its last assistant turn only."""
    messages = check_messages(messages)
    full = render(template, messages, add_generation_prompt=False, specials=specials)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise GptlabError("the conversation has no assistant message to learn from")

    def following(i: int) -> str:
        if i < len(messages) - 1:
            return full
        try:  # the last turn: as it renders with a user turn after it
            return render(template, [*messages, {"role": "user", "content": "PING"}], False, specials)
        except GptlabError:
            return full

    def span(i: int) -> tuple[int, int] | None:
        before = render(template, messages[:i], add_generation_prompt=True, specials=specials) if i else ""
        turn = full if i == len(messages) - 1 else render(template, messages[: i + 1], add_generation_prompt=False,
                                                          specials=specials)
        after = following(i)
        end = len(turn) if after.startswith(turn) else shared(turn, after)
        ok = full[:end] == turn[:end] and turn[:end].startswith(before) and end > len(before)
        return (len(before), end) if ok else None

    spans = [span(i) for i in turns]
    if any(s is None for s in spans):
        spans = [span(turns[-1])]
        if spans[0] is None:
            raise GptlabError("the chat template renders a conversation differently from its turns one by one; "
                              "cannot tell which tokens are the assistant's")
    return full, spans  # type: ignore[return-value]

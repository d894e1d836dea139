"""OpenAI-style tool calls on a model of text: the tools shown in the prompt, a call's shape as a grammar, and the
calls read back from the generated text.

A model calls tools in the format its chat template teaches: Qwen2.5/3, Hermes and SmolLM3 write
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; Llama 3.1-3.3 write a bare `{"name": ..., "parameters":
{...}}`. A template that renders `tools` itself gets them as transformers passes them (`apply_chat_template(...,
tools=...)`); gptlab's own template, and any other that ignores them, gets them in a system message that asks for
the `<tool_call>` format. Decoding is constrained to that format: with `tool_choice` "required" or a named function
the answer is one or more calls whose arguments follow each tool's JSON schema; with "auto" the text is free until
the model starts a call, and from there the call is held to the schema (llguidance's lazy trigger).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gptlab.grammar import lark_grammar
from gptlab.tokenizer import Tokenizer


@dataclass(frozen=True)
class CallFormat:
    begin: str  # what comes before each call's JSON
    end: str  # and after it
    arguments: str  # the key of the arguments object

    @property
    def bare(self) -> bool:
        return not self.begin


HERMES = CallFormat("<tool_call>\n", "\n</tool_call>", "arguments")
LLAMA3 = CallFormat("", "", "parameters")


def call_format(template: str | None) -> CallFormat:
    """The format the chat template teaches its model (Hermes-style `<tool_call>` where it teaches none)."""
    if template and "<tool_call>" not in template and '"parameters": dictionary of argument name' in template:
        return LLAMA3
    return HERMES


def renders_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template  # type: ignore[operator]


def tool_prompt(tools: Sequence[Mapping[str, Any]], fmt: CallFormat) -> str:
    """The system text that offers `tools` to a model whose template does not render them."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    example = f'{fmt.begin}{{"name": <function-name>, "{fmt.arguments}": <args-json-object>}}{fmt.end}'
    return (f"You may call one or more functions to assist with the user query. The functions:\n{listing}\n"
            f"To call a function, reply with a JSON object in this form, one per call:\n{example}")


def prompt_messages(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]],
                    template: str | None) -> list[dict[str, Any]]:
    """OpenAI messages as the chat template reads them: an assistant's calls with their arguments as objects
    (transformers' convention); for a template that does not render tools, the tools in the system message and
    earlier calls written out in the model's format."""
    fmt, native = call_format(template), renders_tools(template)
    out: list[dict[str, Any]] = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if calls:
            parsed = [{"type": "function", "id": c.get("id"), "function": {
                "name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}} for c in calls]
            if native:
                m["tool_calls"] = parsed
            else:
                written = "\n".join(fmt.begin + json.dumps({"name": c["function"]["name"], fmt.arguments:
                                                            c["function"]["arguments"]}) + fmt.end for c in parsed)
                m["content"] = ((m.get("content") or "") + "\n" + written).strip("\n")
        out.append(m)
    if tools and not native:
        text = tool_prompt(tools, fmt)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{text}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def _arguments(arguments: Any) -> Any:
    """OpenAI sends a call's arguments as a JSON string; templates read an object."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def closed(schema: Any) -> Any:
    """The schema with every object that lists its properties closed to others, unless it says otherwise (as
    OpenAI's strict mode has them): a function takes the arguments it names, and a model held to the schema should
    not spend its tokens inventing more."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def call_schema(tools: Sequence[Mapping[str, Any]], fmt: CallFormat) -> dict[str, Any]:
    """The JSON schema of one call to any of `tools`."""
    options = [{"type": "object", "properties": {
        "name": {"const": t["function"]["name"]},
        fmt.arguments: closed(t["function"].get("parameters") or {"type": "object", "properties": {}})},
        "required": ["name", fmt.arguments], "additionalProperties": False} for t in tools]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": {"whitespace_flexible": False}}  # compact JSON: no tokens spent on blanks


def _literal(text: str, tokenizer: Tokenizer) -> str:
    """A grammar literal; a special token (`<tool_call>` in some vocabularies) is named as one, so that the model
    writes it as the one token it learned."""
    ids = tokenizer.encode(text, special=False)
    if len(ids) == 1 and tokenizer.added.get(ids[0]) and text.startswith("<") and text.endswith(">"):
        return text
    return json.dumps(text)


def call_grammar(tools: Sequence[Mapping[str, Any]], fmt: CallFormat, choice: str, tokenizer: Tokenizer,
                 parallel: bool = True) -> str:
    """The grammar of the answer: calls only ("required", or one named function), or free text in which a call may
    begin ("auto")."""
    schema = json.dumps(call_schema(tools, fmt))
    head = fmt.begin.rstrip("\n")
    begin = " ".join(x for x in (_literal(head, tokenizer) if head else "", json.dumps("\n") if
                                 fmt.begin.endswith("\n") else "") if x)
    tail = fmt.end.lstrip("\n")
    end = " ".join(x for x in (json.dumps("\n") if fmt.end.startswith("\n") else "",
                               _literal(tail, tokenizer) if tail else "") if x)
    call = f"call: {begin} %json {schema} {end}"
    more = ' ("\\n" call)*' if parallel else ""
    if choice != "auto":
        return lark_grammar(f"%llguidance {{}}\nstart: call{more}\n{call}\n")
    if fmt.bare:  # a bare JSON call: text that does not start with "{" is text
        return lark_grammar(f"%llguidance {{}}\nstart: TEXT | call{more}\nTEXT: /[^{{](.|\\n)*/\n{call}\n")
    trigger = _literal(head, tokenizer)
    lazy = f"trig[lazy]: TEXT {trigger}" if trigger.startswith('"') else f"trig: TEXT {trigger}"
    rest = " ".join(x for x in (json.dumps("\n") if fmt.begin.endswith("\n") else "",) if x)
    return lark_grammar(f"%llguidance {{}}\nstart: (tagged)* TEXT\nTEXT: /(.|\\n)*/\n{lazy}\n"
                        f"tagged: trig {rest} %json {schema} {end}\n")


def parse_calls(text: str, fmt: CallFormat, tools: Sequence[Mapping[str, Any]]) -> tuple[str | None, list[dict]]:
    """The text before the first call (None when empty) and the calls, in OpenAI's shape. A piece that is not a
    well-formed call to one of `tools` stays text; a last call cut off by the token limit is dropped."""
    names = {t["function"]["name"] for t in tools}
    if fmt.bare:
        stripped = text.strip()
        pieces = [p for p in stripped.split("\n") if p.strip()] if stripped.startswith("{") else []
        found = [_call(p, fmt, names) for p in pieces]
        whole = next((i for i, f in enumerate(found) if f is None), len(found))  # calls before the first non-call
        if whole and whole >= len(found) - 1:  # all calls, the last perhaps cut off
            return None, found[:whole]  # type: ignore[return-value]
        return text or None, []
    begin, end = fmt.begin.strip(), fmt.end.strip()
    start = text.find(begin)
    if start < 0:
        return text or None, []
    content, rest, calls = text[:start], text[start:], []
    while (open_ := rest.find(begin)) >= 0:
        close = rest.find(end, open_)
        if close < 0:
            break  # cut off before its end
        call = _call(rest[open_ + len(begin): close].strip(), fmt, names)
        if call is None:
            return text or None, []  # not a call after all: all of it is text
        calls.append(call)
        rest = rest[close + len(end):]
    if not calls:
        return text or None, []
    return content.strip() or None, calls


def _call(body: str, fmt: CallFormat, names: set[str]) -> dict[str, Any] | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get(fmt.arguments, obj.get("arguments", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}

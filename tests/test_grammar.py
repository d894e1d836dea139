"""Constrained decoding (llguidance) and tool-call formats, on gptlab's own tokenizer and random logits."""

from __future__ import annotations

import json

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.grammar import Grammars, json_schema_grammar
from gptlab.toolcall import HERMES, LLAMA3, call_format, call_grammar, closed, parse_calls, prompt_messages

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}, "tag": {"enum": ["a", "b"]}},
          "required": ["n", "ok", "tag"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}]


@pytest.fixture(scope="module")
def grammars(tokenizer) -> Grammars:
    return Grammars(tokenizer, tokenizer.vocab_size + 7, [tokenizer.eos_id])  # a model vocabulary padded past it


def _decode(grammars, tokenizer, grammar: str, seed: int, prefix: list[int] = (), limit: int = 300) -> str:
    """Sample from random logits under the grammar until it is complete or the end token is chosen."""
    c = grammars.constraint(grammar)
    for t in prefix:
        assert not c.advance(t)
    ids, g = list(prefix), torch.Generator().manual_seed(seed)
    for _ in range(limit):
        logits = c.mask(torch.randn(1, grammars.vocab_size, generator=g))
        t = int(torch.multinomial(logits.softmax(-1), 1, generator=g))
        if t == tokenizer.eos_id:
            break
        ids.append(t)
        if c.advance(t):
            break
    assert not c.error, c.error
    return tokenizer.decode(ids)


def test_a_schema_holds_every_sample_and_padding_tokens_are_never_allowed(grammars, tokenizer):
    grammar = json_schema_grammar(SCHEMA)
    for seed in range(5):
        value = json.loads(_decode(grammars, tokenizer, grammar, seed))
        assert set(value) == {"n", "ok", "tag"} and 0 <= value["n"] <= 99 and value["tag"] in ("a", "b")
    allowed = grammars.constraint(grammar).allowed()
    assert allowed.shape == (grammars.vocab_size,) and not allowed[tokenizer.vocab_size:].any()


def test_a_schema_that_does_not_compile_is_one_line(grammars):
    with pytest.raises(GptlabError, match="does not exist"):
        grammars.constraint(json_schema_grammar({"$ref": "#/definitions/nothing"}))


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3])
def test_a_required_call_is_a_call_with_valid_arguments(grammars, tokenizer, fmt):
    text = _decode(grammars, tokenizer, call_grammar(TOOLS, fmt, "required", tokenizer, parallel=False), 0)
    content, (call,) = parse_calls(text, fmt, TOOLS)
    assert content is None and call["function"]["name"] == "get_time"
    assert json.loads(call["function"]["arguments"]) in ({"zone": "UTC"}, {"zone": "CET"})


def test_auto_leaves_text_free_until_a_call_starts_then_holds_it_to_the_schema(grammars, tokenizer):
    grammar = call_grammar(TOOLS, HERMES, "auto", tokenizer)
    free = grammars.constraint(grammar).allowed()
    whole = [i for i in range(tokenizer.vocab_size) if "\ufffd" not in tokenizer.decode([i])]
    assert free[whole].all()  # before a call begins any text may come (only bytes that cannot start UTF-8 wait)
    prefix = tokenizer.encode("Let me check. <tool_call>\n", special=False)
    c = grammars.constraint(grammar)
    for t in prefix:
        c.advance(t)
    after = c.allowed()
    assert after.sum() < free.sum() / 4  # inside the call, only JSON that can become a call
    text = _decode(grammars, tokenizer, grammar, 1, prefix=prefix)
    content, calls = parse_calls(text, HERMES, TOOLS)
    assert content == "Let me check." and calls and calls[0]["function"]["name"] == "get_time"


def test_parse_calls_keeps_text_that_is_not_a_call_and_drops_a_call_cut_short():
    call = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    assert parse_calls("plain words", HERMES, TOOLS) == ("plain words", [])
    content, calls = parse_calls(f"{call}\n<tool_call>\n{{\"name\": \"get_t", HERMES, TOOLS)
    assert content is None and len(calls) == 1 and calls[0]["id"].startswith("call_")
    bad = '<tool_call>\n{"name": "other", "arguments": {}}\n</tool_call>'
    assert parse_calls(bad, HERMES, TOOLS) == (bad, [])
    assert parse_calls('{"name": "get_time", "parameters": {"zone": "CET"}}', LLAMA3, TOOLS)[1][0]["function"][
        "arguments"] == '{"zone": "CET"}'
    assert parse_calls("{not json", LLAMA3, TOOLS) == ("{not json", [])


def test_formats_prompts_and_closed_schemas():
    llama3 = 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}'
    assert call_format(llama3) is LLAMA3 and call_format(None) is HERMES and call_format("<tool_call>") is HERMES
    history = [{"role": "user", "content": "time?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "12:00"}]
    plain = prompt_messages(history, TOOLS, None)  # a template that does not render tools
    assert plain[0]["role"] == "system" and "get_time" in plain[0]["content"] and "<tool_call>" in plain[0]["content"]
    assert '"zone": "UTC"' in plain[2]["content"] and "tool_calls" not in plain[2]
    native = prompt_messages(history, TOOLS, "{{ tools }}")
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"zone": "UTC"} and native[0]["role"] == "user"
    assert closed({"type": "object", "properties": {"a": {"type": "object", "properties": {}}}}) == {
        "type": "object", "additionalProperties": False,
        "properties": {"a": {"type": "object", "properties": {}, "additionalProperties": False}}}

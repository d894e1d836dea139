"""Agents: a model that calls tools until it can answer, in two ways.

- ReAct (Yao et al.): the model writes `Thought:` and `Action: tool[input]` lines; gptlab runs the tool and writes
  its result as an `Observation:` line; the loop ends at `Action: Finish[answer]` or at the step limit. Works on
  any model of text (generation stops before the model would write an observation itself).
- Tool calls: OpenAI's `tools` / `tool_calls` through `/v1/chat/completions` (gptlab's server, whose constrained
  decoding holds each call's arguments to the tool's schema, or any OpenAI-compatible one): each call's result goes
  back as a `role: tool` message, until the model answers in text.

Both keep a transcript (every thought, call, argument and result) and stop at `max_steps`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from gptlab.errors import GptlabError
from gptlab.tools import Tool

REACT = """Answer the question. Think step by step, and use the tools when they help:
{tools}
Use this format:
Question: the question to answer
Thought: what to do next
Action: one of [{names}, Finish] followed by its input in brackets, e.g. {example}
Observation: the result of the action
... (Thought, Action and Observation repeat as often as needed)
Thought: I now know the answer
Action: Finish[the answer]

Question: {question}
"""
ACTION = re.compile(r"Action\s*:\s*([A-Za-z_][\w-]*)\s*\[(.*)\]", re.DOTALL)


@dataclass
class Step:
    thought: str
    action: str  # a tool's name, "Finish", or "" where the model wrote no action
    input: str | dict[str, Any]
    observation: str | None = None


@dataclass
class Transcript:
    question: str
    steps: list[Step] = field(default_factory=list)
    answer: str | None = None
    stopped: str = "step_limit"  # "finish" (an answer), "step_limit", or "no_action" (text with no action)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def react_prompt(question: str, tools: Sequence[Tool]) -> str:
    listing = "\n".join(f"- {t.name}: {t.description}" for t in tools) or "- (none)"
    names = ", ".join(t.name for t in tools)
    example = f"{tools[0].name}[...]" if tools else "Finish[the answer]"
    return REACT.format(tools=listing, names=names, example=example, question=question.strip())


def parse_step(text: str) -> tuple[str, str, str]:
    """(thought, action, input) from what the model wrote after `Thought:`; the action's input runs to its last
    closing bracket (it may hold brackets of its own, as code does)."""
    match = ACTION.search(text)
    if not match:
        return text.strip(), "", ""
    thought = text[: match.start()].strip()
    return thought, match.group(1), match.group(2).strip()


def react(generate: Callable[[str, str, Sequence[str]], str], question: str, tools: Sequence[Tool],
          max_steps: int = 6) -> Transcript:
    """Run the ReAct loop. `generate(prompt, scratch, stop)` continues the instructions and question `prompt`
    followed by the steps so far `scratch`, until a stop string."""
    if max_steps < 1:
        raise GptlabError(f"max_steps must be at least 1, got {max_steps}")
    by_name = {t.name.lower(): t for t in tools}
    transcript = Transcript(question)
    prompt, scratch = react_prompt(question, tools), ""
    for _ in range(max_steps):
        scratch += "Thought:"
        text = generate(prompt, scratch, ["\nObservation:", "\nQuestion:"])
        thought, action, arg = parse_step(text)
        scratch += f" {text.strip()}\n"
        if action.lower() == "finish":
            transcript.steps.append(Step(thought, "Finish", arg))
            transcript.answer, transcript.stopped = arg, "finish"
            return transcript
        if not action:
            transcript.steps.append(Step(thought, "", ""))
            transcript.answer, transcript.stopped = thought or None, "no_action"
            return transcript
        tool = by_name.get(action.lower())
        observation = tool(arg) if tool else f"there is no tool {action!r}; the tools are {', '.join(by_name)}"
        observation = " ".join(observation.split("\n"))[:2000]
        transcript.steps.append(Step(thought, action, arg, observation))
        scratch += f"Observation: {observation}\n"
    return transcript


def llm_generator(llm: Any, max_new_tokens: int = 128, temperature: float = 0.0, seed: int | None = 0
                  ) -> Callable[[str, str, Sequence[str]], str]:
    """`generate` for `react` on a gptlab LLM: a chat model reads the instructions as a user turn and writes the
    scratchpad as its answer; a base model continues the text as it is."""
    tok, engine = llm.tokenizer, llm.engine
    from gptlab.generate import SamplingParams

    params = SamplingParams(temperature=temperature, seed=seed)

    def generate(prompt: str, scratch: str, stop: Sequence[str]) -> str:
        if tok.chat_template:
            ids = tok.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True) + \
                tok.encode(scratch, special=False)
            stops, ends = [*stop, *tok.chat_stop_strings], tok.chat_stop_ids
        else:
            ids, stops, ends = engine.encode(prompt + scratch), list(stop), None
        room = engine.context - max_new_tokens
        if len(ids) > room:
            raise GptlabError(f"the agent's transcript ({len(ids)} tokens) no longer fits the model's context "
                              f"({engine.context} tokens, {max_new_tokens} of them for the next step)")
        return engine.complete([ids], max_new_tokens, params, stops, ends)[0].text

    return generate


def tool_agent(client: Any, model: str, question: str, tools: Sequence[Tool], max_steps: int = 6,
               max_tokens: int = 256, temperature: float = 0.0, system: str | None = None) -> Transcript:
    """Run the tool-call loop against an OpenAI-compatible chat endpoint (`client` is an `openai.OpenAI`)."""
    by_name = {t.name: t for t in tools}
    messages: list[dict[str, Any]] = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": question}]
    transcript = Transcript(question)
    for _ in range(max_steps):
        reply = client.chat.completions.create(model=model, messages=messages, tools=[t.spec() for t in tools],
                                               tool_choice="auto", max_tokens=max_tokens, temperature=temperature)
        message = reply.choices[0].message
        if not message.tool_calls:
            transcript.answer, transcript.stopped = message.content or "", "finish"
            transcript.steps.append(Step(message.content or "", "Finish", message.content or ""))
            return transcript
        messages.append({"role": "assistant", "content": message.content, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                         "arguments": c.function.arguments}}
            for c in message.tool_calls]})
        for call in message.tool_calls:
            tool = by_name.get(call.function.name)
            try:
                arguments = json.loads(call.function.arguments or "{}")
            except json.JSONDecodeError as e:
                arguments, result = call.function.arguments, f"error: the arguments are not JSON ({e})"
            else:
                result = tool(arguments) if tool else f"error: there is no tool {call.function.name!r}"
            transcript.steps.append(Step(message.content or "", call.function.name, arguments, result))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return transcript


def local_client(llm: Any, name: str = "local") -> Any:
    """An `openai.OpenAI` client on gptlab's own server for `llm`, in this process (no socket, no port)."""
    import openai
    from fastapi.testclient import TestClient

    from gptlab.serve import Server, create_app

    http = TestClient(create_app(Server(llm, name)), base_url="http://local")
    return openai.OpenAI(base_url="http://local/v1", api_key="local", http_client=http, max_retries=0)

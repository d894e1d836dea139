"""Prompting strategies for question answering, scored side by side: zero-shot, few-shot, chain of thought and
self-consistency.

- zero-shot: the question alone (`Q: ...` / `A:`).
- few-shot: `shots` solved examples first (Brown et al.), each question with its answer.
- cot: the solved examples show their reasoning and end "The answer is X." (Wei et al.'s chain of thought with
  worked examples); the model writes its own reasoning before its answer.
- self-consistency: `samples` chains of thought sampled at a temperature, and a majority vote over the answers
  extracted from them (Wang et al.); ties go to the answer reached first.
- dsp: demonstrate-search-predict (Khattab et al.): passages retrieved for the question from an index are put
  before it (search), and the demonstrations are bootstrapped: the training examples the same pipeline answers
  correctly, each with the passages retrieved for it, become the examples shown (demonstrate), then the model
  answers (predict).

Answers are read from the generated text by one rule (`extract`): "The answer is X" where the text says it, else
the last number for a numeric reference, else the first line; then compared after `normalize` (case, spaces,
trailing punctuation, thousands separators). A chat model gets the same turns through its chat template (each
example a user question and an assistant answer).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gptlab.api import LLM
from gptlab.data.tasks import Example
from gptlab.errors import GptlabError
from gptlab.generate import SamplingParams


@dataclass(frozen=True)
class Strategy:
    name: str
    shots: int = 0  # solved examples before the question
    reasoning: bool = False  # the examples show their reasoning (chain of thought)
    samples: int = 1  # chains sampled and voted on
    temperature: float = 0.0
    retrieval: bool = False  # passages from an index before each question; bootstrapped demonstrations (DSP)


STRATEGIES = {
    "zero-shot": Strategy("zero-shot"),
    "few-shot": Strategy("few-shot", shots=3),
    "cot": Strategy("cot", shots=3, reasoning=True),
    "self-consistency": Strategy("self-consistency", shots=3, reasoning=True, samples=5, temperature=0.7),
    "dsp": Strategy("dsp", shots=3, retrieval=True),
}
ANSWER_IS = re.compile(r"answer is[:\s]*\$?\s*(.+?)\s*(?:\.(?:\s|$)|\n|$)", re.IGNORECASE)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def strategy(name: str, shots: int | None = None, samples: int | None = None) -> Strategy:
    """A strategy by name, with its number of examples or samples changed where given."""
    if name not in STRATEGIES:
        raise GptlabError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    s = STRATEGIES[name]
    return Strategy(s.name, s.shots if shots is None or s.name == "zero-shot" else shots, s.reasoning,
                    s.samples if samples is None or s.samples == 1 else samples, s.temperature, s.retrieval)


def normalize(answer: str) -> str:
    """Lower case, single spaces, no surrounding quotes or trailing punctuation, no thousands separators."""
    text = " ".join(answer.strip().lower().split()).strip("\"'`*").rstrip(".!?;:").strip()
    if NUMBER.fullmatch(text):
        text = text.replace(",", "")
        if "." in text:
            text = text.rstrip("0").rstrip(".")
    return text


def extract(text: str, reference: str | None = None) -> str:
    """The answer a generated text gives: "The answer is X", else (for a numeric reference) its last number, else
    its first non-empty line."""
    said = ANSWER_IS.findall(text)
    if said:
        return normalize(said[-1])
    if reference is not None and NUMBER.fullmatch(normalize(reference)):
        numbers = NUMBER.findall(text)
        if numbers:
            return normalize(numbers[-1])
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return normalize(lines[0]) if lines else ""


def vote(answers: Sequence[str]) -> str:
    """The most common non-empty answer; a tie goes to the one reached first."""
    counts = Counter(a for a in answers if a)
    if not counts:
        return ""
    best = max(counts.values())
    return next(a for a in answers if counts.get(a) == best)


def solution(example: Example, reasoning: bool) -> str:
    """A solved example's answer as a demonstration shows it."""
    answer = example.completion.strip()
    if reasoning:
        rationale = (example.rationale or "").strip()
        return f"{rationale} The answer is {answer}." if rationale else f"The answer is {answer}."
    return answer


def with_context(question: str, passages: Sequence[str]) -> str:
    """A question after the passages retrieved for it, numbered."""
    if not passages:
        return question.strip()
    listed = "\n".join(f"[{i}] {' '.join(p.split())}" for i, p in enumerate(passages, 1))
    return f"Context:\n{listed}\nQuestion: {question.strip()}"


def prompt_text(question: str, demos: Sequence[Example], s: Strategy, passages: Sequence[str] = (),
                demo_passages: Sequence[Sequence[str]] = ()) -> str:
    """`Q:` / `A:` lines: the solved examples, then the question (each after its passages, where retrieved)."""
    contexts = list(demo_passages) + [()] * len(demos)
    lines = [f"Q: {with_context(d.prompt, c)}\nA: {solution(d, s.reasoning)}\n"
             for d, c in zip(demos[: s.shots], contexts)]
    return "\n".join([*lines, f"Q: {with_context(question, passages)}\nA:"])


def prompt_messages(question: str, demos: Sequence[Example], s: Strategy, passages: Sequence[str] = (),
                    demo_passages: Sequence[Sequence[str]] = ()) -> list[dict[str, str]]:
    """The same as turns of a conversation, for a chat model."""
    turns: list[dict[str, str]] = []
    contexts = list(demo_passages) + [()] * len(demos)
    for d, c in zip(demos[: s.shots], contexts):
        turns += [{"role": "user", "content": with_context(d.prompt, c)},
                  {"role": "assistant", "content": solution(d, s.reasoning)}]
    return [*turns, {"role": "user", "content": with_context(question, passages)}]


def answer(llm: LLM, question: str, demos: Sequence[Example], s: Strategy, max_new_tokens: int = 128,
           seed: int = 0, reference: str | None = None, passages: Sequence[str] = (),
           demo_passages: Sequence[Sequence[str]] = ()) -> dict[str, Any]:
    """One question under one strategy: the chains generated, the answers read from them and the one chosen."""
    tok, engine = llm.tokenizer, llm.engine
    if tok.chat_template:
        ids = tok.encode_chat(prompt_messages(question, demos, s, passages, demo_passages), add_generation_prompt=True)
        stop, stop_ids = tok.chat_stop_strings, tok.chat_stop_ids
    else:
        ids = engine.encode(prompt_text(question, demos, s, passages, demo_passages))
        stop, stop_ids = ["\nQ:", "\n\n"], None
    room = engine.context - max_new_tokens
    if len(ids) > room:  # keep the question, next to the answer: examples fall off the front
        ids = tok.prefix_ids + ids[-(room - len(tok.prefix_ids)):]
    params = SamplingParams(temperature=s.temperature, top_p=0.95 if s.temperature else None, seed=seed)
    done = engine.complete([ids] * s.samples, max_new_tokens, params, stop, stop_ids)
    chains = [c.text for c in done]
    answers = [extract(c, reference) for c in chains]
    return {"chains": chains, "answers": answers, "answer": vote(answers),
            "tokens": sum(len(c.token_ids) for c in done), "prompt": tok.decode(ids)}


def bootstrap(llm: LLM, train: Sequence[Example], s: Strategy, retrieve: Callable[[str], list[str]],
              max_new_tokens: int, seed: int = 0, tries: int = 20) -> tuple[list[Example], list[list[str]]]:
    """DSP's demonstrations: training examples that retrieval + zero-shot prediction answers correctly, with the
    passages retrieved for them (at most `shots`, from the first `tries`); where too few come out right, the first
    others fill up, so that the prompt keeps its shape."""
    zero = Strategy(s.name, shots=0, retrieval=True)
    good, rest = [], []
    for i, ex in enumerate(train[:tries]):
        passages = retrieve(ex.prompt)
        got = answer(llm, ex.prompt, [], zero, max_new_tokens, seed + i, ex.completion, passages)
        (good if got["answer"] == normalize(ex.completion) else rest).append((ex, passages))
        if len(good) >= s.shots:
            break
    chosen = (good + rest)[: s.shots]
    return [ex for ex, _ in chosen], [p for _, p in chosen]


def evaluate_strategies(llm: LLM, examples: Sequence[Example], strategies: Sequence[Strategy], limit: int = 50,
                        max_new_tokens: int = 128, seed: int = 0,
                        retrieve: Callable[[str], list[str]] | None = None) -> list[dict[str, Any]]:
    """Each strategy on the same questions (the examples after those that serve as demonstrations): accuracy of the
    extracted answers, tokens generated, time, and a few samples. `retrieve(question)` gives the passages DSP
    reads (from an index)."""
    if any(ex.chat for ex in examples):
        raise GptlabError("prompting strategies take question/answer examples, and these are conversations")
    shots = max(s.shots for s in strategies)
    if len(examples) <= shots:
        raise GptlabError(f"{len(examples)} examples cannot give {shots} demonstrations and something to score")
    if any(s.retrieval for s in strategies) and retrieve is None:
        raise GptlabError("dsp retrieves passages: give it an index (--index INDEX, built with gptlab index)")
    demos, tests = list(examples[:shots]), list(examples[shots: shots + limit])
    if any(s.reasoning for s in strategies) and not any(d.rationale for d in demos):
        raise GptlabError("chain of thought needs worked examples: give the demonstrations a `rationale` field "
                          "(question/answer/rationale records)")
    rows = []
    for s in strategies:
        start, correct, tokens, samples = time.perf_counter(), 0, 0, []
        shown, shown_passages = demos, []
        if s.retrieval:  # the demonstrations come from the examples that are not scored
            shown, shown_passages = bootstrap(llm, demos + list(examples[shots + limit:]), s, retrieve,
                                              max_new_tokens, seed)
        for i, ex in enumerate(tests):
            passages = retrieve(ex.prompt) if s.retrieval else []
            got = answer(llm, ex.prompt, shown, s, max_new_tokens, seed + i, ex.completion, passages, shown_passages)
            ok = got["answer"] == normalize(ex.completion)
            correct += ok
            tokens += got["tokens"]
            if len(samples) < 3:
                samples.append({"question": ex.prompt, "output": got["chains"][0], "answers": got["answers"],
                                "answer": got["answer"], "reference": ex.completion, "correct": ok})
        rows.append({"strategy": s.name, "shots": s.shots, "samples_per_question": s.samples,
                     "accuracy": 100 * correct / len(tests), "examples": len(tests),
                     "tokens_per_question": tokens / len(tests), "seconds": time.perf_counter() - start,
                     "samples": samples})
    return rows


def report(rows: Sequence[dict[str, Any]], checkpoint: str, data: str) -> str:
    """The results as a markdown table, as `gptlab compare` writes its report."""
    lines = [f"# Prompting strategies: {checkpoint} on {data}", "",
             "| strategy | demonstrations | chains per question | accuracy (%) | tokens per question | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['shots']} | {r['samples_per_question']} | {r['accuracy']:.1f} | "
                     f"{r['tokens_per_question']:.1f} | {r['seconds']:.1f} |")
    lines += ["", f"Examples scored: {rows[0]['examples'] if rows else 0}. Answers are read by one rule: \"The answer "
              "is X\", else the last number for a numeric reference, else the first line; compared after "
              "normalizing case, spaces, trailing punctuation and thousands separators.", ""]
    for r in rows:
        for s in r["samples"][:1]:
            lines += [f"## {r['strategy']}: a sample", "", "```", f"Q: {s['question']}", s["output"].strip(), "```",
                      f"answers read: {s['answers']} -> {s['answer']!r} (reference {s['reference']!r})", ""]
    return "\n".join(lines)

"""Fine-tuning data: (prompt, completion) examples, their tokens, and a loss mask that scores the completion only.

Formats, found by the file's ending and each record's fields:
- JSONL or CSV with `prompt` / `completion`;
- Alpaca JSONL (`instruction`, optional `input`, `output`), rendered with Alpaca's own prompt;
- chat JSONL (`messages` with roles): the conversation so far, through the chat template, is the prompt, and the
  last (assistant) message the completion;
- JSONL with `text` only, or a `.txt` file of one example per line: continued pretraining (everything is scored),
  unless a task token is given: then a line `English <to-fr> French` is the prompt `English <to-fr>` and the
  completion ` French`, as in GPT-2-style task training.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptlab.errors import GptlabError
from gptlab.tokenizer import Tokenizer

ALPACA = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


@dataclass
class Example:
    prompt: str
    completion: str
    chat: bool = False  # made from `messages` through the chat template


def _from_record(record: object, where: str, task_token: str | None) -> Example:
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if "prompt" in record and "completion" in record:
        return Example(str(record["prompt"]), str(record["completion"]))
    if "instruction" in record and "output" in record:
        extra = str(record.get("input") or "")
        prompt = ALPACA.format(ctx=", paired with an input that provides further context" if extra else "",
                               instruction=record["instruction"], input=f"### Input:\n{extra}\n\n" if extra else "")
        return Example(prompt, str(record["output"]))
    if isinstance(record.get("messages"), list):
        return _from_chat(record["messages"])
    if isinstance(record.get("text"), str):
        return _from_line(record["text"], task_token)
    raise ValueError("needs prompt/completion, instruction/output, messages, or text fields")


def _from_chat(messages: list) -> Example:
    """A conversation: everything before the last message is the prompt (rendered with the chat template kept with
    the checkpoint); the last message, the assistant's, is the completion that is scored."""
    from gptlab.prompts import render_chat

    if not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and
                               isinstance(m.get("content"), str) for m in messages):
        raise ValueError("messages must be a list of {role, content} objects")
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's (the completion to learn)")
    return Example(render_chat(messages[:-1]), messages[-1]["content"] + "\n", chat=True)


def _from_line(line: str, task_token: str | None) -> Example:
    if task_token and task_token in line:
        head, tail = line.split(task_token, 1)
        return Example(head.rstrip() + " " + task_token, tail if tail.startswith(" ") else " " + tail)
    return Example("", line)


def load_examples(path: str | Path, task_token: str | None = None, skip_bad: bool = False) -> list[Example]:
    """Read a task file. A bad line stops with its number, or is skipped and reported with `skip_bad`."""
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"data file {path} does not exist")
    examples: list[Example] = []
    bad: list[str] = []

    def fail(where: str, why: str) -> None:
        if not skip_bad:
            raise GptlabError(f"{where}: {why} (pass --skip-bad-lines to skip such lines)")
        bad.append(f"{where}: {why}")

    suffix = path.suffix.lower()
    with open(path, encoding="utf-8", newline="") as f:
        if suffix == ".jsonl":
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    examples.append(_from_record(json.loads(line), f"{path}:{n}", task_token))
                except json.JSONDecodeError:
                    fail(f"{path}:{n}", "not JSON")
                except ValueError as e:
                    fail(f"{path}:{n}", str(e))
        elif suffix == ".csv":
            reader = csv.DictReader(f)
            if not {"prompt", "completion"} <= set(reader.fieldnames or ()):
                raise GptlabError(f"{path}: a CSV needs prompt and completion columns, found {reader.fieldnames}")
            for n, row in enumerate(reader, 2):
                if row["prompt"] is None or row["completion"] is None:
                    fail(f"{path}:{n}", "missing a column")
                else:
                    examples.append(Example(row["prompt"], row["completion"]))
        else:
            examples = [_from_line(line.rstrip("\n"), task_token) for line in f if line.strip()]
    for line in bad:
        print(f"gptlab: skipped {line}", file=sys.stderr)
    if not examples:
        raise GptlabError(f"{path} holds no examples")
    return examples


class ExampleBatches:
    """Tokenized examples with labels of -100 on the prompt; batches are padded to their longest example.

    Truncation rule for an example longer than the context: the prompt loses tokens from its start (the end of a
    prompt, next to the completion, matters most), then the completion loses tokens from its end.
    """

    def __init__(self, splits: dict[str, list[Example]], tokenizer: Tokenizer, block_size: int) -> None:
        eos = tokenizer.eos_id
        if eos is None:
            raise GptlabError("the tokenizer has no <|endoftext|> token to end completions with")
        self.pad = eos
        self.truncated = 0
        self.rows: dict[str, list[tuple[list[int], int]]] = {}  # split -> (ids, number of prompt tokens)
        for split, examples in splits.items():
            rows = []
            for ex in examples:
                p, c = tokenizer.encode(ex.prompt), tokenizer.encode(ex.completion) + [eos]
                over = len(p) + len(c) - (block_size + 1)
                if over > 0:
                    self.truncated += 1
                    cut = min(over, max(0, len(p) - 1))
                    p = p[cut:]
                    c = c[: block_size + 1 - len(p)]
                rows.append((p + c, len(p)))
            self.rows[split] = rows

    def check(self, block_size: int, batch_size: int, need_val: bool) -> None:
        if not self.rows.get("train"):
            raise GptlabError("the training set is empty")
        if need_val and not self.rows.get("val"):
            raise GptlabError("no validation examples: give --val-data or a --val-fraction, or set train.eval_every 0")

    def batch(self, split: str, key: tuple[int, ...], batch_size: int, block_size: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (B, T), T the longest chosen example minus one; prompt and padding targets are -100."""
        rows = self.rows[split]
        rng = np.random.default_rng([1 if split == "val" else 0, *key])
        chosen = [rows[i] for i in rng.integers(0, len(rows), size=batch_size)]
        T = max(len(ids) for ids, _ in chosen)
        x = torch.full((batch_size, T), self.pad, dtype=torch.long)
        y = torch.full((batch_size, T), -100, dtype=torch.long)
        for b, (ids, n_prompt) in enumerate(chosen):
            x[b, : len(ids)] = torch.tensor(ids)
            y[b, max(n_prompt, 1) - 1: len(ids) - 1] = torch.tensor(ids[max(n_prompt, 1):])
        return x[:, :-1], y[:, :-1]

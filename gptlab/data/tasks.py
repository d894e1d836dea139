"""Fine-tuning data: (prompt, completion) examples, their tokens, and a loss mask that scores the completion only.

Formats, found by the file's ending and each record's fields:
- JSONL or CSV with `prompt` / `completion`;
- Alpaca JSONL (`instruction`, optional `input`, `output`), rendered with Alpaca's own prompt;
- chat JSONL (`messages` with roles): rendered with the model's own chat template when it is tokenized, and every
  assistant turn is scored (its end-of-turn token included), the rest not;
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
    messages: list[dict] | None = None  # a conversation (prompt: its last user turn, completion: its last answer)
    rationale: str | None = None  # a question's worked reasoning (question/answer/rationale records: chain of thought)

    @property
    def chat(self) -> bool:
        return self.messages is not None


def _from_record(record: object, where: str, task_token: str | None) -> Example:
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if "prompt" in record and "completion" in record:
        return Example(str(record["prompt"]), str(record["completion"]))
    if "question" in record and "answer" in record:
        rationale = record.get("rationale")
        return Example(str(record["question"]), str(record["answer"]), rationale=None if rationale is None else
                       str(rationale))
    if "instruction" in record and "output" in record:
        extra = str(record.get("input") or "")
        prompt = ALPACA.format(ctx=", paired with an input that provides further context" if extra else "",
                               instruction=record["instruction"], input=f"### Input:\n{extra}\n\n" if extra else "")
        return Example(prompt, str(record["output"]))
    if isinstance(record.get("messages"), list):
        return _from_chat(record["messages"])
    if isinstance(record.get("text"), str):
        return _from_line(record["text"], task_token)
    raise ValueError("needs prompt/completion, question/answer, instruction/output, messages, or text fields")


def _from_chat(messages: list) -> Example:
    """A conversation, kept as messages: the tokenizer renders it with the model's chat template, so the same file
    trains any model in its own format. Its last message, the assistant's, is the reference an evaluation scores."""
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and
                               isinstance(m.get("content"), str) for m in messages):
        raise ValueError("messages must be a list of {role, content} objects")
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's (the completion to learn)")
    users = [m["content"] for m in messages if m["role"] == "user"]
    return Example(users[-1] if users else "", messages[-1]["content"], messages=messages)


def _from_line(line: str, task_token: str | None) -> Example:
    if task_token and task_token in line:
        head, tail = line.split(task_token, 1)
        return Example(head.rstrip() + " " + task_token, tail if tail.startswith(" ") else " " + tail)
    return Example("", line)


def check_data_file(path: Path, kind: str) -> None:
    """One line for data that is not a file of `kind` ("task examples", "preference pairs"): say what it is instead
    (a prepared token folder, a folder, a built-in set of the other kind) or that it does not exist."""
    if path.is_file():
        return
    if path.is_dir():
        what = "a prepared token folder (finetune takes it for continued pretraining, evaluate for perplexity)" if \
            (path / "meta.json").is_file() else "a folder (name a file, or make token shards with gptlab prepare)"
        raise GptlabError(f"{path} is {what}, not a file of {kind}")
    from gptlab.data.builtin_tasks import BUILTIN  # (they import this module)
    from gptlab.data.preferences import BUILTIN_PREFERENCES

    builtin = "task examples" if str(path) in BUILTIN else "preference pairs" if str(path) in BUILTIN_PREFERENCES \
        else None
    if builtin:
        raise GptlabError(f"{path} is a built-in set of {builtin}, not of {kind} (dpo and orpo take preference "
                          "pairs, the other methods task examples)")
    raise GptlabError(f"data file {path} does not exist")


def load_examples(path: str | Path, task_token: str | None = None, skip_bad: bool = False) -> list[Example]:
    """Read a task file. A bad line stops with its number, or is skipped and reported with `skip_bad`."""
    path = Path(path)
    check_data_file(path, "task examples")
    examples: list[Example] = []
    bad: list[str] = []

    def fail(where: str, why: str) -> None:
        if not skip_bad:
            raise GptlabError(f"{where}: {why} (pass --skip-bad-lines to skip such lines)")
        bad.append(f"{where}: {why}")

    suffix = path.suffix.lower()
    try:
        path.read_text(encoding="utf-8")  # a file that is not UTF-8 is one line, wherever its bad byte lies
    except UnicodeDecodeError as e:
        raise GptlabError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
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
    """Tokenized examples with a mask of the tokens that are scored; batches are padded to their longest example.

    A (prompt, completion) example reads `BOS prompt completion EOS` (BOS where the tokenizer adds one) and scores the
    completion and its EOS; a conversation is rendered by the chat template and scores its assistant turns. Every
    example ends with the model's own end token (its EOS, or the template's end-of-turn), so that generation learns
    to stop. Truncation rule for an example longer than the context: what comes before the first scored token loses
    tokens from its start (keeping the BOS; the end, next to the answer, matters most), then the end is cut.
    """

    def __init__(self, splits: dict[str, list[Example]], tokenizer: Tokenizer, block_size: int) -> None:
        eos = tokenizer.eos_id
        if eos is None:
            raise GptlabError("the tokenizer has no end-of-text token (eos_token) to end completions with")
        self.pad = tokenizer.pad_id if tokenizer.pad_id is not None else eos
        self.truncated = 0
        self.rows: dict[str, list[tuple[list[int], list[bool]]]] = {}  # split -> (ids, scored)
        prefix = tokenizer.prefix_ids
        for split, examples in splits.items():
            rows = []
            for ex in examples:
                if ex.messages is not None:
                    ids, scored = tokenizer.chat_tokens(ex.messages)
                else:
                    p = prefix + tokenizer.encode(ex.prompt, special=False)
                    c = tokenizer.encode(ex.completion, special=False) + [eos]
                    ids, scored = p + c, [False] * len(p) + [True] * len(c)
                over = len(ids) - (block_size + 1)
                if over > 0:
                    self.truncated += 1
                    keep = len(prefix) if ids[: len(prefix)] == prefix else 0
                    first = scored.index(True) if True in scored else len(ids)
                    cut = min(over, max(0, first - 1 - keep))
                    ids, scored = ids[:keep] + ids[keep + cut:], scored[:keep] + scored[keep + cut:]
                    ids, scored = ids[: block_size + 1], scored[: block_size + 1]
                rows.append((ids, scored))
            self.rows[split] = rows

    def check(self, block_size: int, batch_size: int, need_val: bool) -> None:
        if not self.rows.get("train"):
            raise GptlabError("the training set is empty")
        if need_val and not self.rows.get("val"):
            raise GptlabError("no validation examples: give --val-data or a --val-fraction, or set train.eval_every 0")

    def batch(self, split: str, key: tuple[int, ...], batch_size: int, block_size: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (B, T), T the longest chosen example minus one; unscored and padding targets are -100."""
        rows = self.rows[split]
        rng = np.random.default_rng([1 if split == "val" else 0, *key])
        chosen = [rows[i] for i in rng.integers(0, len(rows), size=batch_size)]
        T = max(len(ids) for ids, _ in chosen)
        x = torch.full((batch_size, T), self.pad, dtype=torch.long)
        y = torch.full((batch_size, T), -100, dtype=torch.long)
        for b, (ids, scored) in enumerate(chosen):
            x[b, : len(ids)] = torch.tensor(ids)
            targets = torch.tensor(ids[1:], dtype=torch.long)  # (n-1,) the next token of each position
            y[b, : len(ids) - 1] = torch.where(torch.tensor(scored[1:], dtype=torch.bool), targets, -100)
        return x[:, :-1], y[:, :-1]

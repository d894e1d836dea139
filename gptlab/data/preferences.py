"""Preference data for DPO and ORPO: a prompt with a chosen and a rejected completion.

Formats (JSONL, one record a line), as TRL reads them:
- plain text: `{"prompt": "...", "chosen": "...", "rejected": "..."}`;
- chat: `"prompt"` a list of messages (rendered with the model's chat template and its generation prompt), `"chosen"`
  and `"rejected"` a string or a one-message list `[{"role": "assistant", "content": "..."}]`.
A record that cannot teach a preference (a missing field, chosen equal to rejected, an empty completion, a line that
is not JSON) is counted and reported by kind, never kept.

Built in: `stdlib-preferences`, which exists wherever Python does: the prompt is a standard-library function's
signature (as `stdlib-summaries` writes it), chosen its own first docstring line, rejected another function's.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptlab.data.tasks import check_data_file
from gptlab.errors import GptlabError
from gptlab.tokenizer import Tokenizer

BUILTIN_PREFERENCES = {"stdlib-preferences": "<summarize>"}  # name -> its task token


@dataclass
class Preference:
    prompt: str
    chosen: str
    rejected: str
    messages: list[dict] | None = None  # a chat prompt (its turns before the answer), rendered by the template

    @property
    def chat(self) -> bool:
        return self.messages is not None


def _answer(value: object) -> str | None:
    """A completion: a string, or a one-message list of the assistant's."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and \
            value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str):
        return value[0]["content"]
    return None


def _record(record: object) -> Preference | str:
    """A preference, or why the record is not one (the kind of fault, for the report)."""
    if not isinstance(record, dict) or not {"prompt", "chosen", "rejected"} <= set(record):
        return "missing prompt, chosen or rejected"
    chosen, rejected, prompt = _answer(record["chosen"]), _answer(record["rejected"]), record["prompt"]
    if chosen is None or rejected is None:
        return "chosen or rejected is not text"
    if not chosen.strip() or not rejected.strip():
        return "an empty completion"
    if chosen == rejected:
        return "chosen equal to rejected"
    if isinstance(prompt, str):
        return Preference(prompt, chosen, rejected)
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("role"), str) and
                                                  isinstance(m.get("content"), str) for m in prompt):
        return Preference(prompt[-1]["content"], chosen, rejected, messages=prompt)
    return "prompt is neither text nor a list of messages"


def load_preferences(path: str | Path) -> list[Preference]:
    """The good records of a JSONL file; the others are counted by kind and reported on one line."""
    path = Path(path)
    check_data_file(path, "preference pairs")
    good: list[Preference] = []
    faults: Counter[str] = Counter()
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                found = _record(json.loads(raw.decode("utf-8")))
            except UnicodeDecodeError:
                found = "not UTF-8"
            except json.JSONDecodeError:
                found = "not JSON"
            if isinstance(found, str):
                faults[found] += 1
            else:
                good.append(found)
    kinds = ", ".join(f"{n} {why}" for why, n in faults.most_common())
    if not good:
        hint = "; a file of prompt and completion is task data, for the other methods" if "missing" in kinds else ""
        raise GptlabError(f"{path} holds no usable preference records ({kinds or 'none at all'}): each needs "
                          f"prompt, chosen and rejected, the two completions different and not empty{hint}")
    if faults:
        print(f"gptlab: skipped {sum(faults.values())} of {sum(faults.values()) + len(good)} preference records "
              f"in {path}: {kinds}", file=sys.stderr)
    return good


def stdlib_preferences() -> list[Preference]:
    """The standard library's documented functions in a fixed shuffled order, taken two by two: the first one's
    signature, its own summary chosen over the second one's. Each summary is in one pair only, so a held-out pair's
    texts were never seen in training, as chosen or as rejected: what generalizes is matching a summary to its
    function, not liking or disliking a text. The same pairs on every machine with the same Python."""
    import random

    from gptlab.data.builtin_tasks import stdlib_summaries

    summaries = stdlib_summaries()
    random.Random(0).shuffle(summaries)
    return [Preference(a.prompt, a.completion, b.completion) for a, b in zip(summaries[0::2], summaries[1::2])
            if a.completion.strip() != b.completion.strip()]


def preference_data(data: str) -> list[Preference]:
    if data in BUILTIN_PREFERENCES:
        return stdlib_preferences()
    return load_preferences(data)


class PreferenceBatches:
    """Each preference as two rows, `BOS prompt chosen EOS` and `BOS prompt rejected EOS` (a chat prompt through the
    template, the answer closed by its end-of-turn), scoring the completion and its end token only. A batch of B
    preferences is 2B rows, each chosen row followed by its rejected row (so that a split of the rows between
    processes keeps the pairs): inputs and targets (2B, T), unscored targets -100.
    Truncation: the prompt loses tokens from its start (the BOS kept), then the completion its end."""

    def __init__(self, splits: dict[str, list[Preference]], tokenizer: Tokenizer, block_size: int) -> None:
        eos = tokenizer.eos_id
        if eos is None:
            raise GptlabError("the tokenizer has no end-of-text token (eos_token) to end completions with")
        self.pad = tokenizer.pad_id if tokenizer.pad_id is not None else eos
        self.truncated = 0
        self.rows: dict[str, list[tuple[list[int], list[bool], list[int], list[bool]]]] = {}
        for split, prefs in splits.items():
            self.rows[split] = [self._pair(p, tokenizer, eos, block_size) for p in prefs]

    def _pair(self, p: Preference, tok: Tokenizer, eos: int, block_size: int
              ) -> tuple[list[int], list[bool], list[int], list[bool]]:
        out: list = []
        for answer in (p.chosen, p.rejected):
            if p.messages is not None:
                ids, scored = tok.chat_tokens([*p.messages, {"role": "assistant", "content": answer}])
                last = max(i for i, s in enumerate(scored) if s) if any(scored) else len(ids)
                start = last  # only the final answer is scored: its span ends the conversation
                while start > 0 and scored[start - 1]:
                    start -= 1
                scored = [start <= i <= last for i in range(len(ids))]
            else:
                prompt = tok.prefix_ids + tok.encode(p.prompt, special=False)
                completion = tok.encode(answer, special=False) + [eos]
                ids, scored = prompt + completion, [False] * len(prompt) + [True] * len(completion)
            over = len(ids) - (block_size + 1)
            if over > 0:
                self.truncated += 1
                keep = len(tok.prefix_ids) if ids[: len(tok.prefix_ids)] == tok.prefix_ids else 0
                first = scored.index(True) if True in scored else len(ids)
                cut = min(over, max(0, first - 1 - keep))
                ids, scored = ids[:keep] + ids[keep + cut:], scored[:keep] + scored[keep + cut:]
                ids, scored = ids[: block_size + 1], scored[: block_size + 1]
            out += [ids, scored]
        return tuple(out)  # type: ignore[return-value]

    def check(self, block_size: int, batch_size: int, need_val: bool) -> None:
        if not self.rows.get("train"):
            raise GptlabError("the training set of preferences is empty")
        if need_val and not self.rows.get("val"):
            raise GptlabError("no validation preferences: give --val-data or a --val-fraction, or set train.eval_every "
                              "0")

    def batch(self, split: str, key: tuple[int, ...], batch_size: int, block_size: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(2B, T) inputs and targets: rows 2i and 2i + 1 are preference i's chosen and rejected completions."""
        rows = self.rows[split]
        rng = np.random.default_rng([1 if split == "val" else 0, *key])
        picked = [rows[i] for i in rng.integers(0, len(rows), size=batch_size)]
        seqs = [seq for r in picked for seq in ((r[0], r[1]), (r[2], r[3]))]
        T = max(len(ids) for ids, _ in seqs)
        x = torch.full((2 * batch_size, T), self.pad, dtype=torch.long)
        y = torch.full((2 * batch_size, T), -100, dtype=torch.long)
        for b, (ids, scored) in enumerate(seqs):
            x[b, : len(ids)] = torch.tensor(ids)
            targets = torch.tensor(ids[1:], dtype=torch.long)  # (n-1,) the next token of each position
            y[b, : len(ids) - 1] = torch.where(torch.tensor(scored[1:], dtype=torch.bool), targets, -100)
        return x[:, :-1], y[:, :-1]

"""`gptlab finetune` as a function: a base checkpoint, task data and a method -> a fine-tuned run folder.

The command line and the Python API (`gptlab.finetune(...)`) share it: reading and splitting the examples, giving a
conversation the base's chat template, choosing the method's settings and defaults, and checking the output folder
all happen here, once.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any

from gptlab.checkpoint import check_folder
from gptlab.config import ModelConfig
from gptlab.data.builtin_tasks import BUILTIN, builtin_examples
from gptlab.data.loader import ShardWindows, TokenShards
from gptlab.data.preferences import BUILTIN_PREFERENCES, PreferenceBatches, preference_data
from gptlab.data.tasks import Example, ExampleBatches, load_examples
from gptlab.errors import GptlabError
from gptlab.files import check_new_folder, check_outside
from gptlab.tokenizer import Tokenizer


def task_examples(data: str, task_token: str | None = None, skip_bad_lines: bool = False) -> list[Example]:
    """A built-in task by name, or a task file; shuffled in a fixed order, so that every rerun splits alike."""
    examples = builtin_examples(data) if data in BUILTIN else load_examples(data, task_token, skip_bad_lines)
    random.Random(0).shuffle(examples)
    return examples


def split_examples(examples: list[Example], val_fraction: float) -> tuple[list[Example], list[Example]]:
    if not 0 <= val_fraction < 1:
        raise GptlabError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_val = max(1, int(len(examples) * val_fraction)) if val_fraction > 0 and len(examples) > 1 else 0
    return examples[n_val:], examples[:n_val]


def finetune(checkpoint: str | os.PathLike[str], data: str, out: str | os.PathLike[str], method: str = "lora",
             val_data: str | None = None, val_fraction: float = 0.1, task_token: str | None = None,
             skip_bad_lines: bool = False, resume: bool = False, progress: bool = True,
             sections: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Fine-tune `checkpoint` on `data` with `method`; returns the last logged record.

    `sections` holds settings by section, as the command line's flags: `{"train": {"max_steps": 200},
    "lora": {"r": 16}}`. Unset settings take the method's defaults (its learning rate: `METHODS[m].lr`)."""
    from gptlab.peft import METHODS
    from gptlab.train.config import SECTIONS, TrainConfig
    from gptlab.train.loop import Run, train

    if method not in METHODS:
        raise GptlabError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
    if (Path(checkpoint) / "adapter_config.json").is_file():
        raise GptlabError(f"{checkpoint} is a fine-tuned run, not a full checkpoint: fine-tune its base, or make it "
                          "one with `gptlab export hf` and `gptlab import hf` first")
    base, out = check_folder(checkpoint), Path(out)
    check_outside(out, [base, data] if Path(data).exists() else [base])
    if out.is_file():
        check_new_folder(out)  # one line before the data is read
    sections = sections or {}
    tokenizer = Tokenizer.from_folder(base)
    section = method.replace("-", "_")
    settings = SECTIONS[section](**sections.get(section, {})) if section in SECTIONS else None
    # a method that trains another's parameters (DPO on LoRA) takes that section's settings too, checked alike
    borrowed = {s: vars(SECTIONS[s](**sections.get(s, {}))) for s in getattr(METHODS[method], "uses_sections", ())}
    chosen = METHODS[method](**(vars(settings) if settings else {}), **borrowed)
    if getattr(chosen, "init_text", None):
        chosen.init_ids = tokenizer.encode(chosen.init_text, special=False)
    config = ModelConfig.from_json(str(base / "config.json"))
    chosen.check(config)  # settings that only the base's shape can judge
    block_size = config.block_size - chosen.reserved_positions  # virtual tokens take context positions
    task_token = task_token or BUILTIN.get(data) or BUILTIN_PREFERENCES.get(data)
    if task_token and tokenizer.backend.token_to_id(task_token) is None:
        tokenizer.add_special_tokens([task_token])  # one token, never split; the embedding grows to match
    batches: Any
    if (Path(data) / "meta.json").is_file():  # a prepared token folder: continued pretraining
        if getattr(chosen, "data", None) == "preferences":
            raise GptlabError(f"{data} is a prepared token folder; --method {method} needs preference pairs (JSONL of "
                              "prompt, chosen, rejected, or stdlib-preferences)")
        if val_data:
            raise GptlabError(f"{data} is a prepared token folder with its own val split; leave out --val-data")
        shards = TokenShards(data)
        shards.check_tokenizer(tokenizer, str(base))
        batches = ShardWindows(shards, block_size)
    elif getattr(chosen, "data", None) == "preferences":
        batches = preference_batches(data, val_data, val_fraction, tokenizer, block_size, chosen.name)
    else:
        batches = example_batches(data, val_data, val_fraction, task_token, skip_bad_lines, tokenizer, block_size)
    if batches.truncated:
        print(f"gptlab: {batches.truncated} example(s) longer than the context ({block_size}) were truncated: the "
              "prompt loses its start first, then the completion its end", file=sys.stderr)
    train_cfg = TrainConfig(**sections.get("train", {}))
    if getattr(chosen, "start_step", 0) >= train_cfg.max_steps:
        print(f"gptlab: note: qat.start_step {chosen.start_step} is not before train.max_steps {train_cfg.max_steps}: "
              "no step trains through the rounding, so the checkpoint is plain post-training quantization",
              file=sys.stderr)
    run = Run(model=config, train=train_cfg, data=batches, tokenizer=tokenizer, out=out, resume=resume, method=chosen,
              progress=progress, base=base)
    return train(run)


def example_batches(data: str, val_data: str | None, val_fraction: float, task_token: str | None,
                    skip_bad_lines: bool, tokenizer: Tokenizer, block_size: int) -> ExampleBatches:
    """Supervised examples, split, tokenized (a conversation through the base's template, or gptlab's own)."""
    from gptlab.chat import DEFAULT_TEMPLATE

    train_examples = task_examples(data, task_token, skip_bad_lines)
    if val_data:
        val_examples = load_examples(val_data, task_token, skip_bad_lines)
    else:
        train_examples, val_examples = split_examples(train_examples, val_fraction)
    if any(e.chat for e in train_examples + val_examples) and not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_TEMPLATE  # saved with the run, so that serving renders chats alike
    return ExampleBatches({"train": train_examples, "val": val_examples}, tokenizer, block_size)


def preference_batches(data: str, val_data: str | None, val_fraction: float, tokenizer: Tokenizer, block_size: int,
                       method: str) -> PreferenceBatches:
    """Preference pairs, split as examples are (a fixed shuffle), tokenized; a chat prompt needs the base's own
    template (a preference is about how that model answers, not gptlab's stand-in format)."""
    prefs = preference_data(data)
    random.Random(0).shuffle(prefs)
    if val_data:
        train_prefs, val_prefs = prefs, preference_data(val_data)
    else:
        if not 0 <= val_fraction < 1:
            raise GptlabError(f"--val-fraction must be in [0, 1), got {val_fraction}")
        n_val = max(1, int(len(prefs) * val_fraction)) if val_fraction > 0 and len(prefs) > 1 else 0
        train_prefs, val_prefs = prefs[n_val:], prefs[:n_val]
    if any(p.chat for p in train_prefs + val_prefs) and not tokenizer.chat_template:
        raise GptlabError(f"{data} has chat prompts but the base has no chat template; --method {method} compares "
                          "answers in the model's own chat format: fine-tune a base that has one")
    return PreferenceBatches({"train": train_prefs, "val": val_prefs}, tokenizer, block_size)

"""AutoPrompt (Shin et al. 2020): a gradient-guided search for discrete trigger tokens on a frozen model.

A template says where the triggers go: `{input} [T] [T] [T] [T] {answer}`. Each example reads as the template with
its input, the trigger tokens in the `[T]` slots and its completion after them; the loss is the mean cross-entropy
of the completion's tokens only, the model frozen. Each step:

1. the gradient of the loss on a batch of training examples with respect to the triggers' input embeddings;
2. at one trigger slot (seeded random), every allowed token w scored by the first-order change of the loss,
   -grad . e_w, and the top `candidates` kept;
3. the current prompt and every candidate re-scored by the real loss on that same batch, in one batched forward,
   and the best kept if it lowers the loss (a greedy coordinate step).

The result is a hard prompt: text. Candidates are therefore scored as text, encoded exactly as `gptlab evaluate
--template` encodes a prompt, so that the loss the search lowers is the loss of the template it writes (the gradient
step alone uses the trigger ids spliced in). A slot after a space takes the space into its token (" cat") where the
tokenizer puts spaces at the start of words, as GPT-2's byte-level BPE does, so that the text encodes back to the
tokens searched.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gptlab.data.tasks import Example
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.prompts import ANSWER, fill, source_of, split_answer
from gptlab.tokenizer import Tokenizer
from gptlab.train.config import AutoPromptConfig

SLOT = "[T]"
DEFAULT_TEMPLATE = "{input} [T] [T] [T] [T]"
LOGIT_BYTES = 256 * 2**20  # float32 logits of one forward chunk: candidates x batch rows are split to fit
PROBE = "a"  # a token's text is read after this one, so that a word-initial space shows (SentencePiece drops it)


# -- templates -----------------------------------------------------------------------------------------------------
def check_template(template: str, slots: bool = True) -> None:
    """One clear line for a template that cannot be searched (`slots`) or filled."""
    if "{input}" not in template:
        raise GptlabError(f"template {template!r} has no {{input}}: write where each example's input goes, e.g. "
                          f"{DEFAULT_TEMPLATE!r}")
    if slots and SLOT not in template:
        hint = " (slots are written [T], upper case)" if "[t]" in template else ""
        raise GptlabError(f"template {template!r} has no trigger slot {SLOT}{hint}: write where the searched tokens "
                          f"go, e.g. {DEFAULT_TEMPLATE!r}")
    split_answer(template)


@dataclass
class Template:
    """A template's text around its trigger slots, fitted to one tokenizer."""

    pieces: list[str]  # the text before, between and after the slots (n + 1 pieces, each may hold {input})
    absorb: list[bool]  # slot i takes the space that ends pieces[i] into its token
    sep: str  # what joins the filled prompt and the completion

    @classmethod
    def parse(cls, template: str, spaced_tokens: bool) -> Template:
        check_template(template)
        prompt, sep = split_answer(template)
        pieces = prompt.split(SLOT)
        absorb = [spaced_tokens and p.endswith(" ") for p in pieces[:-1]]
        pieces = [p[:-1] if i < len(absorb) and absorb[i] else p for i, p in enumerate(pieces)]
        return cls(pieces, absorb, sep)

    @property
    def n(self) -> int:
        return len(self.absorb)

    def text(self, triggers: Sequence[str]) -> str:
        """The prompt with the triggers' text in the slots (the hard template, less its `{answer}`)."""
        return "".join(p + t for p, t in zip(self.pieces, [*triggers, ""]))


class Vocabulary:
    """The tokens a slot may hold: real text (no BOS, EOS, padding or stop token, nothing unprintable, no braces that
    would read as a placeholder) that encodes back to the token, so that the text means what was searched. Added
    tokens such as `<to-fr>` count: a model fine-tuned with a task token may well be prompted by it."""

    def __init__(self, tokenizer: Tokenizer, rows: int) -> None:
        banned = {tokenizer._id(name) for name in tokenizer.specials} | set(tokenizer.stop_ids)
        n = min(tokenizer.vocab_size, rows)
        probe = tokenizer.encode(PROBE, special=False)
        head = tokenizer.decode(probe)
        texts = [t[len(head):] for t in tokenizer.backend.decode_batch([[*probe, i] for i in range(n)],
                                                                      skip_special_tokens=False)]
        self.texts = texts + [""] * (rows - n)  # rows past the tokenizer's (a vocabulary padded to 64) are never text
        self.spaced = torch.zeros(rows, dtype=torch.bool)  # " word": one space, then text
        self.bare = torch.zeros(rows, dtype=torch.bool)  # "word"
        self.added = torch.zeros(rows, dtype=torch.bool)  # an added token: never merged with the space before it
        spaced = [i for i, t in enumerate(texts) if len(t) > 1 and t[0] == " " and not t[1].isspace()]
        bare = [i for i, t in enumerate(texts) if t and not t[0].isspace()]
        again = tokenizer.backend.encode_batch([PROBE + texts[i] for i in spaced] + [texts[i] for i in bare],
                                               add_special_tokens=False)
        for i, enc in zip(spaced + bare, again):
            t = texts[i]
            if i in banned or "\ufffd" in t or "{" in t or "}" in t or not t.isprintable():
                continue
            if t[0] == " ":
                self.spaced[i] = enc.ids == [*probe, i]
            else:
                self.bare[i] = enc.ids == [i]
                self.added[i] = self.bare[i] and i in tokenizer.added

    def allowed(self, absorb: bool) -> torch.Tensor:
        return self.spaced | self.added if absorb else self.bare

    def lead(self, token: int, absorb: bool) -> str:
        """What stands between a slot's piece and its token: the piece's space, when the token cannot take it in."""
        return " " if absorb and self.added[token] else ""

    def slot_texts(self, template: Template, triggers: Sequence[int]) -> list[str]:
        return [self.lead(t, a) + self.texts[t] for t, a in zip(triggers, template.absorb)]


# -- rows and losses -----------------------------------------------------------------------------------------------
def answer_ids(tokenizer: Tokenizer, completion: str, sep: str) -> list[int]:
    return tokenizer.encode(sep + completion.strip(), special=False)


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """A prompt's ids as `gptlab evaluate` encodes it (the engine's rule: an empty prompt starts from the BOS, or
    GPT-2's <|endoftext|>)."""
    ids = tokenizer.encode(prompt)
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    return ids or ([] if start is None else [start])


def context(model: GPT) -> int:
    """The positions a row may take: the context less a soft prompt's or prefix's virtual tokens."""
    return model.config.block_size - sum(m.n for m in (model.prompt, model.prefix) if m is not None)


def fit(ids: list[int], keep: int, cut_before: int, block_size: int) -> tuple[list[int], int]:
    """Make a row fit the context: drop tokens after the first `keep` (the BOS) and before `cut_before` (the first
    trigger, or the answer), keeping the end next to the answer as evaluation does; then cut the answer's end.
    Returns the row and how many tokens were dropped before the answer."""
    over = len(ids) - (block_size + 1)
    cut = max(0, min(over, cut_before - keep))
    ids = ids[:keep] + ids[keep + cut:]
    return ids[: block_size + 1], cut


def pack(rows: Sequence[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of (ids, index of the first answer token) -> inputs x and targets y (R, T); only answer tokens are
    targets (the rest -100)."""
    T = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), T), pad, dtype=torch.long)
    y = torch.full((len(rows), T), -100, dtype=torch.long)
    for r, (ids, start) in enumerate(rows):
        x[r, : len(ids) - 1] = torch.tensor(ids[:-1])
        y[r, start - 1: len(ids) - 1] = torch.tensor(ids[start:])
    return x, y


@torch.no_grad()
def row_losses(model: GPT, rows: Sequence[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer-token loss and answer-token count of each row (R,). Rows of like length go together (little
    padding), in chunks as large as the logits' memory allows."""
    device, V = model.transformer.wte.weight.device, model.config.vocab_size
    chunks: list[list[int]] = [[]]
    for r in sorted(range(len(rows)), key=lambda r: len(rows[r][0])):  # shortest first: a chunk's last is its width
        if chunks[-1] and (len(chunks[-1]) + 1) * len(rows[r][0]) * V * 4 > LOGIT_BYTES:
            chunks.append([])
        chunks[-1].append(r)
    sums, counts = torch.zeros(len(rows)), torch.zeros(len(rows))
    for chunk in chunks:
        x, y = pack([rows[r] for r in chunk], pad)
        logits = model(x.to(device))  # (r, T, V)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), ignore_index=-100,
                             reduction="none").view(y.shape)  # (r, T)
        sums[chunk], counts[chunk] = ce.sum(1).cpu(), (y != -100).sum(1).float()
    return sums, counts


class Task:
    """Examples as (input, answer ids) for one template and tokenizer; rows for any trigger choice."""

    def __init__(self, examples: Sequence[Example], tokenizer: Tokenizer, sep: str, block_size: int,
                 where: str = "the data") -> None:
        pairs = [(source_of(ex), answer_ids(tokenizer, ex.completion, sep)) for ex in examples
                 if ex.completion.strip()]
        if not pairs:
            raise GptlabError(f"{where} holds no example with a completion to score")
        if not any(source for source, _ in pairs):
            raise GptlabError(f"the examples of {where} have no input to put in {{input}} (a text file of lines "
                              "needs --task-token to split each line into input and completion)")
        self.inputs, self.answers = [s for s, _ in pairs], [a for _, a in pairs]
        self.tokenizer, self.block_size = tokenizer, block_size
        self.pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)

    def __len__(self) -> int:
        return len(self.inputs)

    def text_rows(self, template: str, which: Sequence[int]) -> list[tuple[list[int], int]]:
        """Rows of examples `which` under a hard template (text with {input}), encoded as evaluation encodes it."""
        keep = len(self.tokenizer.prefix_ids)
        rows = []
        for i in which:
            prompt = prompt_ids(self.tokenizer, fill(template, self.inputs[i]))
            ids, cut = fit(prompt + self.answers[i], keep, len(prompt) - 1, self.block_size)
            rows.append((ids, len(prompt) - cut))
        return rows

    def spliced_rows(self, template: Template, triggers: Sequence[int], leads: Sequence[str], which: Sequence[int]
                     ) -> tuple[list[tuple[list[int], int]], torch.Tensor]:
        """Rows with the trigger ids spliced between the encoded pieces, and the slots' positions (B, n)."""
        tok, prefix = self.tokenizer, self.tokenizer.prefix_ids
        rows, positions = [], []
        for i in which:
            ids, slots = list(prefix), []
            for piece, lead, trigger in zip(template.pieces, [*leads, ""], [*triggers, None]):
                ids += tok.encode(fill(piece, self.inputs[i]) + lead, special=False)
                if trigger is not None:
                    slots.append(len(ids))
                    ids.append(trigger)
            start = len(ids)
            ids, cut = fit(ids + self.answers[i], len(prefix), slots[0], self.block_size)
            if start - cut >= len(ids):
                raise GptlabError(f"the template's text after {{input}} leaves no room for the answer in the "
                                  f"model's context of {self.block_size} tokens")
            rows.append((ids, start - cut))
            positions.append([p - cut for p in slots])
        return rows, torch.tensor(positions)

    def loss(self, model: GPT, template: str, which: Sequence[int] | None = None) -> float:
        """Mean answer-token loss of the examples under a hard template."""
        which = range(len(self)) if which is None else which
        sums, counts = row_losses(model, self.text_rows(template, which), self.pad)
        return (sums.sum() / counts.sum().clamp(min=1)).item()


def template_loss(model: GPT, tokenizer: Tokenizer, examples: Sequence[Example], template: str) -> float:
    """Mean cross-entropy of the completions' tokens under a hard template (text with {input}; a trailing {answer}
    says how the completion joins it), the end-of-text token not scored: the loss AutoPrompt lowers."""
    check_template(template, slots=False)
    prompt, sep = split_answer(template)
    return Task(examples, tokenizer, sep, context(model)).loss(model, prompt)


def trigger_gradient(model: GPT, x: torch.Tensor, y: torch.Tensor, positions: torch.Tensor,
                     triggers: Sequence[int]) -> torch.Tensor:
    """d loss / d (the triggers' input embeddings) (n, C), the embeddings put in place by a hook on the token
    embedding, so the model's own forward runs unchanged."""
    wte = model.transformer.wte
    device = wte.weight.device
    emb = wte.weight[torch.tensor(triggers, device=device)].detach().float().requires_grad_()  # (n, C)
    pos = positions.to(device)  # (B, n)

    def put_triggers(module: torch.nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:  # out (B, T, C)
        src = emb.to(out.dtype)[None].expand(pos.size(0), -1, -1)  # (B, n, C)
        return out.scatter(1, pos[..., None].expand(-1, -1, out.size(-1)), src)

    handle = wte.register_forward_hook(put_triggers)
    try:
        with torch.enable_grad():
            logits = model(x.to(device))  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), ignore_index=-100)
            loss.backward()
    finally:
        handle.remove()
    return emb.grad  # (n, C)


# -- the search ----------------------------------------------------------------------------------------------------
def search(model: GPT, tokenizer: Tokenizer, template: str, train: Sequence[Example], val: Sequence[Example],
           settings: AutoPromptConfig, progress: bool = False) -> dict[str, Any]:
    """Shin et al.'s greedy coordinate search on a frozen model; returns the prompt, its held-out loss, the
    held-out loss of the random start, and each step."""
    model.eval().requires_grad_(False)
    check_template(template)
    E = model.transformer.wte.weight.detach().float()  # (V, C)
    vocab = Vocabulary(tokenizer, E.size(0))
    tpl = Template.parse(template, spaced_tokens=bool(vocab.spaced.any()))
    allowed = [vocab.allowed(a).to(E.device) for a in tpl.absorb]
    for i, ok in enumerate(allowed):
        if not ok.any():
            raise GptlabError(f"no token of the vocabulary can fill trigger slot {i + 1} of {template!r}")
    block = context(model)
    train_task = Task(train, tokenizer, tpl.sep, block, "the training split")
    val_task = Task(val, tokenizer, tpl.sep, block, "the held-out split")
    rng = random.Random(settings.seed)  # the start, the batches and the slots: the one source of chance
    torch.manual_seed(settings.seed)
    triggers = [rng.choice(ok.nonzero()[:, 0].tolist()) for ok in allowed]

    def text(ids: Sequence[int]) -> str:
        return tpl.text(vocab.slot_texts(tpl, ids))

    def leads(ids: Sequence[int]) -> list[str]:
        return [vocab.lead(t, a) for t, a in zip(ids, tpl.absorb)]

    start = {"prompt": text(triggers) + tpl.sep + ANSWER, "triggers": list(triggers),
             "val_loss": val_task.loss(model, text(triggers))}
    k = settings.candidates
    steps: list[dict[str, Any]] = []
    from tqdm import tqdm

    bar = tqdm(range(settings.steps), desc="autoprompt", disable=not progress, dynamic_ncols=True, mininterval=1.0)
    t0 = time.perf_counter()
    for step in bar:
        batch = rng.sample(range(len(train_task)), min(settings.batch_size, len(train_task)))
        rows, positions = train_task.spliced_rows(tpl, triggers, leads(triggers), batch)
        grad = trigger_gradient(model, *pack(rows, train_task.pad), positions, triggers)  # (n, C)
        slot = rng.randrange(tpl.n)
        scores = -(E @ grad[slot])  # (V,) first-order change of the loss, negated
        scores[~allowed[slot]] = -float("inf")
        scores[triggers[slot]] = -float("inf")
        top = scores.topk(min(k, int(torch.isfinite(scores).sum()))).indices.tolist()
        options = [list(triggers)] + [[*triggers[:slot], c, *triggers[slot + 1:]] for c in top]
        candidate_rows = [r for ids in options for r in train_task.text_rows(text(ids), batch)]  # (k+1) x B rows
        sums, counts = row_losses(model, candidate_rows, train_task.pad)
        losses = (sums.view(len(options), -1).sum(1) / counts.view(len(options), -1).sum(1).clamp(min=1)).tolist()
        best = min(range(len(options)), key=lambda j: losses[j])  # the current prompt wins ties
        steps.append({"step": step + 1, "slot": slot + 1, "loss": round(losses[0], 6),
                      "best_loss": round(losses[best], 6), "changed": best > 0,
                      **({"token": options[best][slot], "text": vocab.texts[options[best][slot]]} if best else {})})
        triggers = options[best]
        bar.set_postfix(loss=f"{losses[best]:.4f}", refresh=False)
    bar.close()
    seconds = time.perf_counter() - t0
    prompt = text(triggers)
    val_rows, _ = val_task.spliced_rows(tpl, triggers, leads(triggers), range(len(val_task)))
    same = sum(a == b for a, b in zip(val_task.text_rows(prompt, range(len(val_task))), val_rows))
    return {"template": template, "prompt": prompt + tpl.sep + ANSWER, "val_loss": val_task.loss(model, prompt),
            "start": start,
            "triggers": [{"id": t, "text": vocab.texts[t]} for t in triggers],
            "reencoded": same / len(val_task), "train_examples": len(train_task), "val_examples": len(val_task),
            "changes": sum(s["changed"] for s in steps), "seconds": round(seconds, 3),
            "ms_per_step": round(1000 * seconds / settings.steps, 2), "steps": steps}


def autoprompt(checkpoint: str | Path, data: str, template: str = DEFAULT_TEMPLATE, out: str | Path | None = None,
               settings: AutoPromptConfig | None = None, task_token: str | None = None,
               progress: bool = False) -> dict[str, Any]:
    """Search trigger tokens for `template` on the frozen `checkpoint`, on a task file or built-in task `data`
    (split into training and held-out examples as `gptlab finetune` splits it); with `out`, write template.txt
    (the hard template, for `gptlab evaluate --template`) and autoprompt.json there. Returns the record."""
    from gptlab.api import resolve_device
    from gptlab.checkpoint import check_folder, load_checkpoint, read_folders
    from gptlab.files import atomic_write_text, check_new_folder, write_folder
    from gptlab.finetuning import split_examples, task_examples
    from gptlab.train.loop import peak_memory_mb

    settings = settings or AutoPromptConfig()
    check_template(template)
    if not (Path(checkpoint) / "adapter_config.json").is_file():  # a fine-tuned run loads with its base
        check_folder(checkpoint)  # before the data is read
    inputs = [*read_folders(checkpoint), *([data] if Path(data).exists() else [])]
    if out is not None:
        check_new_folder(out, inputs)
    train, val = split_examples(task_examples(data, task_token), settings.val_fraction)
    if any(ex.messages is not None for ex in train + val):
        raise GptlabError(f"{data} holds conversations (chat messages); AutoPrompt searches a text template: give it "
                          "text examples (prompt and completion)")
    if not val:
        raise GptlabError(f"{data} has too few examples for a held-out split ({len(train)})")
    device = resolve_device(settings.device)
    model, tokenizer = load_checkpoint(checkpoint, device)
    result = search(model, tokenizer, template, train, val, settings, progress)
    result.update(checkpoint=str(checkpoint), data=str(data), task_token=task_token,
                  settings=dataclasses.asdict(settings), peak_memory_mb=round(peak_memory_mb(device), 1))
    if out is not None:
        def write(folder: Path) -> None:
            atomic_write_text(folder / "template.txt", result["prompt"] + "\n")
            atomic_write_text(folder / "autoprompt.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")

        write_folder(out, write, inputs)
    if progress and result["reencoded"] < 1:
        other = round((1 - result["reencoded"]) * result["val_examples"])
        print(f"gptlab: note: in {other} of {result['val_examples']} held-out examples the prompt's text encodes to "
              "other tokens than the triggers searched (the loss shown is the text's, as evaluate reads it)",
              file=sys.stderr)
    return result

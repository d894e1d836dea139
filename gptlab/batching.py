"""Continuous batching: every running sequence advances by one token in one decode step.

A sequence (`Row`: one choice of one request) takes a slot of a preallocated cache when one is free, has its prompt
prefilled in chunks, then joins the running batch; it leaves when it stops, when its client goes away, or at its
token limit, and the next waiting row takes its slot at the next step. Each row keeps its own sampling settings and
its own random generator, so what it samples does not depend on who shares its batch.

A long prompt is prefilled `prefill_chunk` tokens per step, between decode steps, so that it delays the others'
next token by one chunk's time rather than by its whole prefill (chunked prefill, as vLLM and llama.cpp's server do).

All model work runs in one long-lived engine thread: PyTorch's OpenMP threads stay warm there (on 2 cores the same
decode step ran 2.4x slower when each request started it from a fresh worker thread), and no two forwards compete
for the cores.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gptlab.generate import SamplingParams, TextStream, process_logits
from gptlab.model import GPT


class SlotCache:
    """Keys and values of `slots` sequences, each at its own length, in one tensor that grows by doubling.

    Unlike the engine's `KVCache` (one write position shared by a left-padded batch), each row here writes at its own
    position. Decode steps run over slots 0..n-1 (the scheduler keeps running rows packed at the front); a slot with
    nothing to decode writes to a scratch position past the end and attends to position 0 only.
    """

    def __init__(self, model: GPT, slots: int, context: int, start: int = 256) -> None:
        cfg = model.config
        self.dtype, self.device = model.transformer.wte.weight.dtype, model.transformer.wte.weight.device
        self.layers, self.slots, self.context = cfg.n_layer, slots, context
        self.kv_heads, self.head_dim = cfg.kv_heads, cfg.head_dim
        self.windows = sorted({cfg.layer_window(i) for i in range(cfg.n_layer)}, key=lambda w: w or 0)
        self.k = self.v = torch.empty(0)
        self.length = 0
        self.reserve(min(start, context))
        self.masks: dict[int | None, torch.Tensor] = {}
        self._write: tuple[Any, Any] = (None, None)
        self._read: tuple[slice, int] = (slice(0, 0), 0)

    def reserve(self, length: int) -> None:
        """Room for `length` positions per slot (plus the scratch one); existing entries are kept."""
        if length <= self.length:
            return
        new = min(self.context, max(length, 2 * self.length))
        shape = (self.layers, self.slots, self.kv_heads, new + 1, self.head_dim)  # (L, slots, n_kv, S + 1, hs)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.length:
            k[:, :, :, : self.length] = self.k[:, :, :, : self.length]
            v[:, :, :, : self.length] = self.v[:, :, :, : self.length]
        self.k, self.v, self.length = k, v, new
        self.positions = torch.arange(new + 1, device=self.device)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` entries to slot `dst` (packing running rows at the front)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def begin_decode(self, pos: torch.Tensor, active: torch.Tensor) -> None:
        """Rows 0..n-1 add one token at positions `pos` (n,); rows not `active` (n,) write to the scratch position."""
        n = pos.numel()
        seen = torch.where(active, pos, torch.zeros_like(pos))  # (n,)
        span = int(seen.max()) + 1
        self._write = (torch.arange(n, device=self.device), torch.where(active, pos, torch.full_like(pos, self.length)))
        self._read = (slice(0, n), span)
        slots = self.positions[:span]
        for window in self.windows:
            allowed = slots[None, :] <= seen[:, None]  # (n, S)
            if window:
                allowed &= slots[None, :] > seen[:, None] - window
            self.masks[window] = allowed[:, None, None]  # (n, 1, 1, S)

    def begin_prefill(self, slot: int, start: int, length: int) -> None:
        """Slot `slot` adds `length` tokens at positions start..start+length-1."""
        end = start + length
        self._write = (slot, slice(start, end))
        self._read = (slice(slot, slot + 1), end)
        slots, queries = self.positions[:end], self.positions[start:end]
        for window in self.windows:
            allowed = slots[None, :] <= queries[:, None]  # (T, S)
            if window:
                allowed &= slots[None, :] > queries[:, None] - window
            self.masks[window] = allowed[None, None]  # (1, 1, T, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys and values (B, n_kv, T, hs); return the attended part (B, n_kv, S, hs)."""
        rows, at = self._write
        if isinstance(rows, int):  # prefill of one slot
            self.k[layer, rows, :, at] = k[0]
            self.v[layer, rows, :, at] = v[0]
        else:  # decode: row i writes at its own position
            self.k[layer][rows, :, at] = k[:, :, 0]
            self.v[layer][rows, :, at] = v[:, :, 0]
        read, span = self._read
        return self.k[layer, read, :, :span], self.v[layer, read, :, :span]


@dataclass(eq=False)
class Row:
    """One sequence to generate: its prompt, how to choose its tokens, and where its text goes.

    `on_piece(row, piece)` and `on_done(row)` are called in the engine thread; `cancelled` (shared by a request's
    rows) drops the row at the next step. `logprobs` asks for the chosen token's log-probability and that many
    alternatives; `constraint` (gptlab.grammar) masks the tokens a grammar does not allow.
    """

    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    text: TextStream
    on_piece: Callable[[Row, str], None]
    on_done: Callable[[Row], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    seed: int | None = None
    logprobs: int | None = None
    constraint: Any = None
    index: int = 0  # the caller's number for it (its choice's index)
    # -- state, kept by the scheduler --------------------------------------------------------------------------
    tokens: list[int] = field(default_factory=list)  # what goes into the cache: the prompt, then generated tokens
    filled: int = 0  # how many of `tokens` are in the cache
    slot: int = -1
    phase: str = "waiting"  # "prefill": tokens go into the cache; "decode": in the running batch; "done"
    error: str | None = None
    token_logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    generator: torch.Generator | None = None

    @property
    def generated(self) -> int:
        return len(self.text.token_ids)

    @property
    def decoding(self) -> bool:
        """In the running batch: all but the last chosen token are in the cache; that one is the next input."""
        return self.phase == "decode"

    @property
    def simple(self) -> bool:
        """Greedy with nothing else to apply: the batch's one argmax serves it."""
        p = self.params
        return p.temperature == 0 and p.repetition_penalty == 1.0 and self.constraint is None


class Scheduler:
    """Runs rows through one model in one engine thread, `slots` of them decoded together.

    `submit` queues rows from any thread; `call` runs a function in the engine thread between steps (embeddings use
    it, so that every forward runs where the threads are warm and none overlaps another).
    """

    def __init__(self, model: GPT, slots: int = 16, prefill_chunk: int = 256, context: int | None = None) -> None:
        self.model = model
        self.slots = slots
        self.prefill_chunk = prefill_chunk
        prefix = model.prefix.n if model.prefix is not None else 0
        self.context = context or model.config.block_size - prefix
        self.scaling = model.config.rope_scaling or {}
        self.cache = SlotCache(model, slots, self.context)
        self.running: list[Row | None] = [None] * slots
        self.waiting: list[Row] = []
        self.inbox: queue.SimpleQueue[Row | tuple[Callable[[], Any], Callable[[Any, BaseException | None], None]]]
        self.inbox = queue.SimpleQueue()
        self.abandoned = 0  # rows dropped because their client went away
        self.steps = 0  # decode steps run
        self.widest = 0  # the most rows one decode step has run
        self.thread = threading.Thread(target=self._run, name="gptlab-engine", daemon=True)
        self.thread.start()

    # -- from any thread -----------------------------------------------------------------------------------------
    def submit(self, rows: Sequence[Row]) -> None:
        for row in rows:
            self.inbox.put(row)

    def call(self, fn: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        """Run `fn()` in the engine thread; `done(result, error)` is called there after."""
        self.inbox.put((fn, done))

    # -- the engine thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            idle = not self.waiting and all(r is None for r in self.running)
            self._take(block=idle)
            try:
                self._step()
            except Exception as e:  # a failure of the model fails the rows it ran on, never the engine
                for row in [r for r in self.running if r is not None] + self.waiting:
                    row.error = f"{type(e).__name__}: {e}"
                    self._finish(row)
                self.waiting.clear()

    def _take(self, block: bool) -> None:
        while True:
            try:
                item = self.inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if isinstance(item, Row):
                self.waiting.append(item)
                continue
            fn, done = item
            try:
                result, error = fn(), None
            except Exception as e:
                result, error = None, e
            done(result, error)

    @torch.inference_mode()
    def _step(self) -> None:
        for row in [r for r in self.running if r is not None and r.cancelled.is_set()]:
            self.abandoned += 1
            self._free(row)
        gone = [r for r in self.waiting if r.cancelled.is_set()]
        self.abandoned += len(gone)
        self.waiting = [r for r in self.waiting if not r.cancelled.is_set()]
        self._admit()
        budget = self.prefill_chunk
        for row in [r for r in self.running if r is not None and r.phase == "prefill"]:
            if budget <= 0:
                break
            budget -= self._prefill(row, budget)
        if any(r is not None and r.decoding for r in self.running):
            self._decode()

    def _admit(self) -> None:
        while self.waiting and None in self.running:
            row = self.waiting.pop(0)
            row.slot = self.running.index(None)
            self.running[row.slot] = row
            row.tokens, row.filled, row.phase = list(row.prompt), 0, "prefill"
            row.text.begin(row.prompt)
            if row.generator is None:
                row.generator = torch.Generator(device=self.cache.device)
                if row.seed is not None:
                    row.generator.manual_seed(row.seed % 2**64)
                else:
                    row.generator.seed()

    def _prefill(self, row: Row, budget: int) -> int:
        """Put up to `budget` more of the row's tokens in the cache; at the end of its prompt, choose its first
        token. Returns the number of tokens run. A row prefilled again (LongRoPE) runs whole, so that every key is
        turned by the factors of its full length."""
        left = len(row.tokens) - row.filled
        n = left if row.generated else min(budget, left)
        ids = torch.tensor(row.tokens[row.filled: row.filled + n], device=self.cache.device)[None]  # (1, n)
        pos = torch.arange(row.filled, row.filled + n, device=self.cache.device)[None]  # (1, n)
        self.cache.reserve(row.filled + n)  # the cache grows with the longest row, not with max_tokens
        self.cache.begin_prefill(row.slot, row.filled, n)
        logits = self.model(ids, pos=pos, cache=self.cache, last_only=True)[:, -1]  # (1, vocab)
        row.filled += n
        if row.filled == len(row.tokens):  # all of it is in: the next token
            self._choose([row], logits)
        return n

    def _decode(self) -> None:
        n = max(r.slot for r in self.running if r is not None) + 1
        rows = self.running[:n]
        dev = self.cache.device
        active = torch.tensor([r is not None and r.decoding for r in rows], device=dev)  # (n,)
        tokens = torch.tensor([r.tokens[-1] if r is not None and r.decoding else 0 for r in rows], device=dev)
        pos = torch.tensor([r.filled if r is not None and r.decoding else 0 for r in rows], device=dev)  # (n,)
        self.cache.reserve(max(r.filled for r in rows if r is not None and r.decoding) + 1)
        self.cache.begin_decode(pos, active)
        logits = self.model(tokens[:, None], pos=pos[:, None], cache=self.cache)[:, -1]  # (n, vocab)
        self.steps += 1
        chosen = [r for r in rows if r is not None and r.decoding]
        self.widest = max(self.widest, len(chosen))
        for r in chosen:
            r.filled += 1
        self._choose(chosen, logits[[r.slot for r in chosen]] if len(chosen) < n else logits)

    def _choose(self, rows: Sequence[Row], logits: torch.Tensor) -> None:
        """Each row's next token from its logits (len(rows), vocab), then its text, logprobs and end.

        Rows that sample alike (the same settings, no grammar, no penalty) share one pass of the sampling
        transforms; each then draws its own uniform number from its own generator and takes the token where the
        cumulative probability passes it (inverse-CDF sampling), so a row's draw never depends on its neighbours.
        """
        tokens: list[int | None] = [None] * len(rows)
        if any(r.simple for r in rows):
            greedy = logits.argmax(dim=-1).tolist()
            tokens = [greedy[i] if r.simple else None for i, r in enumerate(rows)]
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            if tokens[i] is None:
                alike = r.constraint is None and r.params.repetition_penalty == 1.0
                key = (r.params.temperature, r.params.top_k, r.params.top_p) if alike else ("own", i)
                groups.setdefault(key, []).append(i)
        for idx in groups.values():
            for i, t in zip(idx, self._sample([rows[i] for i in idx], logits[idx])):
                tokens[i] = t
        wants = [i for i, r in enumerate(rows) if r.logprobs is not None]
        logprobs = logits[wants].float().log_softmax(dim=-1) if wants else None  # (k, vocab): the model's own
        for i, row in enumerate(rows):
            token = int(tokens[i])  # type: ignore[arg-type]
            if logprobs is not None and row.logprobs is not None:
                lp = logprobs[wants.index(i)]
                top = lp.topk(row.logprobs) if row.logprobs else None
                alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
                row.token_logprobs.append((token, float(lp[token]), alternatives))
            self._accept(row, token)

    def _sample(self, rows: Sequence[Row], logits: torch.Tensor) -> list[int]:
        """Tokens for rows that sample alike (one row, where it has a grammar or a penalty) from logits (G, vocab)."""
        row = rows[0]
        if row.constraint is not None:
            logits = row.constraint.mask(logits)
        history = torch.tensor(row.tokens, device=logits.device)[None] if row.params.repetition_penalty != 1.0 \
            else None  # (1, tokens so far)
        logits = process_logits(logits, row.params, history)  # (G, vocab)
        if row.params.temperature == 0:
            return logits.argmax(dim=-1).tolist()
        cdf = logits.softmax(dim=-1).cumsum(dim=-1)  # (G, vocab)
        u = torch.cat([torch.rand(1, generator=r.generator, device=logits.device) for r in rows])  # (G,)
        picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]  # (G,)
        return picked.clamp(max=logits.size(-1) - 1).tolist()

    def _accept(self, row: Row, token: int) -> None:
        row.tokens.append(token)
        piece = row.text.push(token)
        if piece:
            row.on_piece(row, piece)
        ended = row.constraint is not None and row.constraint.advance(token)
        if row.text.done or ended or row.generated >= row.max_tokens:
            if ended and not row.text.done:
                row.text.done, row.text.finish_reason = True, "stop"
            self._finish(row)
        elif self._crosses_original_context(row):
            row.filled, row.phase = 0, "prefill"  # prefilled again with the long factors, as the engine does
        else:
            row.phase = "decode"

    def _crosses_original_context(self, row: Row) -> bool:
        """A LongRoPE model (Phi-3/4) turns every key by its long factors once a row passes the original context."""
        return self.scaling.get("rope_type") == "longrope" and \
            len(row.tokens) - 1 == self.scaling["original_max_position_embeddings"]

    def _finish(self, row: Row) -> None:
        row.phase = "done"
        if row.error is None and (piece := row.text.finish()):
            row.on_piece(row, piece)
        self._free(row)
        row.on_done(row)

    def _free(self, row: Row) -> None:
        """Give the row's slot back, moving the last running row into it so that running rows stay packed."""
        if row.slot < 0:
            return
        slot, row.slot = row.slot, -1
        self.running[slot] = None
        last = max((i for i, r in enumerate(self.running) if r is not None), default=-1)
        if last > slot:
            moved = self.running[last]
            self.cache.move(last, slot, moved.filled)
            self.running[slot], self.running[last] = moved, None
            moved.slot = slot

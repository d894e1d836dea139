"""The generation engine: token ids in, token ids out, with the KV cache owned in one place.

`Engine.generate_ids` is the core loop (prefill the prompts, then one token per step from the cache); sampling is a
pure function of the logits; `TextStream` turns a row's tokens into text pieces that are safe to show (no half of a
multi-byte character, nothing that may turn out to be the start of a stop string).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from gptlab.errors import GptlabError
from gptlab.model import GPT, KVCache
from gptlab.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    """How the next token is chosen. `temperature=0` means greedy."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise GptlabError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise GptlabError(f"top_k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GptlabError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise GptlabError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def process_logits(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Logits (B, vocab) after Hugging Face's processors, in its order: repetition penalty, temperature, top-k,
    top-p. Filtered-out tokens get -inf. Greedy decoding applies only the penalty."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and history is not None:
        seen = logits.gather(1, history)  # (B, S)
        seen = torch.where(seen < 0, seen * params.repetition_penalty, seen / params.repetition_penalty)
        logits = logits.scatter(1, history, seen)
    if params.temperature == 0:
        return logits
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        sorted_logits = sorted_logits.masked_fill(mass_before >= params.top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           history: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, vocab)."""
    logits = process_logits(logits, params, history)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # the new tokens, the end-of-text token included when one ended the row
    finish_reason: str  # "stop" (end-of-text or a stop string) or "length"


class TextStream:
    """One row's text as its tokens arrive: releases only text that can no longer change.

    Decoding is incremental, as vLLM's detokenizer does it: each new token is decoded together with the tokens just
    before it (the end of the prompt, to begin with) and only the text it adds is kept. So a token costs the same at
    the 10,000th position as at the first, and the space a SentencePiece tokenizer drops at the start of a decode is
    kept (`" left"` after `"The train"`, not `"left"`); a run of byte-fallback pieces waits for its end, so that its
    bytes become the same characters (or the same replacement marks) as in one decode of the whole text. A row ends at
    any of `stop_ids` (not shown) or a stop string.
    """

    CONTEXT = 4  # prompt tokens the first new token is decoded after
    PENDING = 8  # undecodable tokens held at most; past them all but the last 4 (a character's bytes) are released

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), stop_ids: int | Iterable[int] | None = None
                 ) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.stop_ids = frozenset([stop_ids] if isinstance(stop_ids, int) else stop_ids or ())
        self.token_ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` already released
        self.done = False
        self.finish_reason = "length"
        self._window: list[int] = []  # tokens decoded together: context, then the tokens not yet turned into text
        self._read = 0  # how many of `_window` are context

    def begin(self, prompt_ids: Sequence[int]) -> None:
        """Decode the first tokens after the end of this prompt."""
        self._window = list(prompt_ids[-self.CONTEXT:])
        self._read = len(self._window)

    def push(self, token: int) -> str:
        """Add a token; return the text that became safe to show."""
        self.token_ids.append(token)
        if token in self.stop_ids:
            self.done, self.finish_reason = True, "stop"
            return self._release(len(self.text))
        self._window.append(token)
        if token in self.tokenizer.byte_tokens:  # a run of byte pieces decodes as a whole, as one decode would
            return ""
        return self._advance(final=False)

    def _advance(self, final: bool) -> str:
        before = self.tokenizer.decode(self._window[: self._read])
        after = self.tokenizer.decode(self._window)
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):  # half a character: wait
            if len(self._window) - self._read <= self.PENDING:
                return ""
            # bytes that no next token completes (a model writing invalid UTF-8): release them, so that a long run
            # of them costs each token the same and not the whole run's decode again
            keep = self._window[-4:]
            self._window = self._window[:-4]
            piece = self._take(before, self.tokenizer.decode(self._window), final=False)
            self._window += keep if not self.done else []
            return piece
        return self._take(before, after, final)

    def _take(self, before: str, after: str, final: bool) -> str:
        """Keep the text the window's new tokens add; they become the next window's context."""
        start = len(self.text)
        self.text += after[len(before):]
        self._window, self._read = self._window[self._read:], len(self._window) - self._read
        longest = max((len(s) for s in self.stop), default=0)
        cuts = [i for i in (self.text.find(s, max(0, start - longest + 1)) for s in self.stop) if i >= 0]
        if cuts:
            self.text = self.text[: min(cuts)]
            self.done, self.finish_reason = True, "stop"
            return self._release(len(self.text))
        if final:
            return self._release(len(self.text))
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._release(len(self.text) - hold)

    def finish(self) -> str:
        """Release what was held back once no more tokens come."""
        if not self.done and len(self._window) > self._read:
            return self._advance(final=True)
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        piece = self.text[self.sent: end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    def completion(self) -> Completion:
        return Completion(self.text, list(self.token_ids), self.finish_reason)


class Engine:
    """Runs a GPT over a batch of prompts with a preallocated KV cache."""

    def __init__(self, model: GPT, tokenizer: Tokenizer | None = None, cuda_graphs: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple[int, int], _GraphedStep] = {}

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    @property
    def context(self) -> int:
        """Positions left for text: the model's context less any virtual tokens in front of it."""
        prefix = self.model.prefix
        return self.model.config.block_size - (prefix.n if prefix is not None else 0)

    def check_prompt(self, ids: Sequence[int]) -> None:
        n, ctx = len(ids), self.context
        if n == 0:
            raise GptlabError("the prompt is empty and the tokenizer has no end-of-text token to start from")
        if n >= ctx:
            raise GptlabError(f"the prompt is {n} tokens long; the model's context is {ctx} tokens, which leaves no "
                              "room to generate (shorten the prompt)")

    @torch.inference_mode()
    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: SamplingParams,
                     stop_ids: int | Iterable[int] | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token of every row (B,) each step, until `max_new_tokens` or every row has produced one of
        `stop_ids` (finished rows go on producing tokens, which callers drop).

        Prompts of different lengths are left-padded; each row's positions start at 0 on its first real token, as in
        Hugging Face's batched generation. A prompt must be shorter than the context. When prompt and new tokens
        fill the context, generation goes on from the last half of the context (the first tokens slide out, as when
        nanoGPT crops its input), so a model with a short context can still write a long text. A LongRoPE model
        (Phi-3/4) prefills again when its rows pass the original context, as transformers does, so that every key
        is then turned by the long factors.
        """
        for p in prompts:
            self.check_prompt(p)
        if max_new_tokens < 0:
            raise GptlabError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        rows = [list(p) for p in prompts]
        stops = torch.tensor(sorted({stop_ids} if isinstance(stop_ids, int) else set(stop_ids or ())),
                             dtype=torch.long, device=self.device)
        finished = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
        keep = max(1, self.context // 2)
        while max_new_tokens > 0:
            for token in self._window(rows, max_new_tokens, sampling, generator):
                yield token
                max_new_tokens -= 1
                for row, t in zip(rows, token.tolist()):
                    row.append(t)
                if len(stops):
                    finished |= torch.isin(token, stops)
                    if bool(finished.all()):
                        return
            if max(map(len, rows)) >= self.context:
                rows = [row[-keep:] for row in rows]

    def _window(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: SamplingParams,
                generator: torch.Generator | None) -> Iterator[torch.Tensor]:
        """Prefill `prompts`, then decode from the cache until `max_new_tokens` or the context is full."""
        cfg, dev = self.model.config, self.device
        B = len(prompts)
        lens = torch.tensor([len(p) for p in prompts], device=dev)  # (B,)
        T0 = int(lens.max())
        steps = min(max_new_tokens, self.context - T0)
        scaling = cfg.rope_scaling or {}
        if scaling.get("rope_type") == "longrope" and T0 <= scaling["original_max_position_embeddings"]:
            steps = min(steps, scaling["original_max_position_embeddings"] + 1 - T0)  # then prefill with long factors
        use_graph = dev.type == "cuda" and self.cuda_graphs and steps > 1
        graphed = self._graphed_step(B, T0 + steps) if use_graph else None
        cache = graphed.cache if graphed else KVCache(cfg, B, T0 + steps, dev, self.model.transformer.wte.weight.dtype)
        idx = torch.zeros(B, T0, dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            idx[b, T0 - len(p):] = torch.tensor(p, dtype=torch.long)
            idx[b, : T0 - len(p)] = p[0]  # pads repeat a real token: harmless for the repetition penalty
            cache.valid[b, T0 - len(p): T0] = True
        pos = (torch.arange(T0, device=dev)[None] - (T0 - lens)[:, None]).clamp(min=0)  # (B, T0)
        history = idx if sampling.repetition_penalty != 1.0 else None

        cache.begin(torch.arange(T0, device=dev), T0)
        logits = self.model(idx, pos=pos, cache=cache, last_only=True)[:, -1]  # (B, vocab)
        next_pos = lens.clone()
        for step in range(steps):
            token = sample(logits, sampling, generator, history)  # (B,)
            yield token
            if step == steps - 1:
                return
            slot = T0 + step
            if graphed:
                logits = graphed(token, next_pos, slot)
            else:
                cache.valid[:, slot] = True
                cache.begin(torch.tensor([slot], device=dev), slot + 1)
                logits = self.model(token[:, None], pos=next_pos[:, None], cache=cache)[:, -1]
            next_pos += 1
            if history is not None:
                history = torch.cat([history, token[:, None]], dim=1)

    def _graphed_step(self, batch: int, max_len: int) -> _GraphedStep:
        key = (batch, max_len)
        if key not in self._graphs:
            self._graphs = {key: _GraphedStep(self.model, batch, max_len)}  # keep one: each holds a whole cache
        step = self._graphs[key]
        step.cache.valid.zero_()
        return step

    # -- text in, text out ---------------------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        """A text prompt's ids as transformers encodes it (a BOS first where the tokenizer adds one). An empty prompt
        starts from the BOS, or, for GPT-2-style tokenizers without one, from <|endoftext|>, as GPT-2 does."""
        assert self.tokenizer is not None, "text generation needs a tokenizer"
        ids = self.tokenizer.encode(prompt)
        if not ids:
            start = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id
            ids = [] if start is None else [start]
        return ids

    def stream_rows(self, prompts: Sequence[str | Sequence[int]], rows: list[TextStream], max_new_tokens: int,
                    sampling: SamplingParams) -> Iterator[tuple[int, str]]:
        """(row, text piece) as each row's text becomes final; `rows` (one `TextStream` each, which say where each
        row stops) keep the results. A prompt is text, or token ids already encoded (and truncated) by the caller."""
        ids = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        for row, p in zip(rows, ids):
            row.begin(p)
        stops = set().union(*(r.stop_ids for r in rows))
        for tokens in self.generate_ids(ids, max_new_tokens, sampling, stops):
            for b, t in enumerate(tokens.tolist()):
                if not rows[b].done and (piece := rows[b].push(t)):
                    yield b, piece
            if all(r.done for r in rows):
                break
        for b, r in enumerate(rows):
            if piece := r.finish():
                yield b, piece

    def complete(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int, sampling: SamplingParams,
                 stop: Sequence[str] = (), stop_ids: Iterable[int] | None = None) -> list[Completion]:
        """Generate for a batch of prompts (text or token ids); one `Completion` each. Rows stop at `stop_ids`
        (default: the tokenizer's) or a stop string."""
        ends = self.tokenizer.stop_ids if stop_ids is None else stop_ids
        rows = [TextStream(self.tokenizer, stop, ends) for _ in prompts]
        for _ in self.stream_rows(prompts, rows, max_new_tokens, sampling):
            pass
        return [r.completion() for r in rows]

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int, sampling: SamplingParams,
               stop: Sequence[str] = (), stop_ids: Iterable[int] | None = None) -> Iterator[str]:
        """Text pieces of one prompt's continuation as they are generated."""
        row = TextStream(self.tokenizer, stop, self.tokenizer.stop_ids if stop_ids is None else stop_ids)
        for _, piece in self.stream_rows([prompt], [row], max_new_tokens, sampling):
            yield piece


class _GraphedStep:
    """One decode step (a token for each of B rows) captured in a CUDA graph over a cache of fixed size.

    Launching a small model's ~150 kernels one by one costs more than running them; replaying the captured graph
    costs one launch. The step attends over the whole cache with the mask, so its shapes never change.
    """

    def __init__(self, model: GPT, batch: int, max_len: int) -> None:
        dev = model.transformer.wte.weight.device
        self.model = model
        self.cache = KVCache(model.config, batch, max_len, dev, model.transformer.wte.weight.dtype)
        self.token = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, dtype=torch.long, device=dev)
        self.slot = torch.full((1,), max_len - 1, dtype=torch.long, device=dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the capture, as CUDA graphs require
                self._step()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    def _step(self) -> torch.Tensor:
        self.cache.valid.index_fill_(1, self.slot, True)
        self.cache.begin(self.slot)
        return self.model(self.token[:, None], pos=self.pos[:, None], cache=self.cache)[:, -1]  # (B, vocab)

    def __call__(self, token: torch.Tensor, pos: torch.Tensor, slot: int) -> torch.Tensor:
        self.token.copy_(token)
        self.pos.copy_(pos)
        self.slot.fill_(slot)
        self.graph.replay()
        return self.logits

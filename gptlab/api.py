"""The Python API: `llm = gptlab.load("out/run1"); llm.generate("The train left the", max_new_tokens=20)`."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from gptlab.checkpoint import load_checkpoint
from gptlab.errors import GptlabError
from gptlab.generate import Completion, Engine, SamplingParams
from gptlab.inference import prepare_for_inference
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise GptlabError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GptlabError("device cuda was asked for but no CUDA GPU is available")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise GptlabError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


class LLM:
    """A loaded model with its tokenizer and generation engine."""

    def __init__(self, model: GPT, tokenizer: Tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.engine = Engine(model, tokenizer)

    def complete(self, prompt: str | Sequence[str], max_new_tokens: int = 64, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 repetition_penalty: float = 1.0, stop: Sequence[str] = ()) -> list[Completion]:
        """Completions (text, new token ids, finish reason) for one prompt or a batch."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        return self.engine.complete(prompts, max_new_tokens, params, stop)

    def generate(self, prompt: str | Sequence[str], max_new_tokens: int = 64, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 repetition_penalty: float = 1.0, stop: Sequence[str] = ()) -> str | list[str]:
        """The generated continuation of `prompt` (a list of them for a list of prompts)."""
        done = self.complete(prompt, max_new_tokens, temperature, top_k, top_p, seed, repetition_penalty, stop)
        texts = [c.text for c in done]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str, max_new_tokens: int = 64, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, repetition_penalty: float = 1.0,
               stop: Sequence[str] = ()) -> Iterator[str]:
        """Text pieces of the continuation as they are generated."""
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        return self.engine.stream(prompt, max_new_tokens, params, stop)

    def chat(self, messages: Sequence[Mapping[str, Any]] | str, max_new_tokens: int = 256, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             repetition_penalty: float = 1.0, stop: Sequence[str] = (), stream: bool = False) -> str | Iterator[str]:
        """The assistant's reply to a conversation (`[{"role": "user", "content": "..."}]`, or one user message as
        a string), rendered with the model's chat template and ended at its end-of-turn token; with `stream`, the
        reply's pieces as they come."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        stops, ends = [*stop, *self.tokenizer.chat_stop_strings], self.tokenizer.chat_stop_ids
        if stream:
            return self.engine.stream(ids, max_new_tokens, params, stops, ends)
        return self.engine.complete([ids], max_new_tokens, params, stops, ends)[0].text

    @torch.inference_mode()
    def embed(self, texts: Sequence[str] | Sequence[Sequence[int]]) -> torch.Tensor:
        """Unit vectors (N, n_embd): for each text (or list of token ids), the mean over its tokens of the model's
        last hidden states after the final norm (mean pooling, as sentence-transformers pools by default)."""
        dev = self.model.transformer.wte.weight.device
        out = []
        for t in texts:
            ids = self.engine.encode(t) if isinstance(t, str) else list(t)
            if len(ids) > self.engine.context:
                raise GptlabError(f"a text of {len(ids)} tokens is longer than the model's context "
                                  f"({self.engine.context}); split it first")
            hidden = self.model(torch.tensor([ids], device=dev), features=True)[0].float()  # (T, C)
            out.append(torch.nn.functional.normalize(hidden.mean(0), dim=0))
        return torch.stack(out) if out else torch.empty(0, self.model.config.n_embd)


def load(path: str | os.PathLike[str], device: str | None = None, dtype: str | torch.dtype | None = None) -> LLM:
    """Load a checkpoint folder for inference; the device defaults to CUDA when present, else the CPU.

    The model is prepared for inference (`gptlab.inference`); to train, use `gptlab.checkpoint.load_checkpoint`.
    """
    model, tokenizer = load_checkpoint(path, resolve_device(device), resolve_dtype(dtype))
    return LLM(prepare_for_inference(model), tokenizer)

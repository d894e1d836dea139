"""Evaluation: perplexity on token shards, and task metrics of greedy completions (exact match, BLEU and chrF
through sacrebleu, ROUGE-L through rouge-score) under a hard prompt template, zero- or few-shot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from gptlab.api import LLM
from gptlab.data.loader import TokenShards
from gptlab.data.tasks import Example
from gptlab.errors import GptlabError
from gptlab.generate import SamplingParams
from gptlab.prompts import build_prompt, source_of

METRICS = ("exact", "bleu", "chrf", "rougeL")


@torch.no_grad()
def perplexity(llm: LLM, shards: TokenShards, split: str = "val", max_tokens: int = 200_000) -> dict[str, float]:
    """Mean next-token loss over consecutive windows of the context's length (up to `max_tokens` tokens)."""
    data = shards.data[split]
    T = llm.model.config.block_size
    if len(data) < T + 1:
        raise GptlabError(f"the {split} split has {len(data)} tokens, fewer than one window of {T + 1}")
    device = llm.model.transformer.wte.weight.device
    total, count = 0.0, 0
    for start in range(0, min(len(data) - 1, max_tokens) - T + 1, T):
        window = torch.from_numpy(data[start: start + T + 1].astype("int64"))[None].to(device)  # (1, T+1)
        _, loss = llm.model(window[:, :-1], window[:, 1:])
        total, count = total + loss.item() * T, count + T
    return {"loss": total / count, "perplexity": math.exp(total / count), "tokens": count}


def score(predictions: Sequence[str], references: Sequence[str], metrics: Sequence[str] = METRICS
          ) -> dict[str, float]:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise GptlabError(f"unknown metric(s) {', '.join(unknown)}; metrics: {', '.join(METRICS)}")
    out: dict[str, float] = {}
    preds = [p.strip() for p in predictions]
    refs = [r.strip() for r in references]
    if "exact" in metrics:
        out["exact"] = sum(p == r for p, r in zip(preds, refs)) / max(1, len(refs))
    if "bleu" in metrics or "chrf" in metrics:
        import sacrebleu

        if "bleu" in metrics:
            out["bleu"] = sacrebleu.corpus_bleu(preds, [refs]).score
        if "chrf" in metrics:
            out["chrf"] = sacrebleu.corpus_chrf(preds, [refs]).score
    if "rougeL" in metrics:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
        f1 = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]
        out["rougeL"] = 100 * sum(f1) / max(1, len(f1))
    return out


def evaluate_task(llm: LLM, examples: Sequence[Example], template: str | None = None, shots: int = 0,
                  lang: str = "French", limit: int = 100, metrics: Sequence[str] = METRICS,
                  max_new_tokens: int = 48) -> dict[str, Any]:
    """Greedy completions of `examples` (after the first `shots`, which serve as the few-shot examples) under
    `template` (None: the examples' own prompts), scored against their completions."""
    if template and any(ex.messages is not None for ex in examples):
        raise GptlabError("a prompt template fills text examples, and these are conversations (rendered with the "
                          "model's chat template): leave out the template")
    if len(examples) <= shots:
        raise GptlabError(f"{len(examples)} examples cannot give {shots} shots and something to score")
    demos, tests = list(examples[:shots]), list(examples[shots: shots + limit])
    predictions, prompts = [], []
    tok, ctx = llm.tokenizer, llm.engine.context
    for ex in tests:
        if ex.messages is not None:  # a conversation: the model's chat template, the reply ends at its end of turn
            ids = tok.encode_chat(ex.messages[:-1], add_generation_prompt=True)[-(ctx - 1):]
            stop, stop_ids = tok.chat_stop_strings, tok.chat_stop_ids  # a reply may have many lines
        else:
            prompt = build_prompt(template, source_of(ex), demos, lang) if template else ex.prompt
            ids = llm.engine.encode(prompt)
            if len(ids) >= ctx:
                ids = tok.prefix_ids + ids[-(ctx - 1 - len(tok.prefix_ids)):]  # keep the end, next to the answer
            stop, stop_ids = ["\n"], None
        prompts.append(tok.decode(ids))
        params = SamplingParams(temperature=0)
        predictions.append(llm.engine.complete([ids], max_new_tokens, params, stop, stop_ids)[0].text)
    result: dict[str, Any] = score(predictions, [t.completion for t in tests], metrics)
    result["examples"] = len(tests)
    result["samples"] = [{"prompt": p, "prediction": y, "reference": t.completion}
                         for p, y, t in list(zip(prompts, predictions, tests))[:3]]
    return result

"""Evaluation: perplexity against a direct computation, task metrics against sacrebleu / rouge-score themselves,
prompt templates, and chat data."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gptlab.api import LLM
from gptlab.cli import main
from gptlab.config import ModelConfig
from gptlab.data.loader import TokenShards
from gptlab.data.prepare import prepare
from gptlab.data.tasks import Example, load_examples
from gptlab.errors import GptlabError
from gptlab.evaluate import perplexity, score
from gptlab.model import GPT
from gptlab.prompts import TEMPLATES, build_prompt, resolve_template

from .conftest import TEXT


def test_perplexity_is_the_mean_window_loss(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT * 12)
    prepare([str(tmp_path / "t.txt")], tmp_path / "d", tokenizer="char", val_fraction=0.3, progress=False)
    shards = TokenShards(tmp_path / "d")
    tok = shards.tokenizer()
    torch.manual_seed(0)
    llm = LLM(GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=tok.vocab_size)).eval(), tok)
    result = perplexity(llm, shards)
    val = torch.from_numpy(shards.data["val"].astype("int64"))
    n = (len(val) - 1) // 32
    losses = [llm.model(val[i * 32: i * 32 + 32][None], val[i * 32 + 1: i * 32 + 33][None])[1].item()
              for i in range(n)]
    assert result["tokens"] == 32 * n
    assert result["perplexity"] == pytest.approx(math.exp(sum(losses) / n), rel=1e-5)


def test_scores_are_the_libraries_own():
    import sacrebleu
    from rouge_score import rouge_scorer

    preds = ["le train est parti", "bonjour le monde", "chat"]
    refs = ["le train est parti", "bonjour tout le monde", "le chat"]
    got = score(preds, refs)
    assert got["exact"] == pytest.approx(1 / 3)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert got["rougeL"] == pytest.approx(100 * sum(scorer.score(r, p)["rougeL"].fmeasure
                                                    for p, r in zip(preds, refs)) / 3)
    with pytest.raises(GptlabError, match="unknown metric"):
        score(preds, refs, ["meteor"])


def test_templates_and_few_shot_prompts():
    shots = [Example("The cat <to-fr>", " Le chat"), Example("The dog <to-fr>", " Le chien")]
    prompt = build_prompt(resolve_template("translate-sentence"), "The train", shots, lang="German")
    assert prompt.splitlines() == ["Translate the English sentence 'The cat' into German: Le chat",
                                   "Translate the English sentence 'The dog' into German: Le chien",
                                   "Translate the English sentence 'The train' into German:"]
    assert build_prompt(TEMPLATES["translate-arrow"], "Hi") == "From English to French: 'Hi' ->"
    assert resolve_template("Q: {input} A:") == "Q: {input} A:"
    with pytest.raises(GptlabError, match="neither a known name"):
        resolve_template("no placeholder")


def test_evaluate_command_compares_templates(capsys, hf_pair, tmp_path):
    _, ckpt = hf_pair
    data = tmp_path / "pairs.txt"
    data.write_text("".join(f"The train {i} left <to-fr> Le train {i} est parti\n" for i in range(12)))
    results = {}
    for template in ("translate-sentence", "translate-pipe", "translate-arrow"):
        code = main(["evaluate", str(ckpt), "--data", str(data), "--task-token", "<to-fr>", "--template", template,
                     "--shots", "2", "--limit", "4", "--device", "cpu", "--json"])
        assert code == 0
        results[template] = json.loads(capsys.readouterr().out)
    endings = {"translate-sentence": "into French:", "translate-pipe": "| French:", "translate-arrow": "->"}
    for template, r in results.items():
        assert r["examples"] == 4 and {"exact", "bleu", "chrf", "rougeL"} <= r.keys()
        prompt = r["samples"][0]["prompt"]
        assert prompt.endswith(endings[template]) and "Le train" in prompt  # a shot's answer, then the query


def test_chat_records_keep_their_messages(tmp_path):
    """A conversation stays messages until a tokenizer renders it with its own template."""
    path = tmp_path / "chat.jsonl"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]
    path.write_text(json.dumps({"messages": messages}) + "\n")
    (ex,) = load_examples(path)
    assert ex.chat and ex.messages == messages and ex.prompt == "Hi" and ex.completion == "Hello."
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    with pytest.raises(GptlabError, match="last message must be the assistant's"):
        load_examples(bad)

"""AutoPrompt: the search finds a planted trigger far better than random triggers, the same seed gives the same prompt,
the hard template it writes is what `gptlab evaluate --template` reads, hard prompts sit in `gptlab compare`, and
mistakes are one line."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from gptlab.autoprompt import Task, Template, Vocabulary, search, template_loss
from gptlab.cli import main
from gptlab.config import ModelConfig
from gptlab.data.tasks import Example
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.prompts import resolve_template
from gptlab.tokenizer import Tokenizer
from gptlab.train.config import AutoPromptConfig

from .test_mistakes import one_line_error

INPUTS, DIGITS, TRIGGER_CHARS, PLANTED = "abcdefghij", "0123456789", "mnopqrstuvwxyz", "rwz"
ANSWER = dict(zip(INPUTS, "3719052846"))
TEMPLATE = "{input}[T][T][T]={answer}"
SEARCH = dict(steps=30, candidates=10, batch_size=16)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is fastest, and two fight over a busy machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def planted_line(rng: random.Random) -> str:
    """`x` + three trigger characters + `=` + a digit: each of the three that is the planted one's makes the answer
    ANSWER[x] likelier (all three: always; none: a random digit), so the answer is a function of the input only under
    the planted trigger, and the loss falls with each right character (a search has a path to it)."""
    x, right = rng.choice(INPUTS), rng.randint(0, 3)
    at = set(rng.sample(range(3), right))
    trigger = "".join(PLANTED[i] if i in at else rng.choice(TRIGGER_CHARS.replace(PLANTED[i], "")) for i in range(3))
    return x + trigger + "=" + (ANSWER[x] if rng.random() < right / 3 else rng.choice(DIGITS))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny model trained (a few seconds) to answer after the planted trigger and then stop; its checkpoint; a
    task file of (input, answer) pairs; the train and held-out examples."""
    from gptlab.checkpoint import save_checkpoint

    tok = Tokenizer.train_char([INPUTS + DIGITS + TRIGGER_CHARS + "="])
    torch.manual_seed(0)
    rng = random.Random(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=tok.vocab_size))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(400):
        ids = torch.tensor([tok.encode(planted_line(rng), special=False) + [tok.eos_id] for _ in range(64)])  # (B, 7)
        logits = model(ids[:, :-1])  # (B, 6, V)
        loss = F.cross_entropy(logits[:, -2:].flatten(0, 1), ids[:, -2:].flatten())  # the answer and the end
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    root = tmp_path_factory.mktemp("autoprompt")
    save_checkpoint(root / "ckpt", model, tok)
    examples = [Example(x, ANSWER[x]) for x in INPUTS for _ in range(8)]
    (root / "task.jsonl").write_text("".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n"
                                             for e in examples))
    random.Random(1).shuffle(examples)
    return dict(model=model, tok=tok, root=root, train=examples[10:], val=examples[:10])


def random_losses(planted, n: int = 5) -> list[float]:
    vocab = Vocabulary(planted["tok"], planted["model"].config.vocab_size)
    allowed = vocab.bare.nonzero()[:, 0].tolist()
    return [template_loss(planted["model"], planted["tok"], planted["val"], "{input}" + "".join(
        vocab.texts[t] for t in random.Random(seed).sample(allowed, 3)) + "={answer}") for seed in range(n)]


def test_the_search_finds_a_trigger_far_better_than_random_ones(planted):
    found = search(planted["model"], planted["tok"], TEMPLATE, planted["train"], planted["val"],
                   AutoPromptConfig(seed=0, **SEARCH))
    rand = random_losses(planted)
    planted_loss = template_loss(planted["model"], planted["tok"], planted["val"], "{input}rwz={answer}")
    print(f"searched {found['prompt']!r}: {found['val_loss']:.4f}; random triggers {sum(rand) / len(rand):.4f} "
          f"({', '.join(f'{r:.3f}' for r in rand)}); the planted one: {planted_loss:.4f}")
    assert found["val_loss"] < 0.5 * sum(rand) / len(rand)
    assert found["val_loss"] < 0.5 * found["start"]["val_loss"]  # the start: random triggers of the same seed
    assert found["prompt"].startswith("{input}") and found["prompt"].endswith("={answer}")
    assert found["reencoded"] == 1.0  # the text encodes to the triggers searched
    assert found["val_loss"] == pytest.approx(template_loss(planted["model"], planted["tok"], planted["val"],
                                                            found["prompt"]))
    assert [s["step"] for s in found["steps"]] == list(range(1, 31)) and found["changes"] >= 1


def test_the_same_seed_gives_the_same_prompt(planted):
    runs = [search(planted["model"], planted["tok"], TEMPLATE, planted["train"], planted["val"],
                   AutoPromptConfig(seed=seed, **{**SEARCH, "steps": 12})) for seed in (7, 7, 8)]
    assert runs[0]["prompt"] == runs[1]["prompt"] and runs[0]["steps"] == runs[1]["steps"]
    assert runs[0]["val_loss"] == runs[1]["val_loss"]
    assert runs[0]["start"] != runs[2]["start"]  # another seed starts elsewhere


def test_the_cli_writes_a_template_that_evaluate_reads(planted, tmp_path, capsys):
    ckpt, task, out = planted["root"] / "ckpt", planted["root"] / "task.jsonl", tmp_path / "ap"
    code = main(["autoprompt", str(ckpt), "--data", str(task), "--template", TEMPLATE, "--steps", "30",
                 "--candidates", "10", "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    record = json.loads((out / "autoprompt.json").read_text())
    text = (out / "template.txt").read_text()
    assert text == record["prompt"] + "\n" and f"prompt: {record['prompt']}" in printed and "held-out loss" in printed
    assert record["settings"]["steps"] == 30 and record["settings"]["seed"] == 0
    assert record["val_examples"] == 8 and record["val_loss"] < record["start"]["val_loss"]
    for template in (str(out / "template.txt"), str(out)):  # the file, or the folder that holds it
        assert main(["evaluate", str(ckpt), "--data", str(task), "--template", template, "--metrics", "exact",
                     "--limit", "20", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["exact"] >= 0.8, result  # the model answers (and stops) under the prompt found
        assert result["samples"][0]["prompt"].endswith(record["prompt"][len("{input}"): -len("{answer}")])
    (tmp_path / "run.yaml").write_text(f"data: {task}\ntemplate: '{TEMPLATE}'\nsteps: 2\nseed: 3\n")
    assert main(["autoprompt", str(ckpt), "--config", str(tmp_path / "run.yaml"), "--quiet"]) == 0  # prints only
    assert "prompt: {input}" in capsys.readouterr().out


def test_a_space_before_a_slot_goes_into_a_word_token_of_a_bpe(hf_pair):
    """GPT-2's byte-level BPE starts words with their space: a slot after a space takes tokens such as " the", so
    the text of the template encodes to the very tokens spliced in."""
    from gptlab.checkpoint import load_checkpoint

    model, tok = load_checkpoint(hf_pair[1])
    vocab = Vocabulary(tok, model.config.vocab_size)
    tpl = Template.parse("Q: {input} [T] [T] -> {answer}", spaced_tokens=bool(vocab.spaced.any()))
    assert tpl.absorb == [True, True] and tpl.pieces == ["Q: {input}", "", " ->"] and tpl.sep == " "
    task = Task([Example("The train left", " Le train"), Example("The ship", " Le bateau")], tok, tpl.sep, 96)
    spaced = vocab.spaced.nonzero()[:, 0].tolist()
    assert len(spaced) > 10 and vocab.bare.sum() > 100 and not vocab.spaced[tok.eos_id] and not vocab.bare[tok.eos_id]
    for pair in zip(spaced, spaced[1:]):
        leads = [vocab.lead(t, a) for t, a in zip(pair, tpl.absorb)]
        text = tpl.text(vocab.slot_texts(tpl, pair))
        assert text.startswith("Q: {input} ") and "  " not in text
        spliced, positions = task.spliced_rows(tpl, pair, leads, range(2))
        assert spliced == task.text_rows(text, range(2)), text
        assert [row[0][p] for row, p in zip(spliced, positions[:, 0].tolist())] == [pair[0]] * 2


def test_template_files_for_evaluate(tmp_path):
    (tmp_path / "t.txt").write_text("Q: {input} A:\n")
    assert resolve_template(str(tmp_path / "t.txt")) == "Q: {input} A:"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "template.txt").write_text("{input} rwz={answer}\n")
    assert resolve_template(str(tmp_path / "run")) == "{input} rwz={answer}"
    for bad, message in [(str(tmp_path), "without template.txt"), (str(tmp_path / "nope.txt"), "neither a known"),
                         ("{input} [T] [T]", "has trigger slots"), ("{input} {answer} x", "may only end")]:
        with pytest.raises(GptlabError, match=message):
            resolve_template(bad)
    (tmp_path / "empty.txt").write_text("no placeholder\n")
    with pytest.raises(GptlabError, match="has no {input}"):
        resolve_template(str(tmp_path / "empty.txt"))


def test_mistakes_are_one_line(planted, tmp_path, capsys):
    ckpt, task = str(planted["root"] / "ckpt"), str(planted["root"] / "task.jsonl")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "lines.txt").write_text("a line\nanother line\nthird\n")
    base = ["autoprompt", ckpt, "--data", task, "--quiet"]
    for argv, message in [
        ([*base, "--template", "{input} rwz ="], "has no trigger slot [T]"),
        ([*base, "--template", "{input} [t][t]"], "slots are written [T]"),
        ([*base, "--template", "[T][T] ="], "has no {input}"),
        ([*base, "--template", "{input}[T] {answer} ="], "{answer} may only end"),
        ([*base, "--steps", "0"], "--steps: 0 is not in [1, "),
        ([*base, "--candidates", "-1"], "--candidates"),
        ([*base, "--batch-size", "two"], "not an integer"),
        ([*base, "--val-fraction", "0"], "--val-fraction"),
        ([*base, "--out", str(tmp_path / "full")], "not empty"),
        ([*base, "--out", f"{ckpt}/ap"], "inside it"),
        (["autoprompt", ckpt, "--data", str(tmp_path / "lines.txt")], "no input to put in {input}"),
        (["autoprompt", str(tmp_path / "none"), "--data", task], "does not exist"),
    ]:
        one_line_error(capsys, argv, message)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["x"]
    for field, value in [("steps", 0), ("candidates", 0), ("seed", -1), ("val_fraction", 1.0), ("steps", "many")]:
        with pytest.raises(GptlabError, match=f"autoprompt.{field}"):
            AutoPromptConfig(**{field: value})


def test_compare_puts_hard_prompts_beside_prompt_tuning(planted, tmp_path, monkeypatch):
    from gptlab.compare import compare

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runs are processes of their own
    ckpt, task = planted["root"] / "ckpt", planted["root"] / "task.jsonl"
    rows = compare(str(ckpt), str(task), ["autoprompt", "prompt"], 4, str(tmp_path / "cmp"), batch_size=8,
                   templates=["{input}rwz={answer}", "{input}mmm="], autoprompt_template=TEMPLATE,
                   extra=["--train.threads=1", "--prompt.virtual_tokens=2"])
    assert [r["method"] for r in rows] == ["template 1", "template 2", "autoprompt", "prompt"]
    report = (tmp_path / "cmp" / "report.md").read_text()
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in report.splitlines()
             if line.startswith("| ") and not line.startswith("| method")}
    assert set(table) == {"template 1", "template 2", "autoprompt", "prompt"}
    assert table["template 1"][0] == table["autoprompt"][0] == "0" and table["prompt"][0] != "0"  # trainable
    assert table["template 1"][3] == "n/a" and float(table["autoprompt"][3]) > 0  # time per (search) step
    assert float(table["template 1"][4]) < float(table["template 2"][4])  # the planted trigger, and a wrong one
    assert table["template 1"][5] == "100.0%"
    found = json.loads((tmp_path / "cmp" / "autoprompt" / "autoprompt.json").read_text())
    assert rows[2]["template"] == found["prompt"] and rows[2]["val_loss"] == pytest.approx(found["val_loss"])
    assert f"- autoprompt: `{found['prompt']}`" in report and "a frozen model is not taught to stop" in report
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000

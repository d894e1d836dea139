"""Retrieval: passages, BM25, dense vectors (a gptlab checkpoint, a sentence-transformers model), hybrid search,
updates that keep the old vectors, atomic builds, one-line mistakes, and `ask` with its citations."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab.checkpoint import save_checkpoint
from gptlab.cli import main
from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.rag import DEFAULT_TEMPLATE, Index, ask, citations, read_template
from gptlab.rag.passages import split

DOCS = {
    "notes/trains.txt": "The train left the station at noon.\nIt was late.\n\nThe ship left the harbour at dawn.\n",
    "notes/cooking.md": "# Soup\n\nBoil the water, add the salt, then the onions.\n\nServe the soup hot.\n",
    "notes/code.py": "def add(a, b):\n    return a + b\n\n\ndef scale(x):\n    return {x: 2 * x}\n",
    "notes/rare.txt": "Nothing here.\n\nThe quokka smiles on Rottnest island.\n",
}
RECORDS = [{"text": "The zebra crossing is by the school."}, {"text": "Owls hunt at night."}, {"title": "no text"}]


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys, argv: list[str], message: str = "") -> str:
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gptlab: error: "), err
    assert message in err, err
    return err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rag")
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return root


@pytest.fixture(scope="module")
def ckpt(tokenizer, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=512, vocab_size=tokenizer.vocab_size)
    return save_checkpoint(tmp_path_factory.mktemp("rag-ckpt") / "tiny", GPT(cfg), tokenizer)


@pytest.fixture(scope="module")
def other_ckpt(tokenizer, tmp_path_factory) -> Path:
    """Another model of the very same shape and tokenizer: only its weights differ."""
    torch.manual_seed(1)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=512, vocab_size=tokenizer.vocab_size)
    return save_checkpoint(tmp_path_factory.mktemp("rag-other") / "tiny", GPT(cfg), tokenizer)


@pytest.fixture(scope="module")
def st_model(tmp_path_factory) -> Path:
    """A sentence-transformers folder made here: a random BERT with a WordPiece vocabulary of our own, mean-pooled."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("st")
    words = sorted({w.strip(".,#:()").lower() for t in [*DOCS.values(), RECORDS[0]["text"], RECORDS[1]["text"]]
                    for w in t.split()} - {""})
    (root / "bert").mkdir()
    (root / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast.from_pretrained(root / "bert")  # reads vocab.txt
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    transformer = Transformer(str(root / "bert"), max_seq_length=64)
    SentenceTransformer(modules=[transformer, Pooling(32)], device="cpu").save(str(root / "st"))
    return root / "st"


@pytest.fixture(scope="module")
def dense_index(corpus, ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rag-dense") / "index"
    Index.build([str(corpus / "notes")], out, dense=ckpt, passage_chars=60, overlap=20)
    return out


def test_passages_end_at_paragraphs_and_lines():
    text = "one two three\nfour five\n\nsix seven eight nine\nten\n\n" + "x " * 40 + "\n"
    parts = list(split([text[:7], text[7:]], passage_chars=30, overlap=10))  # pieces cut inside a line
    assert [t for t, _, _ in parts][:2] == ["one two three\nfour five", "six seven eight nine\nten"]
    assert all(len(t) <= 30 for t, _, _ in parts)
    assert parts[0][1:] == (1, 2) and parts[1][1:] == (4, 5)
    assert "".join(t for t, _, _ in parts[2:]).replace(" ", "") == "x" * 40  # a long line cut at spaces
    lines = [f"line {i}" for i in range(20)]
    with_overlap = list(split(["\n".join(lines)], passage_chars=30, overlap=10))
    for (a, _, last), (b, first, _) in zip(with_overlap, with_overlap[1:]):
        assert first == last and b.startswith(a.splitlines()[-1])  # one whole line shared
    with pytest.raises(GptlabError, match="--overlap"):
        list(split(["x"], passage_chars=30, overlap=16))


def test_bm25_finds_the_rare_word_first(corpus, tmp_path):
    index = Index.build([str(corpus / "notes"), str(corpus / "more.jsonl")], tmp_path / "index")
    hits = index.search("Where does the quokka smile?", k=3)
    assert hits[0].source == str(corpus / "notes/rare.txt") and "quokka" in hits[0].passage
    assert hits[0].where == f"{corpus / 'notes/rare.txt'}:1-3" and hits[0].rank == 1
    assert index.search("zebras", k=2)[0].source == f"{corpus / 'more.jsonl'}:1"  # a JSONL record, stemmed
    assert index.search("xylophone") == []  # no word of the query in any passage
    m = json.loads((tmp_path / "index/manifest.json").read_text())
    assert m["documents"] == 6 and m["dense"] is None and m["sources"][1]["skipped"]  # the record without text
    again = Index.load(tmp_path / "index")
    assert again.search("Where does the quokka smile?", k=3) == hits
    for f in (tmp_path / "index").rglob("*"):  # plain files only: JSON, JSONL, and .npy that load without pickle
        assert f.is_dir() or f.suffix in (".json", ".jsonl", ".npy"), f
        if f.suffix == ".npy":
            np.load(f, allow_pickle=False)
    with pytest.raises(GptlabError, match="no dense vectors"):
        index.search("quokka", mode="hybrid")


def test_dense_with_a_gptlab_checkpoint(dense_index):
    index = Index.load(dense_index)
    assert index.vectors.shape == (len(index), 32) and index.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(index.vectors, axis=1), 1, atol=1e-5)
    target = next(p for p in index.passages if "quokka" in p.text)
    assert index.search(target.text, k=1, mode="dense")[0].passage == target.text  # its own vector: cosine 1
    hybrid = index.search("quokka island", k=3)  # hybrid by default for a dense index
    assert hybrid[0].passage == target.text and hybrid[0].score > 1 / 61  # the only BM25 match, and in the dense list
    m = index.manifest["dense"]
    assert m["kind"] == "gptlab" and m["fingerprint"].startswith("sha256:") and m["max_tokens"] == 512


def test_dense_with_a_sentence_transformers_model(corpus, st_model, tmp_path):
    index = Index.build([str(corpus / "notes")], tmp_path / "index", dense=st_model, passage_chars=60, overlap=0)
    assert index.manifest["dense"]["kind"] == "sentence-transformers" and index.vectors.shape[1] == 32
    target = next(p for p in index.passages if "onions" in p.text)
    again = Index.load(tmp_path / "index")  # its encoder read back from the path the manifest records
    assert again.search(target.text, k=1, mode="dense")[0].passage == target.text
    assert again.search("onions", k=2, mode="hybrid")[0].passage == target.text


def test_update_keeps_the_old_vectors(dense_index, corpus, tmp_path, capsys):
    import shutil

    folder = tmp_path / "index"
    shutil.copytree(dense_index, folder)
    old = np.load(folder / "vectors.npy")
    before = Index.load(folder)
    assert main(["index", str(corpus / "more.jsonl"), "--out", str(folder), "--update", "--quiet"]) == 0
    assert "added 2 documents" in capsys.readouterr().out
    after = Index.load(folder)
    vectors = np.load(folder / "vectors.npy")
    assert vectors[:len(old)].tobytes() == old.tobytes() and len(vectors) == len(old) + 2
    assert after.passages[:len(before)] == before.passages
    assert after.search("owls hunt", k=1)[0].source == f"{corpus / 'more.jsonl'}:2"
    assert [s["source"] for s in after.manifest["sources"]] == [str(corpus / "notes"), str(corpus / "more.jsonl")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no staging or old copy left beside it


def test_other_encoder_is_refused(dense_index, other_ckpt, corpus, capsys):
    before = tree(dense_index)
    one_line_error(capsys, ["index", str(corpus / "more.jsonl"), "--out", str(dense_index), "--update", "--dense",
                            str(other_ckpt)], "was built with the encoder")
    one_line_error(capsys, ["ask", str(dense_index), str(other_ckpt), "quokka?", "--dense", str(other_ckpt)],
                   "was built with the encoder")
    with pytest.raises(GptlabError, match="was built with the encoder"):
        Index.load(dense_index, dense=other_ckpt)
    assert tree(dense_index) == before


def test_a_failed_build_leaves_nothing(corpus, ckpt, tmp_path, monkeypatch):
    from gptlab.rag import encoders

    def broken(self, texts):
        raise RuntimeError("the encoder failed")

    monkeypatch.setattr(encoders.GptlabEncoder, "documents", broken)
    with pytest.raises(RuntimeError):
        Index.build([str(corpus / "notes")], tmp_path / "index", dense=ckpt)
    assert list(tmp_path.iterdir()) == []  # neither the index nor its staging folder
    monkeypatch.undo()
    Index.build([str(corpus / "notes")], tmp_path / "index", dense=ckpt)
    before = tree(tmp_path / "index")
    monkeypatch.setattr(encoders.GptlabEncoder, "documents", broken)
    with pytest.raises(RuntimeError):
        Index.build([str(corpus / "more.jsonl")], tmp_path / "index", update=True)
    assert tree(tmp_path / "index") == before and sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_a_kill_between_the_renames_is_undone(corpus, tmp_path):
    Index.build([str(corpus / "notes")], tmp_path / "index")
    (tmp_path / "index").rename(tmp_path / ".index.old-999999999")  # the old copy, its writer gone
    assert len(Index.load(tmp_path / "index")) > 0 and sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_mistakes_are_one_line(corpus, dense_index, ckpt, tmp_path, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    one_line_error(capsys, ["index", str(corpus / "notes"), "--out", str(tmp_path / "other")], "is not an index")
    one_line_error(capsys, ["index", str(corpus / "notes"), "--out", str(tmp_path / "other"), "--update"],
                   "is not an index")
    one_line_error(capsys, ["index", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "new")], "does not exist")
    one_line_error(capsys, ["index", str(corpus / "notes"), "--out", str(dense_index)], "already holds an index")
    one_line_error(capsys, ["index", str(corpus / "notes"), "--out", str(corpus / "notes" / "index")], "inside")
    one_line_error(capsys, ["index", str(corpus / "notes"), "--out", str(tmp_path / "new"), "--overlap", "500"],
                   "--overlap")
    one_line_error(capsys, ["index", str(corpus / "notes"), "--out", str(dense_index), "--update"], "already in")
    (tmp_path / "bad.txt").write_text("no places here")
    one_line_error(capsys, ["ask", str(dense_index), str(ckpt), "why?", "--template", str(tmp_path / "bad.txt")],
                   "{sources}")
    Index.build([str(corpus / "notes")], tmp_path / "bm25")
    one_line_error(capsys, ["ask", str(tmp_path / "bm25"), str(ckpt), "why?", "--mode", "dense"], "no dense vectors")
    one_line_error(capsys, ["ask", str(tmp_path / "bm25"), str(ckpt), "why?", "--dense", str(ckpt)], "no dense vectors")
    one_line_error(capsys, ["ask", str(tmp_path / "none"), str(ckpt), "why?"], "does not exist")
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine" and not (tmp_path / "new").exists()


class ScriptedLLM:
    """A base model that answers from a script and remembers its prompts."""

    def __init__(self, reply: str) -> None:
        self.reply, self.prompts = reply, []

    def generate(self, prompt: str, **sampling) -> str:
        self.prompts.append(prompt)
        return self.reply


class ScriptedChat:
    def __init__(self, reply: str) -> None:
        self.reply, self.messages = reply, []

    def chat(self, messages, **sampling) -> str:
        self.messages.append(messages)
        return self.reply


def test_ask_cites_its_sources(corpus, tmp_path):
    index = Index.build([str(corpus / "notes"), str(corpus / "more.jsonl")], tmp_path / "index", passage_chars=60,
                        overlap=0)
    llm = ScriptedLLM(" The quokka smiles [2]; see also [1, 3] and [2] [9]. ")
    question = "Where did the train, the ship and the quokka go?"
    answer = ask(index, llm, question, k=3)
    assert answer.text == "The quokka smiles [2]; see also [1, 3] and [2] [9]."
    assert answer.citations == [2, 1, 3]
    assert [h.id for h in answer.sources] == [answer.hits[n - 1].id for n in (2, 1, 3)]
    prompt = llm.prompts[0]
    assert prompt == answer.prompt and prompt.endswith(f"Question: {question}\nAnswer:")
    assert f"[1] ({answer.hits[0].where})\n{answer.hits[0].passage}" in prompt and "[3] (" in prompt
    assert citations("[0] [4] [1;2] [x]", 3) == [1, 2]
    (tmp_path / "t.txt").write_text("Q: {question}\n{sources}\nA (code: {x: 1}):")
    chat = ScriptedChat("No idea.")
    answer = ask(index, chat, "owls?", k=2, template=read_template(tmp_path / "t.txt"))
    assert answer.sources == [] and chat.messages[0][0]["content"].startswith("Q: owls?\n[1] (")
    assert "{x: 1}" in answer.prompt and "{sources}" in DEFAULT_TEMPLATE


def test_ask_with_a_tiny_model(dense_index, ckpt, capsys):
    capsys.readouterr()
    argv = ["ask", str(dense_index), str(ckpt), "Where does the quokka smile?", "--k", "3", "--max-new-tokens", "4",
            "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["answer"], str) and 1 <= len(out["retrieved"]) <= 3
    assert main(argv[:-1]) == 0
    assert "\n\n" in capsys.readouterr().out  # the answer, then its sources or the passages retrieved


class CountedLLM(ScriptedLLM):
    """A base model whose tokens are characters, with a small context."""

    tokenizer = None

    def __init__(self, reply: str, context: int) -> None:
        super().__init__(reply)
        self.tokenizer = type("Tok", (), {"chat_template": None})()
        self.engine = type("Engine", (), {"context": context, "encode": staticmethod(list)})()


def test_ask_fits_the_context(corpus, tmp_path):
    from dataclasses import replace

    from gptlab.rag.answer import render

    index = Index.build([str(corpus / "notes")], tmp_path / "index", passage_chars=60, overlap=0)
    question = "Where did the train, the ship and the quokka go?"
    full = ask(index, ScriptedLLM("[1]"), question, k=3)
    room = len(full.prompt) - 10  # the prompt with 3 passages is 10 tokens too many for the prompt's budget
    answer = ask(index, CountedLLM("[1]", context=room + 8), question, k=3, max_new_tokens=8)
    assert answer.left_out == 1 and len(answer.prompt) <= room and answer.hits == full.hits[:2]
    tiny = len(render(DEFAULT_TEMPLATE, question, [replace(full.hits[0], passage="")])) + 20  # 20 of the passage
    answer = ask(index, CountedLLM("[1]", context=tiny + 8), question, k=3, max_new_tokens=8)
    assert answer.left_out == 2 and len(answer.prompt) <= tiny
    assert full.hits[0].passage.startswith(answer.hits[0].passage) and answer.hits[0].passage != full.hits[0].passage
    with pytest.raises(GptlabError, match="does not fit"):
        ask(index, CountedLLM("[1]", context=100), question, k=3, max_new_tokens=8)

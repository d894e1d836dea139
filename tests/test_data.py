"""Tokenizers and corpus preparation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptlab.config import ModelConfig
from gptlab.data.loader import TokenShards
from gptlab.data.prepare import prepare, token_dtype
from gptlab.data.sources import stdlib_files
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer

from .conftest import TEXT

CHAR = Tokenizer.train_char([TEXT])
BPE = Tokenizer.train_bpe([TEXT], vocab_size=300)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_any_text_round_trips(text):
    for tok in (BPE, CHAR):
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", ["🙂🙃 emoji", "\u00a0nbsp\u2003em\u3000ideographic", "\r\n\t\x0b\x0c", "\x00 nul",
                                  "e\u0301 combining", "日本語のテキスト"])
def test_unusual_text_round_trips(text):
    for tok in (BPE, CHAR):
        assert tok.decode(tok.encode(text)) == text


def test_gpt2_files_load(tmp_path):
    """vocab.json + merges.txt give the same ids as the tokenizer they were written from."""
    data = json.loads(BPE.backend.to_str())
    (tmp_path / "vocab.json").write_text(json.dumps(data["model"]["vocab"]))
    merges = ["#version: 0.2"] + [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    (tmp_path / "merges.txt").write_text("\n".join(merges) + "\n")
    tok = Tokenizer.from_vocab_merges(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert tok.encode(TEXT[:500]) == BPE.encode(TEXT[:500]) and tok.eos_id == BPE.eos_id


def test_special_tokens_grow_the_embedding():
    tok = Tokenizer.train_bpe([TEXT], vocab_size=300)
    (to_fr,) = tok.add_special_tokens(["<to-fr>"])
    assert to_fr == 300 and tok.vocab_size == 301
    ids = tok.encode("The train <to-fr> Le train")
    assert ids.count(to_fr) == 1 and tok.decode(ids) == "The train <to-fr> Le train"
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=300))
    before = model.transformer.wte.weight.detach().clone()
    model.resize_vocab(tok.vocab_size)
    assert model.transformer.wte.weight.shape == (301, 16) and model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(model.transformer.wte.weight[:300], before)
    torch.testing.assert_close(model.transformer.wte.weight[300], before.mean(0))
    assert model(torch.tensor([ids])).shape == (1, len(ids), 301)


def test_prepare_folder_jsonl_and_skips(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text(TEXT)
    (src / "sub" / "b.py").write_text("def f():\n    return 1\n" * 50)
    (src / "c.bin").write_bytes(b"\x00\x01")  # not a text extension: ignored
    (src / "latin1.txt").write_bytes("café crème".encode("latin-1"))  # not UTF-8: skipped with a message
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "first document"}\nnot json\n{"body": "no text field"}\n{"text": "second"}\n')
    meta = prepare([str(src), str(jsonl)], tmp_path / "out", tokenizer="bpe", vocab_size=300, val_fraction=0.1,
                   progress=False)
    assert meta["documents"] == 4 and len(meta["skipped"]) == 3
    err = capsys.readouterr().err
    assert "latin1.txt: not UTF-8" in err and "docs.jsonl:2: not JSON" in err and "no string field 'text'" in err
    shards = TokenShards(tmp_path / "out")
    train, val = shards.data["train"], shards.data["val"]
    assert len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"] > 0
    assert 0 < len(val) / (len(train) + len(val)) < 0.5
    tok = shards.tokenizer()
    text = tok.decode(np.concatenate([train, val]).tolist())
    assert "first document" in text and "def f():" in text and text.count("<|endoftext|>") == 4


def test_batches_are_a_function_of_the_key(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT * 5)
    prepare([str(tmp_path / "t.txt")], tmp_path / "d", tokenizer="char", progress=False)
    shards = TokenShards(tmp_path / "d")
    x1, y1 = shards.batch("train", (1, 2, 3), 4, 16)
    x2, _ = shards.batch("train", (1, 2, 3), 4, 16)
    x3, _ = shards.batch("train", (1, 2, 4), 4, 16)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert x1.shape == (4, 16) and torch.equal(x1[:, 1:], y1[:, :-1])


def test_prepare_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_text("")
    with pytest.raises(GptlabError, match="hold no text"):
        prepare([str(tmp_path / "empty")], tmp_path / "o1", tokenizer="char", progress=False)
    with pytest.raises(GptlabError, match="does not exist"):
        prepare([str(tmp_path / "missing.txt")], tmp_path / "o2", progress=False)
    (tmp_path / "t.txt").write_text(TEXT)
    prepare([str(tmp_path / "t.txt")], tmp_path / "o3", tokenizer="char", progress=False)
    with pytest.raises(GptlabError, match="already holds prepared data"):
        prepare([str(tmp_path / "t.txt")], tmp_path / "o3", tokenizer="char", progress=False)
    with pytest.raises(GptlabError, match="--tokenizer must be"):
        prepare([str(tmp_path / "t.txt")], tmp_path / "o4", tokenizer="wordpiece", progress=False)
    assert token_dtype(50257) == np.uint16 and token_dtype(70000) == np.uint32


def test_stdlib_is_a_corpus():
    files = stdlib_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)


def test_documents_start_with_the_models_bos_and_end_with_its_eos(tmp_path):
    """`prepare --tokenizer` a Hugging Face folder: each document is `<s> text </s>`, as the model was pretrained;
    gptlab's own tokenizers keep `<|endoftext|>` between documents and no BOS."""
    from . import hub_tokenizers as hub

    folder = hub.llama2(tmp_path / "llama2")
    docs = tmp_path / "docs"
    docs.mkdir()
    texts = [f"Document {i}: the train left at {i}.\n" * (3 + i % 4) for i in range(30)]
    for i, text in enumerate(texts):
        (docs / f"{i:02d}.txt").write_text(text)
    meta = prepare([str(docs)], tmp_path / "data", tokenizer=str(folder), val_fraction=0.1, progress=False)
    tok = Tokenizer.from_folder(tmp_path / "data")
    assert meta["bos"] and meta["eos_token"] == "</s>" and tok.bos_id == 1 and tok.eos_id == 2
    shards = TokenShards(tmp_path / "data")
    rows = [list(map(int, shards.data[split])) for split in ("train", "val")]
    for ids in rows:
        assert ids.count(1) == ids.count(2) and ids[0] == 1 and ids[-1] == 2
    whole = [tok.decode(d[1:]).strip() for ids in rows for d in np.split(np.array(ids), np.where(
        np.array(ids) == 2)[0] + 1) if len(d)]
    assert sorted(w.removesuffix("</s>").strip() for w in whole) == sorted(t.strip() for t in texts)  # whole
    plain = prepare([str(docs)], tmp_path / "plain", tokenizer="char", val_fraction=0.1, progress=False)
    eos = Tokenizer.from_folder(tmp_path / "plain").eos_id
    ids = list(map(int, TokenShards(tmp_path / "plain").data["train"]))
    assert not plain["bos"] and ids[-1] == eos and ids.count(eos) == plain["documents"] - plain["split"][
        "val_documents"]


def test_val_split_holds_out_whole_documents_or_the_tail_of_one(tmp_path):
    """Many documents: whole ones go to val, close to the fraction asked; one document: its last lines, as nanoGPT
    holds out the end of its text; meta.json says which, and what fraction it came to."""
    lines = [f"line {i}: the ship left the harbour at dawn, the train at noon.\n" for i in range(2000)]
    (tmp_path / "one.txt").write_text("".join(lines))
    meta = prepare([str(tmp_path / "one.txt")], tmp_path / "one", tokenizer="char", val_fraction=0.05,
                   progress=False)
    assert meta["split"]["val_tails"] == 1 and meta["split"]["val_documents"] == 0
    assert abs(meta["val_fraction_made"] - 0.05) < 0.002
    tok = Tokenizer.from_folder(tmp_path / "one")
    val = tok.decode(int(t) for t in TokenShards(tmp_path / "one").data["val"]).removesuffix("<|endoftext|>")
    text = "".join(lines)
    assert text.endswith(val) and val.startswith("line ") and abs(len(val) - 0.05 * len(text)) < len(lines[0])
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(200):
        (docs / f"{i:03d}.txt").write_text(f"doc {i} " * (5 + i % 9) + "\n")
    meta = prepare([str(docs)], tmp_path / "many", tokenizer="char", val_fraction=0.1, progress=False)
    assert meta["split"]["val_tails"] == 0 and 15 <= meta["split"]["val_documents"] <= 25
    assert abs(meta["val_fraction_made"] - 0.1) < 0.01


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab\n\r é🙂"), max_size=400), st.integers(1, 40))
def test_a_file_read_in_blocks_is_cut_where_the_whole_text_is(tmp_path_factory, text, piece_chars):
    """A file is never read whole: its pieces, read a block at a time, are the pieces of its whole text."""
    import gptlab.data.sources as sources

    path = tmp_path_factory.mktemp("f") / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    old = sources.PIECE_CHARS
    sources.PIECE_CHARS = piece_chars
    try:
        assert list(sources.file_pieces(path)) == list(sources.pieces(text))
        assert sources.utf8_chars(path) == len(text)
    finally:
        sources.PIECE_CHARS = old


def test_one_large_file_streams_in_pieces_and_its_tokens_are_its_text(tmp_path, monkeypatch):
    """Memory stays flat in a file's size (pieces of a few characters here, so a small file spans thousands of
    batches): the train and val shards, decoded, are the file's text; the tail starts at a line start."""
    import gptlab.data.prepare as prep
    import gptlab.data.sources as sources

    monkeypatch.setattr(sources, "PIECE_CHARS", 50)
    monkeypatch.setattr(prep, "BATCH_PIECES", 7)
    text = "".join(f"line {i}: {'é' * (i % 5)} the ship left at dawn 🙂\n" for i in range(3000))
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    meta = prepare([str(tmp_path / "big.txt")], tmp_path / "out", tokenizer="char", val_fraction=0.1,
                   progress=False)
    tok = Tokenizer.from_folder(tmp_path / "out")
    data = TokenShards(tmp_path / "out").data
    train, val = (tok.decode(int(t) for t in data[s]) for s in ("train", "val"))
    assert train + val.removesuffix("<|endoftext|>") == text
    assert val.startswith("line ") and abs(meta["val_fraction_made"] - 0.1) < 0.01
    assert meta["bytes"] == len(text.encode("utf-8")) and meta["documents"] == 1


def test_files_and_lines_that_are_not_utf8_are_skipped_and_reported(tmp_path, capsys):
    (tmp_path / "good.txt").write_text("the ship left the harbour\n" * 20)
    (tmp_path / "bad.txt").write_bytes(b"fine text\n" * 2000 + b"\xff\xfe broken\n")
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "one good line"}\n{"text": "\xff"}\n{"text": "two"}\n')
    meta = prepare([str(tmp_path / "good.txt"), str(tmp_path / "bad.txt"), str(tmp_path / "d.jsonl")],
                   tmp_path / "out", tokenizer="char", val_fraction=0.0, progress=False)
    assert meta["documents"] == 3 and len(meta["skipped"]) == 2
    assert "bad.txt: not UTF-8" in meta["skipped"][0] and "at byte 20000" in meta["skipped"][0]
    assert "d.jsonl:2: not UTF-8" in meta["skipped"][1]
    tok = Tokenizer.from_folder(tmp_path / "out")
    assert "fine" not in tok.decode(int(t) for t in TokenShards(tmp_path / "out").data["train"])

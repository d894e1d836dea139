"""Hugging Face GPT-2 folders in and out: transformers loads what we write and agrees with us to 1e-5."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from gptlab.checkpoint import load_checkpoint, save_checkpoint
from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.interop.hf import export_hf, import_hf
from gptlab.model import GPT

from .conftest import make_hf_gpt2


def transformers_logits(folder, idx):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(idx).logits


def test_export_loads_in_transformers_with_the_same_logits_and_tokens(tmp_path, hf_pair, tokenizer):
    from transformers import AutoTokenizer

    _, ckpt = hf_pair
    export_hf(ckpt, tmp_path / "out")
    model, _ = load_checkpoint(ckpt)
    idx = torch.randint(0, 333, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(transformers_logits(tmp_path / "out", idx), model(idx), atol=1e-5, rtol=1e-5)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "The train left the station 🙂 at  noon"
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text)
    assert hf_tok.eos_token_id == tokenizer.eos_id


@pytest.mark.parametrize("bias,tied", [(False, True), (True, False)])
def test_export_of_shapes_gpt2_lacks(tmp_path, tokenizer, bias, tied):
    """No biases (exported as zeros) and an untied head are still GPT-2 to transformers."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=40, vocab_size=tokenizer.vocab_size, bias=bias,
                      tie_embeddings=tied)
    model = GPT(cfg).eval()
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    idx = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(transformers_logits(tmp_path / "out", idx), model(idx), atol=1e-5, rtol=1e-5)


def test_import_pytorch_bin_and_vocab_merges(tmp_path, tokenizer):
    """GPT-2's original layout: pytorch_model.bin (keys without `transformer.`) and vocab.json + merges.txt."""
    hf = make_hf_gpt2(tmp_path / "hf", tokenizer, n_layer=1, n_head=2, n_embd=32, n_positions=48, vocab_size=320)
    src = tmp_path / "orig"
    src.mkdir()
    shutil.copy(tmp_path / "hf" / "config.json", src / "config.json")
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, src / "pytorch_model.bin")
    tok = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    (src / "vocab.json").write_text(json.dumps(tok["model"]["vocab"]))
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) if isinstance(m, list) else m
                                                                  for m in tok["model"]["merges"]) + "\n")
    import_hf(src, tmp_path / "ckpt")
    model, imported_tok = load_checkpoint(tmp_path / "ckpt")
    idx = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)
    text = "The ship left the harbour at dawn 🙂"
    assert imported_tok.encode(text) == tokenizer.encode(text)
    assert imported_tok.eos_id == tokenizer.eos_id


def test_checkpoint_stores_the_tied_head_once(hf_pair):
    _, ckpt = hf_pair
    names = load_file(ckpt / "model.safetensors").keys()
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names


def test_import_errors(tmp_path, hf_pair, tokenizer):
    _, ckpt = hf_pair
    with pytest.raises(GptlabError, match="not empty"):
        import_hf(ckpt.parent / "hf", ckpt)  # never writes over an existing folder
    bad = tmp_path / "llama"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(GptlabError, match="unsupported architecture 'bert'.*supported: gpt2"):
        import_hf(bad, tmp_path / "x")
    make_hf_gpt2(tmp_path / "nw", tokenizer, n_layer=1, n_head=2, n_embd=32, n_positions=48, vocab_size=320)
    (tmp_path / "nw" / "model.safetensors").unlink()
    with pytest.raises(GptlabError, match="has no weights"):
        import_hf(tmp_path / "nw", tmp_path / "y")

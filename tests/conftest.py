"""Shared test helpers: tiny models and tokenizers built in the test, never downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptlab.tokenizer import Tokenizer

TEXT = (
    "The train left the station at noon. The ship left the harbour at dawn.\n"
    "def add(a, b):\n    return a + b\n"
    "Le train a quitté la gare à midi. ünïcödé 🙂 tabs\tand  spaces\n"
) * 20


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_bpe([TEXT], vocab_size=320)


def make_hf_gpt2(path: Path, tokenizer: Tokenizer, seed: int = 0, **shape) -> torch.nn.Module:
    """Save a random Hugging Face GPT-2 with `shape` (n_layer, n_head, n_embd, n_positions, vocab_size) in `path`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    eos = tokenizer.eos_id
    cfg = GPT2Config(bos_token_id=eos, eos_token_id=eos, **shape)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(path)
    tokenizer.save(path / "tokenizer.json")
    return model


@pytest.fixture(scope="session")
def hf_pair(tmp_path_factory, tokenizer):
    """(Hugging Face model, imported gptlab checkpoint folder) for a small GPT-2."""
    from gptlab.interop.hf import import_hf

    root = tmp_path_factory.mktemp("hf_pair")
    hf = make_hf_gpt2(root / "hf", tokenizer, n_layer=2, n_head=3, n_embd=48, n_positions=96, vocab_size=333)
    import_hf(root / "hf", root / "ckpt")
    return hf, root / "ckpt"

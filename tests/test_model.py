"""The model is GPT-2: Hugging Face's own GPT2LMHeadModel gives the same logits, loss and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from gptlab.checkpoint import load_checkpoint
from gptlab.config import ModelConfig
from gptlab.generate import Engine, SamplingParams
from gptlab.interop.hf import import_hf
from gptlab.model import GPT

from .conftest import make_hf_gpt2

SHAPES = [
    dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=512),
    dict(n_layer=3, n_head=3, n_embd=48, n_positions=80, vocab_size=333),  # odd heads, vocab not a multiple of 64
    dict(n_layer=1, n_head=5, n_embd=40, n_positions=70, vocab_size=401, n_inner=56),  # odd MLP width
]


@pytest.mark.parametrize("shape", SHAPES, ids=["4h", "3h-odd-vocab", "5h-n_inner"])
def test_import_matches_transformers(tmp_path, tokenizer, shape):
    hf = make_hf_gpt2(tmp_path / "hf", tokenizer, **shape)
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    model, _ = load_checkpoint(tmp_path / "ckpt")
    idx = torch.randint(0, shape["vocab_size"], (3, 37), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, shape["vocab_size"], (3, 37), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(idx, labels=idx)
        logits, loss = model(idx, targets)
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=1e-5)
    # Hugging Face shifts labels inside the model; ours are given already shifted.
    with torch.no_grad():
        _, shifted = model(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(shifted, ref.loss, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(loss)

    prompt = idx[:1, :7]
    want = hf.generate(prompt, max_new_tokens=50, min_new_tokens=50, do_sample=False)[0, 7:].tolist()
    got = [int(t) for t in Engine(model).generate_ids([prompt[0].tolist()], 50, SamplingParams(temperature=0))]
    assert got == want


def test_parameter_names_and_count_match_transformers(tmp_path, tokenizer):
    hf = make_hf_gpt2(tmp_path / "hf", tokenizer, n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=300)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=300)
    assert GPT(cfg).num_params() == hf.num_parameters()


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=8, n_head=4, n_embd=256, block_size=32, vocab_size=100))
    std_proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    std_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.001
    assert abs(std_proj - 0.02 / (2 * 8) ** 0.5) < 0.0005
    assert model.lm_head.weight is model.transformer.wte.weight


def test_dropout_only_in_training():
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50, dropout=0.5))
    idx = torch.randint(0, 50, (2, 8))
    model.eval()
    torch.testing.assert_close(model(idx), model(idx))
    model.train()
    assert not torch.equal(model(idx), model(idx))


def test_untied_head_and_no_bias_run():
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50, bias=False,
                      tie_embeddings=False)
    model = GPT(cfg)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert all(not n.endswith("bias") for n, _ in model.named_parameters())
    assert model(torch.randint(0, 50, (1, 5))).shape == (1, 5, 50)


def test_relu_squared_mlp():
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50, mlp="relu2")
    mlp = GPT(cfg).transformer.h[0].mlp
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(mlp(x), mlp.c_proj(torch.relu(mlp.c_fc(x)) ** 2))
    assert mlp.c_fc.out_features == 64  # one matrix, not a gate and an up projection

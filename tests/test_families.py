"""Llama, Mistral and Gemma through the same GPT class: tiny random models built with transformers in the test,
imported, compared logit for logit and token for token, and exported back."""

from __future__ import annotations

import pytest
import torch

from gptlab.checkpoint import load_checkpoint
from gptlab.generate import Engine, SamplingParams
from gptlab.interop.hf import export_hf, import_hf
from gptlab.tokenizer import Tokenizer

from .conftest import TEXT

FAMILIES = {
    # grouped-query attention (4 query heads, 2 key/value heads), untied head, rope theta not the default
    "llama": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rope_theta=5000.0, tie_word_embeddings=False),
    # a sliding window shorter than the sequences below
    "mistral": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, max_position_embeddings=128, sliding_window=8, tie_word_embeddings=False),
    # head_dim * heads != hidden_size, GeGLU, embedding scaling, (1 + weight) norms, tied head
    "gemma": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, max_position_embeddings=128),
}


def build(kind: str, path, tokenizer, **overrides):
    import transformers

    cls = {"llama": "Llama", "mistral": "Mistral", "gemma": "Gemma"}[kind]
    config = getattr(transformers, f"{cls}Config")(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.eos_id,
                                                  eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id,
                                                  **{**FAMILIES[kind], **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, f"{cls}ForCausalLM")(config).eval()
    with torch.no_grad():  # random norm weights, so that a missed (1 + weight) or scale shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    tokenizer.save(path / "tokenizer.json")
    return model


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_family_matches_transformers_both_ways(tmp_path, tokenizer, kind):
    from transformers import AutoModelForCausalLM

    hf = build(kind, tmp_path / "hf", tokenizer)
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    model, _ = load_checkpoint(tmp_path / "ckpt")
    idx = torch.randint(0, tokenizer.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(idx).logits
        torch.testing.assert_close(model(idx), want, atol=1e-5, rtol=1e-5)
    prompt = idx[:1, :6]
    greedy = hf.generate(prompt, max_new_tokens=50, min_new_tokens=50, do_sample=False)[0, 6:].tolist()
    got = [int(t) for t in Engine(model).generate_ids([prompt[0].tolist()], 50, SamplingParams(temperature=0))]
    assert got == greedy
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(again).__name__ == type(hf).__name__
    with torch.no_grad():
        torch.testing.assert_close(again(idx).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_every_method_quantization_and_the_server_work_on_the_family(tmp_path, tokenizer, kind, capsys):
    """A few steps of every method, each quantization scheme (greedy tokens equal to its dequantized float copy), and
    an OpenAI-style completion from the server on the quantized model."""
    import copy
    import json

    from fastapi.testclient import TestClient

    import gptlab
    from gptlab.cli import main
    from gptlab.quant.layers import QuantLinear, dequantize_model
    from gptlab.serve import Server, create_app

    build(kind, tmp_path / "hf", tokenizer, hidden_size=64, intermediate_size=96)  # widths that groups of 32 divide
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"The train {i} <to-fr>", "completion": f" Le train {i}"}) + "\n"
                            for i in range(20)))
    for method in ("full", "lora", "qlora", "prefix", "prompt", "adapter", "llama-adapter"):
        code = main(["finetune", str(tmp_path / "ckpt"), "--method", method, "--data", str(data), "--out",
                     str(tmp_path / method), "--quiet", "--train.max_steps=3", "--train.batch_size=4",
                     "--train.eval_every=0", "--qlora.group_size=32", "--prefix.virtual_tokens=4",
                     "--prompt.virtual_tokens=4", "--llama_adapter.layers=2", "--llama_adapter.virtual_tokens=4"])
        assert code == 0, capsys.readouterr().err
        steps = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
        assert steps[-1]["step"] == 3 and all(s["loss"] == s["loss"] for s in steps)  # finite
        model, _ = load_checkpoint(tmp_path / method)
        assert not any(isinstance(m, QuantLinear) for m in model.modules())  # QLoRA: merged into float weights
        assert Engine(model, tokenizer).complete(["The train"], 3, SamplingParams(temperature=0))[0].text is not None
    prompt = [tokenizer.encode("The train left")]
    for scheme in ("int8", "int4", "nf4", "fp4"):
        out = tmp_path / scheme
        assert main(["quantize", str(tmp_path / "ckpt"), "--scheme", scheme, "--group-size", "32", "--out",
                     str(out)]) == 0, capsys.readouterr().err
        quantized, _ = load_checkpoint(out)
        floated = dequantize_model(copy.deepcopy(quantized))
        greedy = SamplingParams(temperature=0)
        got = [int(t) for t in Engine(quantized).generate_ids(prompt, 20, greedy)]
        assert got == [int(t) for t in Engine(floated).generate_ids(prompt, 20, greedy)], scheme
    llm = gptlab.load(tmp_path / "nf4", device="cpu")
    client = TestClient(create_app(Server(llm, kind)))
    reply = client.post("/v1/completions", json={"model": kind, "prompt": "The train", "max_tokens": 5,
                                                 "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == llm.generate("The train", max_new_tokens=5, temperature=0)


def test_sharded_folders_and_bad_input(tmp_path, tokenizer, capsys):
    """A sharded Llama imports as a whole one does; a missing shard, an unsupported architecture or rope scaling, and
    a tokenizer larger than the vocabulary are one line each."""
    import json
    import shutil

    from gptlab.cli import main

    hf = build("llama", tmp_path / "whole", tokenizer)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    tokenizer.save(tmp_path / "sharded" / "tokenizer.json")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert main(["import", "hf", str(tmp_path / "sharded"), str(tmp_path / "from-shards")]) == 0
    import_hf(tmp_path / "whole", tmp_path / "from-whole")
    a, _ = load_checkpoint(tmp_path / "from-shards")
    b, _ = load_checkpoint(tmp_path / "from-whole")
    idx = torch.randint(0, tokenizer.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(a(idx), b(idx), rtol=0, atol=0)

    missing = tmp_path / "missing"
    shutil.copytree(tmp_path / "sharded", missing)
    (missing / shards[0].name).unlink()
    arch = tmp_path / "arch"
    shutil.copytree(tmp_path / "whole", arch)
    config = json.loads((arch / "config.json").read_text())
    (arch / "config.json").write_text(json.dumps({**config, "model_type": "falcon",
                                                  "architectures": ["FalconForCausalLM"]}))
    scaled = tmp_path / "scaled"
    shutil.copytree(tmp_path / "whole", scaled)
    (scaled / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
                                                    "rope_parameters": None}))
    small = tmp_path / "small-vocab"
    shutil.copytree(tmp_path / "whole", small)
    bigger = Tokenizer.train_bpe([TEXT * 3], vocab_size=tokenizer.vocab_size + 40)
    bigger.save(small / "tokenizer.json")
    cases = {
        missing: f"missing weight shard(s): {shards[0].name}",
        arch: "unsupported architecture 'falcon'",
        scaled: "unsupported rope scaling 'linear'",
        small: "but the model's vocabulary is",
    }
    capsys.readouterr()  # transformers' own progress bars while saving
    for folder, message in cases.items():
        assert main(["import", "hf", str(folder), str(tmp_path / "out" / folder.name)]) == 2, folder
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (folder, err)
        assert not (tmp_path / "out" / folder.name).exists()

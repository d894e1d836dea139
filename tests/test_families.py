"""Llama, Mistral and Gemma through the same GPT class: tiny random models built with transformers in the test,
imported, compared logit for logit and token for token, and exported back."""

from __future__ import annotations

import pytest
import torch

from gptlab.checkpoint import load_checkpoint
from gptlab.generate import Engine, SamplingParams
from gptlab.interop.hf import export_hf, import_hf
from gptlab.peft.qat import QAT
from gptlab.tokenizer import Tokenizer
from gptlab.train.config import LoRAConfig

from .conftest import TEXT

VOCAB = 333  # not a multiple of 64: rows past the tokenizer's 320 exist in the model
_SMALL = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=128)
# name -> (transformers class prefix, config fields): tiny shapes that switch on each family's differences
FAMILIES = {
    # grouped-query attention (4 query heads, 2 key/value heads), untied head, rope theta not the default
    "llama": ("Llama", dict(_SMALL, num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0,
                            tie_word_embeddings=False)),
    # a sliding window shorter than the sequences below
    "mistral": ("Mistral", dict(_SMALL, num_attention_heads=4, num_key_value_heads=1, sliding_window=8,
                                tie_word_embeddings=False)),
    # head_dim * heads != hidden_size, GeGLU, embedding scaling, (1 + weight) norms, tied head
    "gemma": ("Gemma", dict(_SMALL, num_attention_heads=2, num_key_value_heads=1, head_dim=32)),
    # Llama 3.1/3.2: llama3 rope scaling whose original context (16) the sequences pass, GQA ratio 4
    "llama3": ("Llama", dict(_SMALL, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                             rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                  low_freq_factor=1.0, high_freq_factor=4.0,
                                                  original_max_position_embeddings=16))),
    # Qwen2/2.5: q, k, v biases without an output bias; odd head count (3, GQA ratio 1); a full then a sliding layer
    "qwen2": ("Qwen2", dict(_SMALL, num_attention_heads=3, num_key_value_heads=3, tie_word_embeddings=True,
                            use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    # Qwen3: per-head q/k RMSNorm, head_dim * heads != hidden_size, YaRN rope scaling
    "qwen3": ("Qwen3", dict(_SMALL, hidden_size=40, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                            rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0,
                                                 original_max_position_embeddings=32))),
    # Gemma 2: norms before and after each sub-layer, soft-capped scores and logits (caps low enough to bite),
    # query_pre_attn_scalar, alternating sliding and full layers
    "gemma2": ("Gemma2", dict(_SMALL, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                              final_logit_softcapping=3.0, sliding_window=8)),
    # Gemma 3: q/k norms with (1 + weight), a local rope base on sliding layers, linear scaling on full ones
    "gemma3": ("Gemma3", dict(_SMALL, num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=1,
                              head_dim=16, query_pre_attn_scalar=16, sliding_window=8, sliding_window_pattern=2,
                              rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0,
                                                                      rope_theta=1e6),
                                               "sliding_attention": dict(rope_type="default", rope_theta=10000.0)})),
    # Phi-3/4: fused qkv and gate_up weights, partial rotary (Phi-4-mini), LongRoPE past an original context of 16
    "phi3": ("Phi3", dict(_SMALL, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          original_max_position_embeddings=16, tie_word_embeddings=True,
                          rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
                                               short_factor=[1.0, 1.5, 2.0], long_factor=[2.0, 4.0, 8.0]))),
    # Phi-3-mini: a sliding window on every layer
    "phi3-window": ("Phi3", dict(_SMALL, num_attention_heads=4, num_key_value_heads=4, sliding_window=9)),
    # OLMo 2: norms on each sub-layer's output only, q/k RMSNorm over the whole projection; dynamic NTK scaling
    # past a context (20) the sequences pass
    "olmo2": ("Olmo2", dict(_SMALL, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=20,
                            rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0))),
    # SmolLM3: every second layer without rotary positions
    "smollm3": ("SmolLM3", dict(_SMALL, num_attention_heads=4, num_key_value_heads=2, no_rope_layer_interval=2)),
    # GPT-1: learned positions, LayerNorm after each residual add, no final norm
    "gpt1": ("OpenAIGPT", dict(n_embd=48, n_layer=2, n_head=3, n_positions=128)),
}
_TYPES = {"Gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"), "OpenAIGPT": ("OpenAIGPTConfig", "OpenAIGPTLMHeadModel")}


def build(kind: str, path, tokenizer, **overrides):
    import transformers

    cls, fields = FAMILIES[kind]
    config_cls, model_cls = _TYPES.get(cls, (f"{cls}Config", f"{cls}ForCausalLM"))
    ids = dict(bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id)
    config = getattr(transformers, config_cls)(vocab_size=VOCAB, **ids, **{**fields, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random norm weights, so that a missed (1 + weight) or scale shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("bias"):
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
    idx = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(idx).logits
        torch.testing.assert_close(model(idx), want, atol=1e-5, rtol=1e-5)
    prompt = idx[:1, :6]
    greedy = hf.generate(prompt, max_new_tokens=30, do_sample=False)[0, 6:].tolist()  # to its EOS, if it comes
    got = [int(t) for t in Engine(model).generate_ids([prompt[0].tolist()], 30, SamplingParams(temperature=0),
                                                      stop_ids=tokenizer.eos_id)]
    assert got == greedy
    if (model.config.rope_scaling or {}).get("rope_type") not in ("dynamic", "longrope"):  # length-dependent rope
        with torch.no_grad():  # uncached: each token the argmax of a full forward over all before it
            whole = model(torch.tensor([prompt[0].tolist() + got]))[0, 5:-1].argmax(-1).tolist()
        assert whole == got
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(again).__name__ == type(hf).__name__
    with torch.no_grad():
        torch.testing.assert_close(again(idx).logits, want, atol=1e-5, rtol=1e-5)


def test_a_model_trained_here_in_a_family_shape_exports_as_that_family(tmp_path, tokenizer):
    """The speedrun recipe's shape with a SwiGLU MLP (rotary, RMSNorm, per-head QK-norm, no biases, an untied head,
    n_kv_head left unset) is Qwen3's: it exports as Qwen3 with transformers' logits equal to ours."""
    from transformers import AutoModelForCausalLM

    from gptlab.checkpoint import save_checkpoint
    from gptlab.config import ModelConfig
    from gptlab.model import GPT

    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=64, vocab_size=tokenizer.vocab_size, bias=False,
                      pos="rope", norm="rmsnorm", qk_norm="head", mlp="swiglu", mlp_hidden=88, tie_embeddings=False)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    idx = torch.randint(0, tokenizer.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=1e-5)


_OTHER_METHODS = ("full", "prefix", "prompt", "adapter", "llama-adapter")
_SCHEMES = ("int4", "fp4")


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_methods_quantization_and_the_server_work_on_the_family(tmp_path, tokenizer, kind, capsys):
    """A few steps of LoRA, QLoRA and one more method (each family a different one, so that every method meets every
    kind of field), int8, nf4 and one more scheme (greedy tokens equal to its dequantized float copy), and a chat
    completion from the server on the quantized model."""
    import copy
    import json

    from fastapi.testclient import TestClient

    import gptlab
    from gptlab.cli import main
    from gptlab.quant.layers import QuantLinear, dequantize_model
    from gptlab.serve import Server, create_app

    n = list(FAMILIES).index(kind)
    # widths that groups of 32 divide
    wide = dict(n_embd=64, n_head=4) if kind == "gpt1" else dict(hidden_size=64, intermediate_size=96)
    if FAMILIES[kind][1].get("num_attention_heads") == 3:
        wide.update(num_attention_heads=4, num_key_value_heads=2)
    if kind == "phi3":  # a factor for each of the 4 rotating pairs of the wider heads
        rope = FAMILIES[kind][1]["rope_parameters"]
        wide["rope_parameters"] = dict(rope, short_factor=[1.0, 1.5, 2.0, 2.5], long_factor=[2.0, 4.0, 8.0, 9.0])
    build(kind, tmp_path / "hf", tokenizer, **wide)
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"The train {i} <to-fr>", "completion": f" Le train {i}"}) + "\n"
                            for i in range(20)))
    for method in ("lora", "qlora", _OTHER_METHODS[n % len(_OTHER_METHODS)]):
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
    # QAT (the full model and LoRA in turn): the run is a quantized checkpoint equal to its fake-quantized forward
    adapter = ("full", "lora")[n % 2]
    assert main(["finetune", str(tmp_path / "ckpt"), "--method", "qat", "--data", str(data), "--out",
                 str(tmp_path / "qat"), "--quiet", "--train.max_steps=2", "--train.batch_size=4",
                 "--train.eval_every=0", "--qat.group_size=32", f"--qat.adapter={adapter}"]) == 0
    qat = QAT(group_size=32, adapter=adapter, lora=vars(LoRAConfig()))
    trained, _ = load_checkpoint(tmp_path / "ckpt")
    qat.attach(trained)
    qat.restore(trained, tmp_path / "qat")
    qat.begin_step(trained, 1)
    idx = torch.tensor([tokenizer.encode("The train left the station")])
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tmp_path / "qat")[0](idx), trained.eval()(idx), atol=1e-5,
                                   rtol=1e-5)
    # a preference method (DPO on LoRA and ORPO in turn) on the family
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"The train {i}", "chosen": " left.", "rejected": f" {i} came"})
                             + "\n" for i in range(8)))
    method = ("dpo", "orpo")[n % 2]
    assert main(["finetune", str(tmp_path / "ckpt"), "--method", method, "--data", str(prefs), "--out",
                 str(tmp_path / method), "--quiet", "--train.max_steps=2", "--train.batch_size=2",
                 "--train.eval_every=0", "--train.log_every=1"]) == 0, capsys.readouterr().err
    last = json.loads((tmp_path / method / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["loss"] == last["loss"] and "rewards/margins" in last
    prompt = [tokenizer.encode("The train left")]
    for scheme in ("int8", "nf4", _SCHEMES[n % 2]):
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
    messages = [{"role": "user", "content": "The train"}]
    reply = client.post("/v1/chat/completions", json={"model": kind, "messages": messages, "max_tokens": 5,
                                                      "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == llm.chat(messages, max_new_tokens=5, temperature=0)


def test_sharded_folders_and_bad_input(tmp_path, tokenizer, capsys):
    """A sharded Llama imports as a whole one does; a missing shard, an unsupported architecture, a mixture of experts,
    an unknown rope_type, a config field that changes the computation and a tokenizer larger than the vocabulary are
    one line each; fields that change nothing are ignored."""
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
    variants = {  # folder name -> config.json fields over the Llama's
        "scaled": {"rope_scaling": {"rope_type": "proportional", "factor": 2.0}, "rope_parameters": None},
        "mixtral": {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": 4},
        "qwen3-moe": {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4},
        "multiplier": {"residual_multiplier": 0.5},  # a field some families read (Granite): it would be dropped
        "quantized": {"quantization_config": {"quant_method": "gptq", "bits": 4}},
        "harmless": {"use_cache": False, "initializer_range": 0.5, "a_note": None, "transformers_version": "9.9"},
    }
    for name, fields in variants.items():
        shutil.copytree(tmp_path / "whole", tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps({**config, **fields}))
    assert main(["import", "hf", str(tmp_path / "harmless"), str(tmp_path / "from-harmless")]) == 0
    c, _ = load_checkpoint(tmp_path / "from-harmless")
    with torch.no_grad():
        torch.testing.assert_close(c(idx), b(idx), rtol=0, atol=0)
    small = tmp_path / "small-vocab"
    shutil.copytree(tmp_path / "whole", small)
    bigger = Tokenizer.train_bpe([TEXT * 3], vocab_size=tokenizer.vocab_size + 40)
    bigger.save(small / "tokenizer.json")
    cases = {
        missing: f"missing weight shard(s): {shards[0].name}",
        arch: "unsupported architecture 'falcon'",
        tmp_path / "scaled": "unsupported rope scaling 'proportional'",
        tmp_path / "mixtral": "mixtral (['MixtralForCausalLM']) is a mixture-of-experts model",
        tmp_path / "qwen3-moe": "qwen3_moe (['Qwen3MoeForCausalLM']) is a mixture-of-experts model",
        tmp_path / "multiplier": "sets residual_multiplier, which gptlab does not know",
        tmp_path / "quantized": "sets quantization_config, which gptlab does not know",
        small: "but the model's vocabulary is",
    }
    capsys.readouterr()  # transformers' own progress bars while saving
    for folder, message in cases.items():
        assert main(["import", "hf", str(folder), str(tmp_path / "out" / folder.name)]) == 2, folder
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (folder, err)
        assert not (tmp_path / "out" / folder.name).exists()


def _hf_presets() -> list[str]:
    from gptlab.config import PRESETS

    return [name for name, fields in PRESETS.items() if fields.get("family") not in (None, "gpt2")]


@pytest.mark.parametrize("name", _hf_presets())
def test_preset_counts_equal_transformers_model_of_the_same_config(name):
    """Each family preset is the real model's shape: transformers builds the same config (on the meta device, no
    memory) with the same parameter count, and reading its config.json back gives the preset again."""
    import transformers

    from gptlab.config import ModelConfig
    from gptlab.interop import families
    from gptlab.interop.hf import config_from_hf, config_to_hf
    from gptlab.model import build_on_meta

    cfg = ModelConfig.from_preset(name)
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    hf = families.config_to_hf(cfg, ids, cfg.family) if cfg.pos == "rope" else config_to_hf(cfg, ids)
    assert hf["model_type"] == cfg.family
    assert config_from_hf(hf) == cfg
    config = transformers.AutoConfig.for_model(**hf)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == hf["architectures"][0]
    assert model.num_parameters() == build_on_meta(cfg).num_params()


def test_gemma3_image_and_text_model_imports_as_its_text_model(tmp_path, tokenizer):
    """Gemma 3 4B and up ship as Gemma3ForConditionalGeneration: its language model comes in, the vision tower
    stays out, and text-only logits equal transformers'."""
    import transformers

    text = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, max_position_embeddings=128, sliding_window=8,
                sliding_window_pattern=2)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=330, boi_token_index=331, eoi_token_index=332)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf" / "tokenizer.json")
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    model, _ = load_checkpoint(tmp_path / "ckpt")
    assert model.config.family == "gemma3_text" and model.config.qk_norm == "head"
    idx = torch.randint(0, tokenizer.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(input_ids=idx).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fields, message", [
    (dict(block_norms="sandwich"), "model.block_norms must be one of"),
    (dict(qk_norm="layer"), "model.qk_norm must be one of"),
    (dict(pos="rope", rope_scaling={"rope_type": "ntk"}), "unsupported rope scaling 'ntk'"),
    (dict(pos="rope", rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks high_freq_factor"),
    (dict(pos="rope", rope_scaling={"rope_type": "linear", "factor": 2.0, "beta": 1}), "has unknown beta"),
    (dict(layer_types=["full_attention"]), "for each of the 2 layers"),
    (dict(layer_types=["sliding_attention", "full_attention"]), "model.sliding_window is not set"),
    (dict(nope_layers=[5]), "model.nope_layers must list layer numbers below 2"),
    (dict(rotary_fraction=1.5), "model.rotary_fraction must be in (0, 1]"),
    (dict(attn_softcap=-1.0), "model.attn_softcap must be a positive number"),
])
def test_bad_family_fields_are_one_line(fields, message):
    """A config written by hand (YAML, --model.* flags) with a family field out of range: the shared validation
    says which and why."""
    from gptlab.config import ModelConfig
    from gptlab.errors import GptlabError

    with pytest.raises(GptlabError) as caught:
        ModelConfig(n_layer=2, n_head=2, n_embd=32, **fields)
    assert message in str(caught.value), str(caught.value)


def test_gemma3_local_layers_stay_unscaled_when_both_bases_are_equal(tmp_path, tokenizer):
    """Gemma 3 scales only its full layers' rope: with one base for both kinds, the sliding layers still take none
    of the full layers' scaling."""
    same = {"full_attention": dict(rope_type="linear", factor=4.0, rope_theta=10000.0),
            "sliding_attention": dict(rope_type="default", rope_theta=10000.0)}
    hf = build("gemma3", tmp_path / "hf", tokenizer, rope_parameters=same)
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    model, _ = load_checkpoint(tmp_path / "ckpt")
    assert model.config.rope_local_theta == 10000.0
    idx = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)

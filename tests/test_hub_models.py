"""Models as people download them: each family with a tokenizer of its real shape (built in the test), its special
tokens, BOS rule, stop ids and chat template, checked against transformers (`AutoTokenizer`, `apply_chat_template`,
`generate`) and peft (`PeftModel`), through the command line as a user runs it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gptlab.checkpoint import load_checkpoint
from gptlab.cli import main
from gptlab.interop.hf import read_hf_tokenizer
from gptlab.tokenizer import Tokenizer

from . import hub_tokenizers as hub

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "Translate: the cat"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello! "},
     {"role": "user", "content": "And now in French, ünïcödé 🙂?"}],
]
TEXTS = ["The train left the station at noon.", " leading space", "ünïcödé 🙂 tabs\tand  spaces\n\nx",
         "Hello</s>there <s> and <|eot_id|> inside", "[INST] Hi [/INST] ok", ""]
TOOL = {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}


def shaped(kind: str, path, tokenizer=None):
    if kind == "gpt2":
        return hub.gpt2(path, tokenizer)
    if kind == "mistral":
        return hub.llama2(path, hub.MISTRAL_TEMPLATE)
    return hub.BUILDERS[kind](path)


def renders(hf, messages) -> bool:
    try:
        hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # the template refuses this conversation (Gemma and Mistral take no system turn)
        return False
    return True


@pytest.mark.parametrize("kind", ["llama2", "mistral", "llama3", "gemma", "qwen", "gpt2", "gemma3", "phi3", "olmo2",
                                  "smollm3"])
def test_tokenizer_ids_and_chat_equal_transformers(tmp_path, tokenizer, kind):
    """ids of plain text (BOS included), rendered conversations and their ids, kept through a checkpoint folder and
    read back by transformers from it."""
    from transformers import AutoTokenizer

    folder = shaped(kind, tmp_path / "hf", tokenizer)
    hf = AutoTokenizer.from_pretrained(folder)
    ours = read_hf_tokenizer(folder)
    ours.save_folder(tmp_path / "kept")
    kept = Tokenizer.from_folder(tmp_path / "kept")
    again = AutoTokenizer.from_pretrained(tmp_path / "kept")  # a gptlab folder reads the same in transformers
    for tok in (ours, kept):
        for text in TEXTS:
            assert tok.encode(text) == hf(text).input_ids == again(text).input_ids, (kind, text)
        assert tok.bos_id == hf.bos_token_id and tok.eos_id == hf.eos_token_id and tok.pad_id == hf.pad_token_id
        for messages in CONVERSATIONS:
            if not renders(hf, messages):
                continue
            for gen in (True, False):
                want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
                assert tok.render_chat(messages, add_generation_prompt=gen) == want, (kind, messages)
            assert tok.encode_chat(messages) == hf.apply_chat_template(messages, add_generation_prompt=True).input_ids
    if kind == "qwen":  # tools through the template's own format (its `tojson`)
        want = hf.apply_chat_template(CONVERSATIONS[0], tools=[TOOL], tokenize=False, add_generation_prompt=True)
        assert ours.render_chat(CONVERSATIONS[0], tools=[TOOL]) == want and '"name": "add"' in want
    stops = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert list(ours.stop_ids) == list(stops if isinstance(stops, list) else [stops])
    end_of_turn = {"llama2": "</s>", "mistral": "</s>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>",
                   "qwen": "<|im_end|>", "gpt2": None, "gemma3": "<end_of_turn>", "phi3": "<|end|>",
                   "olmo2": "<|endoftext|>", "smollm3": "<|im_end|>"}[kind]
    assert [ours.decode([t]) for t in ours.end_of_turn] == ([end_of_turn] if end_of_turn else [])
    assert set(ours.end_of_turn) <= set(ours.chat_stop_ids)


def test_folders_read_without_transformers(tmp_path, tokenizer, monkeypatch, capsys):
    """Without transformers a folder is read from its files as transformers' generic class reads them: the
    post-processor's BOS, and the named special tokens made special (never split) even where tokenizer.json lists
    one as a plain piece; a model-specific class gets a note that the file is read as it is."""
    from transformers import AutoTokenizer

    import gptlab.interop.hf as hf_interop

    folder = hub.llama3(tmp_path / "llama3")
    data = json.loads((folder / "tokenizer.json").read_text())
    eot = next(t for t in data["added_tokens"] if t["content"] == "<|eot_id|>")
    data["added_tokens"].remove(eot)  # <|eot_id|> only a piece of the vocabulary: the eos_token all the same
    data["model"]["vocab"]["<|eot_id|>"] = eot["id"]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    llama2 = hub.llama2(tmp_path / "llama2")
    monkeypatch.setattr(hf_interop, "_via_transformers", lambda *_: None)
    ours = read_hf_tokenizer(folder)
    hf = AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert ours.encode(text) == hf(text).input_ids, text
    assert ours.encode("a<|eot_id|>")[-1] == eot["id"] == ours.eos_id
    plain = read_hf_tokenizer(llama2)
    assert "read from its tokenizer.json as it is" in capsys.readouterr().err
    assert plain.encode("The train") == Tokenizer.from_folder(llama2).encode("The train")
    assert plain.bos_id == 1 and plain.encode("x")[0] == 1


def hf_model(kind: str, path, tok: Tokenizer, **shape):
    """A tiny random transformers model of the family, its tokenizer folder beside it."""
    torch.manual_seed(0)
    stops = list(tok.stop_ids)
    ids = dict(bos_token_id=tok.bos_id, eos_token_id=stops if len(stops) > 1 else stops[0], pad_token_id=tok.pad_id)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=48, n_positions=128,
                                      **ids)
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind in NEWER:  # tests/test_families.py's tiny shape of the family, at this tokenizer's vocabulary
        from .test_families import _TYPES, FAMILIES

        cls, fields = FAMILIES[kind]
        config_cls, model_cls = _TYPES.get(cls, (f"{cls}Config", f"{cls}ForCausalLM"))
        fields = {**fields, "max_position_embeddings": 128} if "max_position_embeddings" in fields else fields
        cfg = getattr(transformers, config_cls)(**{**fields, "vocab_size": tok.vocab_size, **ids, **shape})
        model = getattr(transformers, model_cls)(cfg)
    else:
        cls = {"llama": "Llama", "mistral": "Mistral", "gemma": "Gemma"}[kind]
        extra = dict(head_dim=32, num_key_value_heads=1) if kind == "gemma" else dict(num_key_value_heads=2)
        if kind == "mistral":
            extra["sliding_window"] = 16
        cfg = getattr(transformers, f"{cls}Config")(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    max_position_embeddings=128, tie_word_embeddings=kind == "gemma",
                                                    **ids, **extra, **shape)
        model = getattr(transformers, f"{cls}ForCausalLM")(cfg)
    model.save_pretrained(path)
    return model.eval()


FAMILY_TOKENIZERS = {"gpt2": "gpt2", "llama": "llama3", "mistral": "mistral", "gemma": "gemma", "qwen2": "qwen",
                     "qwen3": "qwen", "gemma2": "gemma", "gemma3": "gemma3", "phi3": "phi3", "olmo2": "olmo2",
                     "smollm3": "smollm3"}
NEWER = ("qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "smollm3")


def make_family(kind: str, root, tokenizer):
    folder = shaped(FAMILY_TOKENIZERS[kind], root / "hf", tokenizer)
    tok = read_hf_tokenizer(folder)
    model = hf_model(kind, folder, tok)
    return folder, tok, model


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral", "gemma", *NEWER])
def test_imported_family_encodes_and_stops_where_transformers_does(tmp_path, tokenizer, kind, capsys):
    """`gptlab import hf`, then greedy generation from a prompt encoded as AutoTokenizer encodes it stops at the
    same stop token as `generate` (the last of generation_config's ids, where it has several)."""
    from transformers import AutoTokenizer

    folder, tok, hf = make_family(kind, tmp_path, tokenizer)
    hf_tok = AutoTokenizer.from_pretrained(folder)
    prompt = hf_tok("The train left", return_tensors="pt").input_ids
    free = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)[0, prompt.shape[1]:]
    stop = list(tok.stop_ids)[-1]
    with torch.no_grad():  # the stop token takes the place of the 6th greedy token
        head = hf.get_output_embeddings().weight
        head[stop] = head[int(free[5])] * 3
    hf.save_pretrained(folder)
    want = hf.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert stop in want, want
    want = want[: want.index(stop) + 1]
    assert main(["import", "hf", str(folder), str(tmp_path / "ckpt")]) == 0, capsys.readouterr().err
    import gptlab

    llm = gptlab.load(tmp_path / "ckpt", device="cpu")
    assert llm.tokenizer.encode("The train left") == prompt[0].tolist()
    (done,) = llm.complete("The train left", max_new_tokens=12, temperature=0)
    assert done.token_ids == want and done.finish_reason == "stop"
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "ckpt"), "--prompt", "The train left", "--max-new-tokens", "12",
                 "--temperature", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == want


def chat_rows(n: int = 16) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"{i} it is"},
                          {"role": "user", "content": "Again"}, {"role": "assistant", "content": f"{i} again"}]}
            for i in range(n)]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral", "gemma", "qwen2", "gemma3", "phi3", "olmo2",
                                  "smollm3"])
def test_chat_finetune_and_serve_with_the_models_own_template(tmp_path, tokenizer, kind, capsys):
    """A chat fine-tune renders each conversation with the base's template (ids equal to apply_chat_template) and
    scores the assistant turns with their end-of-turn token only; the run keeps the template, and the server's
    chat completion renders with it and stops at its end of turn."""
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    import gptlab
    from gptlab.chat import DEFAULT_TEMPLATE
    from gptlab.data.tasks import ExampleBatches, load_examples
    from gptlab.serve import Server, create_app

    folder, tok, _ = make_family(kind, tmp_path, tokenizer)
    assert main(["import", "hf", str(folder), str(tmp_path / "ckpt")]) == 0
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows()))
    base = Tokenizer.from_folder(tmp_path / "ckpt")
    if kind == "gpt2":
        base.chat_template = DEFAULT_TEMPLATE  # what finetune gives a model without a template
    (ids, scored), = ExampleBatches({"train": load_examples(data)[:1]}, base, 256).rows["train"]
    messages = chat_rows()[0]["messages"]
    if kind != "gpt2":
        hf_tok = AutoTokenizer.from_pretrained(folder)
        assert ids == hf_tok.apply_chat_template(messages, add_generation_prompt=False).input_ids
    end = {"gpt2": "\n", "llama": "<|eot_id|>", "mistral": "</s>", "gemma": "<end_of_turn>\n", "qwen2": "<|im_end|>\n",
           "gemma3": "<end_of_turn>\n", "phi3": "<|end|> \n", "olmo2": "<|endoftext|>", "smollm3": "<|im_end|>\n"}[kind]
    learned = base.decode(t for t, s in zip(ids, scored) if s)  # Phi-3's "\n" after a special is the piece "▁\n"
    assert learned == f"0 it is{end}0 again{end}" + ("<|endoftext|>" if kind == "gpt2" else ""), learned

    assert main(["finetune", str(tmp_path / "ckpt"), "--method", "lora", "--data", str(data), "--out",
                 str(tmp_path / "run"), "--quiet", "--train.max_steps=3", "--train.batch_size=4",
                 "--train.eval_every=0"]) == 0, capsys.readouterr().err
    template = (tmp_path / "run" / "chat_template.jinja").read_text()
    assert template == (DEFAULT_TEMPLATE if kind == "gpt2" else base.chat_template)
    llm = gptlab.load(tmp_path / "run", device="cpu")
    question = [{"role": "user", "content": "Say 3"}]
    client = TestClient(create_app(Server(llm, "run")))
    reply = client.post("/v1/chat/completions", json={"messages": question, "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["usage"]["prompt_tokens"] == len(llm.tokenizer.encode_chat(question))
    if kind != "gpt2":
        assert llm.tokenizer.encode_chat(question) == hf_tok.apply_chat_template(question,
                                                                                 add_generation_prompt=True).input_ids
    assert body["choices"][0]["message"]["content"] == llm.chat(question, max_new_tokens=8, temperature=0)
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--chat", "--prompt", "Say 3", "--max-new-tokens", "8",
                 "--temperature", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == body["choices"][0]["message"]["content"]
    assert main(["evaluate", str(tmp_path / "run"), "--data", str(data), "--limit", "2", "--metrics", "exact",
                 "--json"]) == 0
    sample = json.loads(capsys.readouterr().out)["samples"][0]
    asked = next(r["messages"] for r in chat_rows() if r["messages"][-1]["content"] == sample["reference"])
    assert sample["prompt"] == llm.tokenizer.decode(llm.tokenizer.encode_chat(asked[:-1]))
    if kind != "gpt2":
        assert sample["prompt"] == hf_tok.decode(hf_tok.apply_chat_template(asked[:-1], add_generation_prompt=True
                                                                           ).input_ids)


def random_lora(model) -> None:
    """Give a fresh LoRA non-zero B, so that the adapter changes the output."""
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral", "gemma", *NEWER])
def test_peft_adapters_both_ways(tmp_path, tokenizer, kind, capsys):
    """`export peft` of a LoRA run loads with `PeftModel.from_pretrained` onto the exported base with equal logits;
    `import peft` reads it back, and reads an adapter that peft itself made (other targets, ranks per module)."""
    import peft
    from transformers import AutoModelForCausalLM

    folder, _, _ = make_family(kind, tmp_path, tokenizer)
    ckpt, run = tmp_path / "ckpt", tmp_path / "run"
    assert main(["import", "hf", str(folder), str(ckpt)]) == 0
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"The train {i}", "completion": f" left at {i}"}) + "\n"
                            for i in range(12)))
    assert main(["finetune", str(ckpt), "--method", "lora", "--data", str(data), "--out", str(run), "--quiet",
                 "--train.max_steps=4", "--train.batch_size=4", "--train.eval_every=0", "--train.lr=0.05"]) == 0
    assert main(["export", "peft", str(run), str(tmp_path / "peft")]) == 0, capsys.readouterr().err
    assert main(["export", "hf", str(ckpt), str(tmp_path / "base-hf")]) == 0
    ours, _ = load_checkpoint(run)
    plain, _ = load_checkpoint(ckpt)
    hf_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base-hf").eval()
    adapted = peft.PeftModel.from_pretrained(hf_base, tmp_path / "peft").eval()
    idx = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = adapted(idx).logits
        assert (want - plain(idx)).abs().max() > 1e-3  # the adapter matters
        torch.testing.assert_close(ours(idx), want, atol=1e-5, rtol=1e-5)
    assert main(["import", "peft", str(tmp_path / "peft"), str(tmp_path / "back"), "--base", str(ckpt)]) == 0
    back, _ = load_checkpoint(tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(back(idx), want, atol=1e-5, rtol=1e-5)

    targets = {"gpt2": ["c_attn"], "phi3": ["qkv_proj", "down_proj"]}.get(kind, ["q_proj", "v_proj", "down_proj"])
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=kind == "gpt2",
                          init_lora_weights=False, rank_pattern={targets[-1]: 2}, alpha_pattern={targets[-1]: 3},
                          use_rslora=kind == "llama", layers_to_transform=[1] if kind != "gpt2" else None)
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base-hf"), cfg).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    assert main(["import", "peft", str(tmp_path / "theirs"), str(tmp_path / "theirs-gptlab"), "--base",
                 str(ckpt)]) == 0
    mine, _ = load_checkpoint(tmp_path / "theirs-gptlab")
    with torch.no_grad():
        want = theirs(idx).logits
        assert (want - plain(idx)).abs().max() > 1e-3
        torch.testing.assert_close(mine(idx), want, atol=1e-5, rtol=1e-5)


def test_bad_tokenizers_templates_and_adapters(tmp_path, tokenizer, capsys):
    """A chat template that does not parse or render, special tokens outside the vocabulary, a peft adapter for
    another base, a run that is not LoRA: one line each, exit 2, nothing written."""
    folder, _, _ = make_family("llama", tmp_path, tokenizer)
    assert main(["import", "hf", str(folder), str(tmp_path / "ckpt")]) == 0
    bad = {}
    for name, edit in {
        "template-syntax": lambda c, g: c.update(chat_template="{% for m in messages %}{{ m.content }"),
        "template-raises": lambda c, g: c.update(chat_template="{{ raise_exception('no chat here') }}"),
        "eos-missing": lambda c, g: c.update(eos_token="<|not_a_token|>"),
        "stop-outside": lambda c, g: g.update(eos_token_id=[5, 100000]),
    }.items():
        shutil.copytree(folder, tmp_path / name)
        config = json.loads((tmp_path / name / "tokenizer_config.json").read_text())
        generation = json.loads((tmp_path / name / "generation_config.json").read_text())
        edit(config, generation)
        (tmp_path / name / "tokenizer_config.json").write_text(json.dumps(config))
        (tmp_path / name / "generation_config.json").write_text(json.dumps(generation))
        bad[name] = (["import", "hf", str(tmp_path / name), str(tmp_path / "out" / name)],
                     {"template-syntax": "chat template does not parse", "template-raises": "no chat here",
                      "eos-missing": "<|not_a_token|>", "stop-outside": "100000"}[name])
    gpt2_folder, _, _ = make_family("gpt2", tmp_path / "g", tokenizer)
    assert main(["import", "hf", str(gpt2_folder), str(tmp_path / "g" / "ckpt")]) == 0
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"a {i}", "completion": f" b {i}"}) + "\n" for i in range(8)))
    for method in ("lora", "adapter"):
        assert main(["finetune", str(tmp_path / "g" / "ckpt"), "--method", method, "--data", str(data), "--out",
                     str(tmp_path / "g" / method), "--quiet", "--train.max_steps=1", "--train.batch_size=2",
                     "--train.eval_every=0"]) == 0
    assert main(["export", "peft", str(tmp_path / "g" / "lora"), str(tmp_path / "g" / "peft")]) == 0
    bad["another-base"] = (["import", "peft", str(tmp_path / "g" / "peft"), str(tmp_path / "out" / "x"), "--base",
                            str(tmp_path / "ckpt")], "does not fit the base")
    bad["not-lora"] = (["export", "peft", str(tmp_path / "g" / "adapter"), str(tmp_path / "out" / "y")],
                       "is not a LoRA run")
    bad["no-base"] = (["import", "peft", str(tmp_path / "g" / "peft"), str(tmp_path / "out" / "z")], "--base")
    inside = {  # an output inside an input: refused before anything is written
        "peft-into-base": ["import", "peft", str(tmp_path / "g" / "peft"), str(tmp_path / "g" / "ckpt" / "lora"),
                           "--base", str(tmp_path / "g" / "ckpt")],
        "peft-into-run": ["export", "peft", str(tmp_path / "g" / "lora"), str(tmp_path / "g" / "lora" / "peft")],
        "hf-into-ckpt": ["export", "hf", str(tmp_path / "ckpt"), str(tmp_path / "ckpt" / "hf")],
        "import-into-src": ["import", "hf", str(folder), str(folder / "gptlab")],
        "finetune-into-base": ["finetune", str(tmp_path / "g" / "ckpt"), "--data", str(data), "--out",
                               str(tmp_path / "g" / "ckpt" / "run"), "--quiet"],
    }
    bad.update({name: (argv, "or inside it") for name, argv in inside.items()})
    gemma = tmp_path / "gemma"
    make_family("gemma", gemma, tokenizer)
    assert main(["import", "hf", str(gemma / "hf"), str(gemma / "ckpt")]) == 0
    system = tmp_path / "system.jsonl"
    system.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "Hello."}]}) + "\n")
    bad["template-refuses"] = (["finetune", str(gemma / "ckpt"), "--data", str(system), "--out",
                                str(tmp_path / "out" / "w"), "--quiet"], "System role not supported")
    capsys.readouterr()
    for name, (argv, needle) in bad.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    for argv in inside.values():
        assert not Path(argv[3] if argv[0] != "finetune" else argv[-2]).exists(), argv

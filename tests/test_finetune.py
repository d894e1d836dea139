"""Fine-tuning through the one loop: LoRA equal to peft's, task data with a loss mask, resume, and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gptlab.checkpoint import load_checkpoint
from gptlab.cli import main
from gptlab.data.tasks import Example, ExampleBatches, load_examples
from gptlab.peft.lora import LoRA, LoRALinear, merge_lora

TARGETS = ["c_attn", "c_proj", "c_fc"]


def test_lora_logits_and_trainable_count_equal_peft(hf_pair):
    peft = pytest.importorskip("peft")
    hf, ckpt = hf_pair
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, fan_in_fan_out=True,
                          init_lora_weights=False)  # random A and B, so the adapter changes the output
    import copy

    hf_peft = peft.get_peft_model(copy.deepcopy(hf), cfg).eval()
    model, _ = load_checkpoint(ckpt)
    LoRA(r=4, alpha=8, targets=TARGETS).attach(model)
    ours = {n for n, p in model.named_parameters() if p.requires_grad}
    copied = 0
    for name, t in hf_peft.state_dict().items():
        if "lora_" in name:
            key = name.replace("base_model.model.", "").replace(".default", "")
            assert key in ours, key
            model.get_parameter(key).data.copy_(t)
            copied += 1
    assert copied == len(ours)
    trainable_peft, _ = hf_peft.get_nb_trainable_parameters()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable_peft
    idx = torch.randint(0, 333, (2, 20))
    with torch.no_grad():
        want = hf_peft(idx).logits
        torch.testing.assert_close(model(idx), want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(want, hf(idx).logits, atol=1e-3)  # the adapter does change the output
        merged = merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(idx), want, atol=1e-5, rtol=1e-5)


def test_merge_then_unmerge_restores_the_base(hf_pair):
    model, _ = load_checkpoint(hf_pair[1])
    LoRA(r=2, alpha=4).attach(model)
    layer = model.transformer.h[0].attn.c_attn
    torch.nn.init.normal_(layer.lora_B.weight)
    before = layer.base.weight.detach().clone()
    idx = torch.randint(0, 333, (1, 9))
    with torch.no_grad():
        unmerged = model(idx)
        layer.merge()
        torch.testing.assert_close(model(idx), unmerged, atol=1e-5, rtol=1e-5)
        layer.unmerge()
    torch.testing.assert_close(layer.base.weight, before, atol=1e-6, rtol=0)


def test_loss_mask_scores_the_completion_only(tokenizer):
    data = ExampleBatches({"train": [Example("The train <to-fr>", " Le train")]}, tokenizer, block_size=64)
    x, y = data.batch("train", (0,), 1, 64)
    ids, scored = data.rows["train"][0]
    n_prompt = scored.index(True)
    assert x[0].tolist() == ids[:-1] and n_prompt == len(tokenizer.encode("The train <to-fr>"))
    assert (y[0, : n_prompt - 1] == -100).all()
    assert y[0, n_prompt - 1:].tolist() == ids[n_prompt:]  # the completion and <|endoftext|>


def test_over_long_examples_are_truncated_by_the_stated_rule(tokenizer):
    long_prompt = "word " * 200
    data = ExampleBatches({"train": [Example(long_prompt, " end")]}, tokenizer, block_size=32)
    ids, scored = data.rows["train"][0]
    n_prompt = scored.index(True)
    assert data.truncated == 1 and len(ids) == 33
    assert ids[n_prompt:] == tokenizer.encode(" end") + [tokenizer.eos_id]  # the completion survives whole


def write_task(path, n=40):
    rows = [{"prompt": f"The train {i} left <to-fr>", "completion": f" Le train {i} est parti"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def finetune(capsys, ckpt, data, out, *extra):
    code = main(["finetune", str(ckpt), "--data", str(data), "--out", str(out), "--quiet", "--train.batch_size=4",
                 "--train.log_every=1", "--train.eval_every=4", "--train.eval_steps=2", "--train.save_every=4",
                 "--train.warmup_steps=1", "--train.lr=0.003", *extra])
    return code, capsys.readouterr().err


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_lora_finetune_saves_only_the_adapter_and_generates(capsys, hf_pair, tmp_path):
    import gptlab

    _, ckpt = hf_pair
    data = write_task(tmp_path / "task.jsonl")
    code, err = finetune(capsys, ckpt, data, tmp_path / "lora", "--method=lora", "--train.max_steps=8",
                         "--lora.r=4")
    assert code == 0, err
    files = {p.name for p in (tmp_path / "lora").iterdir()}
    assert {"adapter.safetensors", "adapter_config.json", "tokenizer.json", "train_state.pt"} <= files
    assert "model.safetensors" not in files
    adapter = (tmp_path / "lora" / "adapter.safetensors").stat().st_size
    assert adapter < (ckpt / "model.safetensors").stat().st_size / 3
    first, last = losses(tmp_path / "lora")[1], losses(tmp_path / "lora")[8]
    assert last < first
    text = gptlab.load(tmp_path / "lora", device="cpu").generate("The train 3 left <to-fr>", max_new_tokens=5)
    assert isinstance(text, str)


@pytest.mark.parametrize("method", ["full", "lora", "adapter", "llama-adapter"])
def test_finetune_resumes_exactly(capsys, hf_pair, tmp_path, method):
    _, ckpt = hf_pair
    data = write_task(tmp_path / "task.jsonl")
    common = [f"--method={method}", "--train.lr_decay_steps=8"]
    assert finetune(capsys, ckpt, data, tmp_path / "a", *common, "--train.max_steps=8")[0] == 0
    assert finetune(capsys, ckpt, data, tmp_path / "b", *common, "--train.max_steps=4")[0] == 0
    assert finetune(capsys, ckpt, data, tmp_path / "b", *common, "--train.max_steps=8", "--resume")[0] == 0
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    other = "lora" if method != "lora" else "full"
    code, err = finetune(capsys, ckpt, data, tmp_path / "b", f"--method={other}", "--train.max_steps=9", "--resume")
    assert code == 2 and f"holds a {method} run" in err


def test_finetune_bad_input(capsys, hf_pair, tmp_path):
    _, ckpt = hf_pair
    good = write_task(tmp_path / "task.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{oops\n{"foo": 1}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cases = [
        (["--method=adapterz"], good, "unknown method 'adapterz'"),
        ([], bad, "bad.jsonl:2: not JSON"),
        (["--skip-bad-lines"], bad, "no validation examples"),  # one good line is left: too few to split
        ([], empty, "holds no examples"),
        (["--lora.targets=q_proj"], good, "match no Linear layer"),
    ]
    for i, (extra, data, message) in enumerate(cases):
        code, err = finetune(capsys, ckpt, data, tmp_path / f"out{i}", "--train.max_steps=1", *extra)
        assert code == 2 and message in err.splitlines()[-1], (extra, err)


def test_lora_folder_whose_base_changed_is_refused(capsys, hf_pair, tmp_path):
    _, ckpt = hf_pair
    base = tmp_path / "base"
    shutil.copytree(ckpt, base)
    data = write_task(tmp_path / "task.jsonl")
    assert finetune(capsys, base, data, tmp_path / "lora", "--train.max_steps=1")[0] == 0
    weights = load_checkpoint(base)[0]
    with torch.no_grad():
        weights.transformer.wte.weight.mul_(2)
    from gptlab.checkpoint import save_checkpoint
    from gptlab.tokenizer import Tokenizer

    save_checkpoint(base, weights, Tokenizer.from_file(base / "tokenizer.json"))
    code = main(["generate", str(tmp_path / "lora"), "--max-new-tokens", "2"])
    assert code == 2 and "not the one" in capsys.readouterr().err
    shutil.rmtree(base)
    code = main(["generate", str(tmp_path / "lora"), "--max-new-tokens", "2"])
    assert code == 2 and "is missing" in capsys.readouterr().err


def test_task_lines_split_at_the_task_token(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("The train left <to-fr> Le train est parti\nno token here\n")
    first, second = load_examples(path, task_token="<to-fr>")
    assert (first.prompt, first.completion) == ("The train left <to-fr>", " Le train est parti")
    assert (second.prompt, second.completion) == ("", "no token here")


def test_export_of_a_lora_folder_is_the_merged_model(capsys, hf_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    _, ckpt = hf_pair
    data = write_task(tmp_path / "task.jsonl")
    assert finetune(capsys, ckpt, data, tmp_path / "lora", "--train.max_steps=4", "--train.lr=0.05")[0] == 0
    assert main(["export", "hf", str(tmp_path / "lora"), str(tmp_path / "hf")]) == 0
    merged, _ = load_checkpoint(tmp_path / "lora")
    base, _ = load_checkpoint(ckpt)
    idx = torch.randint(0, 333, (1, 12))
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(idx).logits
        torch.testing.assert_close(exported, merged(idx), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(exported, base(idx), atol=1e-4)  # the adapter is in it


def test_builtin_tasks(tmp_path):
    from gptlab.data.builtin_tasks import gettext_pairs, stdlib_summaries
    from gptlab.errors import GptlabError

    summaries = stdlib_summaries(limit=50)
    assert len(summaries) == 50
    assert all(e.prompt.startswith("def ") and e.prompt.endswith("<summarize>") and e.completion.strip()
               for e in summaries)
    # a catalogue made here, in gettext's own binary format
    import struct

    pairs = {"": "Content-Type: text/plain; charset=UTF-8\n", "File not found": "Fichier introuvable",
             "menu\x04Open": "Ouvrir"}
    keys = sorted(pairs)
    ids = b"".join(k.encode() + b"\0" for k in keys)
    strs = b"".join(pairs[k].encode() + b"\0" for k in keys)
    n = len(keys)
    start = 7 * 4 + 16 * n
    offsets, pos = [], 0
    for k in keys:
        offsets.append((len(k.encode()), start + pos))
        pos += len(k.encode()) + 1
    toffsets, tpos = [], 0
    for k in keys:
        toffsets.append((len(pairs[k].encode()), start + len(ids) + tpos))
        tpos += len(pairs[k].encode()) + 1
    header = struct.pack("<7I", 0x950412DE, 0, n, 7 * 4, 7 * 4 + 8 * n, 0, 0)
    table = b"".join(struct.pack("<2I", *o) for o in offsets) + b"".join(struct.pack("<2I", *o) for o in toffsets)
    (tmp_path / "fr").mkdir()
    (tmp_path / "fr" / "demo.mo").write_bytes(header + table + ids + strs)
    got = {(e.prompt, e.completion) for e in gettext_pairs(tmp_path / "fr")}
    assert got == {("File not found <to-fr>", " Fichier introuvable"), ("Open <to-fr>", " Ouvrir")}
    with pytest.raises(GptlabError, match="no gettext catalogues"):
        gettext_pairs(tmp_path / "nowhere")


def test_compare_writes_the_table_and_the_chart(capsys, hf_pair, tmp_path):
    _, ckpt = hf_pair
    data = write_task(tmp_path / "task.jsonl")
    code = main(["compare", str(ckpt), "--data", str(data), "--methods", "full,lora,adapter", "--steps", "3",
                 "--batch-size", "4", "--out", str(tmp_path / "cmp")])
    assert code == 0, capsys.readouterr().err
    report = (tmp_path / "cmp" / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|") for line in report.splitlines() if line.startswith("| ")
            and not line.startswith("| method")}
    assert set(rows) == {"full", "lora", "adapter"}
    trainable = {m: int(r[2].strip().replace(",", "")) for m, r in rows.items()}
    assert trainable["lora"] < trainable["full"] and trainable["adapter"] < trainable["full"]
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    assert main(["compare", str(ckpt), "--data", str(data), "--methods", "lora,prefixx", "--steps", "1",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "unknown method(s) prefixx" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["full", "lora"])
def test_task_token_is_one_token_and_grows_the_embedding(capsys, tokenizer, tmp_path, method):
    import gptlab
    from gptlab.checkpoint import save_checkpoint
    from gptlab.config import ModelConfig
    from gptlab.model import GPT

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=tokenizer.vocab_size)  # no spare rows
    base = save_checkpoint(tmp_path / "base", GPT(cfg), tokenizer)
    data = tmp_path / "pairs.txt"
    data.write_text("".join(f"The train {i} left <to-fr> Le train {i} est parti\n" for i in range(30)))
    code, err = finetune(capsys, base, data, tmp_path / "ft", f"--method={method}", "--task-token=<to-fr>",
                         "--train.max_steps=3")
    assert code == 0, err
    llm = gptlab.load(tmp_path / "ft", device="cpu")
    (token_id,) = [i for i in llm.tokenizer.encode("a <to-fr> b") if i >= tokenizer.vocab_size]
    assert token_id == tokenizer.vocab_size and llm.model.config.vocab_size == tokenizer.vocab_size + 1
    assert isinstance(llm.generate("The train 3 left <to-fr>", max_new_tokens=3), str)


def copy_peft_weights(peft_model, model, mapping):
    copied = 0
    for name, t in peft_model.state_dict().items():
        for theirs, ours in mapping.items():
            if name.startswith(theirs):
                model.get_parameter(ours + name[len(theirs):]).data.copy_(t)
                copied += 1
    return copied


def test_prompt_tuning_equals_peft(hf_pair):
    import copy

    peft = pytest.importorskip("peft")
    from gptlab.peft import PromptTuning

    hf, ckpt = hf_pair
    peft_model = peft.get_peft_model(copy.deepcopy(hf), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5)).eval()
    model, _ = load_checkpoint(ckpt)
    method = PromptTuning(virtual_tokens=5)
    method.attach(model)
    assert copy_peft_weights(peft_model, model, {"prompt_encoder.default.embedding": "prompt.embedding"}) == 1
    assert sum(p.numel() for _, p in method.trainable(model)) == peft_model.get_nb_trainable_parameters()[0]
    idx = torch.randint(0, 333, (2, 12))
    with torch.no_grad():
        want = peft_model(idx).logits[:, 5:]  # peft also returns the virtual positions
        torch.testing.assert_close(model(idx), want, atol=1e-5, rtol=1e-5)
        folded = method.fold(model)  # the soft prompt as fixed keys/values: same logits, cache-friendly
        torch.testing.assert_close(folded(idx), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hidden", [16, None])
def test_prefix_tuning_equals_peft(hf_pair, hidden):
    import copy

    peft = pytest.importorskip("peft")
    from gptlab.peft import PrefixTuning

    hf, ckpt = hf_pair
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=bool(hidden),
                                  encoder_hidden_size=hidden or 48)
    peft_model = peft.get_peft_model(copy.deepcopy(hf), cfg).eval()
    model, _ = load_checkpoint(ckpt)
    method = PrefixTuning(virtual_tokens=4, hidden=hidden)
    method.attach(model)
    copied = copy_peft_weights(peft_model, model, {"prompt_encoder.default.": "prefix."})
    assert copied == (5 if hidden else 1)  # embedding (+ the MLP's two weights and biases)
    assert sum(p.numel() for _, p in method.trainable(model)) == peft_model.get_nb_trainable_parameters()[0]
    idx = torch.randint(0, 333, (2, 12))
    with torch.no_grad():
        want = peft_model(idx).logits
        torch.testing.assert_close(model(idx), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(method.fold(model)(idx), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_token_methods_train_resume_and_generate(capsys, hf_pair, tmp_path, method):
    import gptlab
    from gptlab.generate import Engine, SamplingParams

    _, ckpt = hf_pair
    data = write_task(tmp_path / "task.jsonl")
    flags = [f"--method={method}", f"--{method}.virtual_tokens=6", "--train.lr_decay_steps=8"]
    assert finetune(capsys, ckpt, data, tmp_path / "a", *flags, "--train.max_steps=8")[0] == 0
    assert finetune(capsys, ckpt, data, tmp_path / "b", *flags, "--train.max_steps=4")[0] == 0
    assert finetune(capsys, ckpt, data, tmp_path / "b", *flags, "--train.max_steps=8", "--resume")[0] == 0
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    llm = gptlab.load(tmp_path / "a", device="cpu")
    assert llm.model.prefix is not None and llm.engine.context == 96 - 6
    prompt = llm.tokenizer.encode("The train 3 left <to-fr>")
    got = [int(t) for t in Engine(llm.model).generate_ids([prompt], 10, SamplingParams(temperature=0))]
    seq = list(prompt)
    with torch.no_grad():  # the uncached reference through the folded prefix
        for _ in range(10):
            seq.append(int(llm.model(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt):]


def test_llama_adapter_starts_as_the_base_and_its_gates_learn(capsys, hf_pair, tmp_path):
    from safetensors.torch import load_file

    import gptlab
    from gptlab.peft import LlamaAdapter

    _, ckpt = hf_pair
    model, _ = load_checkpoint(ckpt)
    base, _ = load_checkpoint(ckpt)
    method = LlamaAdapter(virtual_tokens=3, layers=1)
    method.attach(model)
    assert model.transformer.h[0].attn.adaption is None and model.transformer.h[1].attn.adaption is not None
    idx = torch.randint(0, 333, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), base(idx), atol=1e-6, rtol=0)  # zero gates
    data = write_task(tmp_path / "task.jsonl")
    code, err = finetune(capsys, ckpt, data, tmp_path / "la", "--method=llama-adapter",
                         "--llama_adapter.virtual_tokens=3", "--llama_adapter.layers=1", "--train.max_steps=6")
    assert code == 0, err
    saved = load_file(tmp_path / "la" / "adapter.safetensors")
    assert set(saved) == {"transformer.h.1.attn.adaption.prompt", "transformer.h.1.attn.adaption.gate"}
    assert saved["transformer.h.1.attn.adaption.gate"].abs().sum() > 0
    assert isinstance(gptlab.load(tmp_path / "la", device="cpu").generate("The train", max_new_tokens=4), str)


def test_soft_prompt_can_start_from_a_text(hf_pair, tokenizer):
    from gptlab.peft import PromptTuning

    model, _ = load_checkpoint(hf_pair[1])
    method = PromptTuning(virtual_tokens=5, init_text="Translate to French")
    method.init_ids = tokenizer.encode(method.init_text)  # as `gptlab finetune` does
    method.attach(model)
    ids = (method.init_ids * 5)[:5]
    torch.testing.assert_close(model.prompt.embedding.weight, model.transformer.wte.weight[ids])
    assert [n for n, _ in method.trainable(model)] == ["prompt.embedding.weight"]


def test_frozen_linears_stored_in_bf16_compute_exactly_what_autocast_did(hf_pair):
    """Under bf16 autocast the loop keeps a PEFT method's frozen Linear weights in bf16: same losses, same grads."""
    import copy

    from gptlab.train.loop import store_frozen_linears

    model, _ = load_checkpoint(hf_pair[1])
    LoRA(r=2, alpha=4).attach(model)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    stored = copy.deepcopy(model)
    store_frozen_linears(stored, torch.bfloat16)
    assert stored.transformer.h[0].attn.c_attn.base.weight.dtype == torch.bfloat16
    assert stored.transformer.h[0].attn.c_attn.lora_A.weight.dtype == torch.float32
    assert stored.transformer.wte.weight.dtype == torch.float32
    idx = torch.randint(0, 333, (2, 16))
    results = []
    for m in (model, stored):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = m(idx, idx)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in m.parameters() if p.requires_grad]))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)


def test_eight_bit_adamw_trains_and_resumes_exactly(capsys, hf_pair, tmp_path):
    """bitsandbytes' AdamW8bit through the loop: its quantized moments are saved and restored bit for bit."""
    pytest.importorskip("bitsandbytes")
    _, ckpt = hf_pair
    data = write_task(tmp_path / "task.jsonl")
    common = ["--method=full", "--train.lr_decay_steps=8", "--train.optimizer=adamw8bit"]
    assert finetune(capsys, ckpt, data, tmp_path / "a", *common, "--train.max_steps=8")[0] == 0
    assert finetune(capsys, ckpt, data, tmp_path / "b", *common, "--train.max_steps=4")[0] == 0
    assert finetune(capsys, ckpt, data, tmp_path / "b", *common, "--train.max_steps=8", "--resume")[0] == 0
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a")[8] < losses(tmp_path / "a")[1]
    saved = torch.load(tmp_path / "a" / "train_state.pt", weights_only=True)


    def tensors(x):
        if isinstance(x, dict):
            return [t for v in x.values() for t in tensors(v)]
        return [x] if torch.is_tensor(x) else []

    # matrices of 4096 weights or more keep 8-bit moments (bitsandbytes' threshold); smaller ones stay 32-bit
    assert any(t.dtype == torch.uint8 for t in tensors(saved["optimizer"]["state"]))
    code, err = finetune(capsys, ckpt, data, tmp_path / "c", "--method=lora", "--train.optimizer=sgd")
    assert code == 2 and "train.optimizer must be one of adamw, muon, adamw8bit" in err


def test_a_prepared_token_folder_is_continued_pretraining(hf_pair, tmp_path, capsys):
    """Token shards prepared with the base's tokenizer train as pretraining does, at the run's own context (prompt
    tuning's virtual tokens take positions); shards of another tokenizer, or for preference pairs, are one line."""
    from gptlab.data.loader import TokenShards
    from gptlab.data.prepare import prepare

    from .conftest import TEXT

    hf, ckpt = hf_pair
    (tmp_path / "docs.txt").write_text(TEXT)
    prepare([str(tmp_path / "docs.txt")], tmp_path / "data", tokenizer=str(ckpt), val_fraction=0.2, progress=False)
    flags = ["--quiet", "--train.max_steps=2", "--train.batch_size=2", "--train.eval_every=2", "--train.log_every=1"]
    assert main(["finetune", str(ckpt), "--method", "full", "--data", str(tmp_path / "data"),
                 "--out", str(tmp_path / "full"), "--train.lr=1e-9", *flags]) == 0
    first = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[0])
    x, y = TokenShards(tmp_path / "data").batch("train", (1337, 0, 0), 2, 96)  # the loop's seed, step 0, micro 0
    with torch.no_grad():
        want = hf(x, labels=x).loss.item()  # transformers shifts the labels itself
    assert y.shape == (2, 96) and first["loss"] == pytest.approx(want, rel=1e-4)
    assert main(["finetune", str(ckpt), "--method", "prompt", "--prompt.virtual_tokens=4",
                 "--data", str(tmp_path / "data"), "--out", str(tmp_path / "prompt"), *flags]) == 0
    capsys.readouterr()
    prepare([str(tmp_path / "docs.txt")], tmp_path / "chars", tokenizer="char", progress=False)
    for method, data in (("full", "chars"), ("dpo", "data")):
        assert main(["finetune", str(ckpt), "--method", method, "--data", str(tmp_path / data),
                     "--out", str(tmp_path / f"bad-{method}"), *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("another tokenizer" in err or "preference pairs" in err), err


def test_compare_counts_what_each_method_trains_and_refuses_preference_methods(hf_pair, tmp_path, capsys):
    """A method that trains the base itself (full, qat) trains 100% of a model of the base's size; one that adds
    adapters trains them on top; dpo and orpo, which need preference pairs, are refused before anything runs."""
    from gptlab.compare import count_parameters

    _, ckpt = hf_pair
    model, _ = load_checkpoint(ckpt)
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(ckpt, "full") == count_parameters(ckpt, "qat") == (total, total)
    lora, with_lora = count_parameters(ckpt, "lora")
    assert 0 < lora < total and with_lora == total + lora
    (tmp_path / "task.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    capsys.readouterr()
    assert main(["compare", str(ckpt), "--data", str(tmp_path / "task.jsonl"), "--methods", "lora,dpo", "--steps",
                 "1", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "preference pairs" in err and not (tmp_path / "c").exists()

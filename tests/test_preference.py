"""Preference tuning (DPO, its robust and IPO variants, ORPO) through the one loop: the losses and every gradient
equal TRL's own computation on the same model and tokens; the data's bad records are counted; runs resume exactly
and their folders are ordinary LoRA runs or checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gptlab.checkpoint import load_checkpoint
from gptlab.cli import main
from gptlab.data.preferences import Preference, PreferenceBatches, load_preferences, stdlib_preferences
from gptlab.errors import GptlabError
from gptlab.peft.preference import DPO, ORPO

RECORDS = [
    {"prompt": "The train left the", "chosen": " station at noon.", "rejected": " ship left at dawn, late."},
    {"prompt": "def add(a, b):", "chosen": " return a + b", "rejected": " tabs and spaces"},
    {"prompt": "Le train a", "chosen": " quitté la gare.", "rejected": " the harbour"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_bad_records_are_counted_and_reported_not_kept(tmp_path, capsys):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join([
        json.dumps(RECORDS[0]), json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}),
        json.dumps({"prompt": "p", "chosen": "x"}), json.dumps({"prompt": "p", "chosen": "", "rejected": "y"}),
        "{not json", json.dumps({"prompt": [{"role": "user", "content": "hi"}],
                                 "chosen": [{"role": "assistant", "content": "hello"}], "rejected": "go away"}),
    ]) + "\n")
    prefs = load_preferences(path)
    assert [p.chosen for p in prefs] == [" station at noon.", "hello"] and prefs[1].chat
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipped 4 of 6 preference records" in err
    for why in ("chosen equal to rejected", "missing prompt, chosen or rejected", "an empty completion", "not JSON"):
        assert f"1 {why}" in err
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "s", "rejected": "s"}])
    with pytest.raises(GptlabError, match="no usable preference records"):
        load_preferences(tmp_path / "bad.jsonl")


def test_the_builtin_preferences_pair_each_function_with_its_own_summary():
    prefs = stdlib_preferences()
    assert len(prefs) > 1000 and all(p.chosen != p.rejected for p in prefs)
    assert prefs == stdlib_preferences()  # the same pairs on every run


def test_a_batch_is_pairs_of_rows_scoring_the_completions_only(tokenizer):
    prefs = [Preference(**r) for r in RECORDS]
    batches = PreferenceBatches({"train": prefs}, tokenizer, block_size=64)
    x, y = batches.batch("train", (0, 0, 0), 3, 64)
    assert x.shape == y.shape and x.size(0) == 6
    for row in range(6):
        ids = x[row][y[row] != -100].tolist()  # the inputs whose next token is scored
        scored = y[row][y[row] != -100].tolist()
        text = tokenizer.decode(scored)
        assert text.endswith("<|endoftext|>") and ids  # the completion and its end token
    # rows 2i and 2i + 1 share their prompt and hold the chosen and the rejected completion
    chosen = tokenizer.decode(y[0][y[0] != -100].tolist())
    rejected = tokenizer.decode(y[1][y[1] != -100].tolist())
    assert {chosen, rejected} <= {r[k] + "<|endoftext|>" for r in RECORDS for k in ("chosen", "rejected")}
    assert chosen != rejected


def test_with_lora_the_reference_is_the_base_and_the_first_loss_is_log2(hf_pair):
    """LoRA starts at B = 0, so the policy is the reference: every reward is 0 and DPO's loss is log 2."""
    _, ckpt = hf_pair
    model, tok = load_checkpoint(ckpt)
    method = DPO(lora={"r": 4, "alpha": 8, "targets": "c_attn"})
    method.attach(model)
    batches = PreferenceBatches({"train": [Preference(**r) for r in RECORDS]}, tok, 64)
    x, y = batches.batch("train", (0, 0, 0), 3, 64)
    loss, stats = method.loss(model, x, y)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    assert stats["rewards/margins"].item() == 0
    torch.nn.init.normal_(model.transformer.h[0].attn.c_attn.lora_B.weight, std=0.5)
    loss, stats = method.loss(model, x, y)
    assert loss.item() != pytest.approx(math.log(2)) and stats["rewards/margins"].item() != 0


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_a_preference_run_resumes_exactly_and_loads_as_its_adapter(hf_pair, tmp_path, method):
    _, ckpt = hf_pair
    data = write_jsonl(tmp_path / "prefs.jsonl", RECORDS * 4)
    common = ["finetune", str(ckpt), "--method", method, "--data", str(data), "--quiet", "--train.batch_size=2",
              "--train.log_every=1", "--train.eval_every=2", "--train.eval_steps=1", "--train.lr=1e-2",
              "--lora.r=4", "--train.save_every=2", "--train.lr_decay_steps=4"]
    assert main([*common, "--out", str(tmp_path / "full"), "--train.max_steps=4"]) == 0
    assert main([*common, "--out", str(tmp_path / "split"), "--train.max_steps=2"]) == 0
    assert main([*common, "--out", str(tmp_path / "split"), "--train.max_steps=4", "--resume"]) == 0

    def records(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    def drop_time(rs):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s", "train_s", "peak_memory_mb")}
                for r in rs]

    assert drop_time(records(tmp_path / "split")) == drop_time(records(tmp_path / "full"))
    last = records(tmp_path / "full")
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(last[-2])
    assert "val_rewards/accuracies" in last[-1] and "val_ppl" not in last[-1]
    config = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert config["method"] == "lora"  # what it trained: generate, serve and export take it as a LoRA run
    model, _ = load_checkpoint(tmp_path / "full")
    base, _ = load_checkpoint(ckpt)
    assert not torch.equal(model.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)


def test_full_dpo_keeps_a_frozen_reference_and_saves_a_checkpoint(hf_pair, tmp_path):
    _, ckpt = hf_pair
    data = write_jsonl(tmp_path / "prefs.jsonl", RECORDS * 4)
    assert main(["finetune", str(ckpt), "--method", "dpo", "--dpo.adapter", "full", "--data", str(data), "--quiet",
                 "--out", str(tmp_path / "run"), "--train.max_steps=3", "--train.batch_size=2",
                 "--train.eval_every=0", "--train.lr=1e-3"]) == 0
    run = tmp_path / "run"
    assert (run / "model.safetensors").is_file() and not (run / "adapter_config.json").exists()
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isclose(first["loss"], math.log(2), rel_tol=1e-5)  # the policy starts as its reference


@pytest.mark.parametrize("argv, message", [
    (["--method", "dpo", "--dpo.loss_type", "hinge"], "dpo.loss_type must be sigmoid, robust or ipo"),
    (["--method", "dpo", "--dpo.beta", "0"], "dpo.beta must be > 0"),
    (["--method", "orpo", "--orpo.adapter", "qlora"], "orpo.adapter must be lora or full"),
    (["--method", "dpo", "--dpo.label_smoothing", "0.5"], "dpo.label_smoothing must be in [0, 0.5)"),
])
def test_bad_preference_settings_are_one_line(hf_pair, tmp_path, capsys, argv, message):
    data = write_jsonl(tmp_path / "prefs.jsonl", RECORDS)
    capsys.readouterr()
    assert main(["finetune", str(hf_pair[1]), "--data", str(data), "--out", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "x").exists()


def test_chat_preferences_need_the_base_to_have_a_chat_template(hf_pair, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello",
                                                  "rejected": "go"}] * 3)
    capsys.readouterr()
    assert main(["finetune", str(hf_pair[1]), "--method", "dpo", "--data", str(data), "--out",
                 str(tmp_path / "x")]) == 2
    assert "has no chat template" in capsys.readouterr().err


CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # GPT-2's transposed
CASES = [("dpo", "sigmoid", 0.0), ("dpo", "robust", 0.1), ("dpo", "ipo", 0.0), ("orpo", None, 0.0)]


@pytest.fixture(scope="module")
def hf_folder(hf_pair, tmp_path_factory):
    """The harness's GPT-2 as transformers reads it, tokenizer files included."""
    from gptlab.interop.hf import export_hf

    return export_hf(hf_pair[1], tmp_path_factory.mktemp("trl") / "hf")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("method, loss_type, smoothing", CASES, ids=[f"{m}-{t}" if t else m for m, t, _ in CASES])
def test_losses_and_every_gradient_equal_trl(hf_pair, hf_folder, method, loss_type, smoothing, lora):
    """On the same GPT-2, the same tokens (TRL's own batch) and, with LoRA, the same adapters: the loss to 1e-5 and
    every gradient to 1e-5, as TRL's DPOTrainer and ORPOTrainer compute them (reference: a frozen copy, or with
    LoRA the adapters switched off)."""
    pytest.importorskip("trl")
    from .trl_harness import trl_dpo, trl_orpo

    peft_lora = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"], "lora_dropout": 0.0,
                 "fan_in_fan_out": True} if lora else None
    if method == "dpo":
        theirs = trl_dpo(hf_folder, hf_folder, RECORDS, beta=0.1, loss_type=loss_type, label_smoothing=smoothing,
                         lora=peft_lora)
        ours = DPO(beta=0.1, loss_type=loss_type, label_smoothing=smoothing, adapter="lora" if lora else "full",
                   lora={"r": 4, "alpha": 8, "targets": "c_attn,c_proj"})
    else:
        theirs = trl_orpo(hf_folder, hf_folder, RECORDS, beta=0.1, lora=peft_lora)
        ours = ORPO(beta=0.1, adapter="lora" if lora else "full", lora={"r": 4, "alpha": 8, "targets": "c_attn,c_proj"})
    model, _ = load_checkpoint(hf_pair[1])
    ours.attach(model)
    model.train()
    for name, value in theirs.lora_weights.items():
        model.get_parameter(name.replace("base_model.model.", "").replace(".default", "")).data.copy_(value)
    n = theirs.input_ids.size(0) // 2  # TRL: chosen rows, then rejected; gptlab: each pair side by side
    order = [i for pair in zip(range(n), range(n, 2 * n)) for i in pair]
    ids, mask = theirs.input_ids[order], theirs.completion_mask[order]
    x, y = ids[:, :-1], torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
    loss, stats = ours.loss(model, x, y)
    loss.backward()
    assert loss.item() == pytest.approx(theirs.loss, abs=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == len(theirs.grads)
    for name, want in theirs.grads.items():
        key = name.replace("base_model.model.", "").replace(".default", "")
        got = grads[key].T if not lora and key.endswith(CONV1D) else grads[key]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        if key in theirs.metrics:
            assert stats[key].item() == pytest.approx(theirs.metrics[key], abs=1e-5), key


def test_chat_preferences_on_a_family_model_with_its_own_template(tmp_path):
    """A Qwen2 model and tokenizer as transformers builds them: chat prompts through its ChatML template, only the
    final answer and its end-of-turn scored, a run that generates in chat."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from gptlab.interop.hf import import_hf
    from gptlab.tokenizer import Tokenizer

    from . import hub_tokenizers

    hf = tmp_path / "hf"
    hf.mkdir()
    hub_tokenizers.qwen(hf)
    tok = AutoTokenizer.from_pretrained(hf)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                                 eos_token_id=tok.eos_token_id, tie_word_embeddings=True)).save_pretrained(hf)
    import_hf(hf, tmp_path / "ckpt")
    records = [{"prompt": [{"role": "user", "content": f"About {i}?"}],
                "chosen": [{"role": "assistant", "content": f"{i} is fine."}], "rejected": f"no {i}"} for i in range(8)]
    data = write_jsonl(tmp_path / "prefs.jsonl", records)
    ours = Tokenizer.from_folder(tmp_path / "ckpt")
    x, y = PreferenceBatches({"train": load_preferences(data)}, ours, 128).batch("train", (0, 0, 0), 1, 128)
    picked = next(r for r in records if ours.decode(x[0].tolist()).endswith(r["chosen"][0]["content"] + "<|im_end|>"))
    rendered = tok.apply_chat_template(picked["prompt"] + picked["chosen"], tokenize=False)
    assert rendered.startswith(ours.decode(x[0].tolist()))  # the chosen row (the longer: no padding) is its chat
    scored = [ours.decode(y[r][y[r] != -100].tolist()) for r in range(2)]
    assert scored == [picked["chosen"][0]["content"] + "<|im_end|>\n", picked["rejected"] + "<|im_end|>\n"]
    assert main(["finetune", str(tmp_path / "ckpt"), "--method", "dpo", "--data", str(data), "--out",
                 str(tmp_path / "dpo"), "--quiet", "--train.max_steps=2", "--train.batch_size=2",
                 "--train.eval_every=0"]) == 0
    assert main(["generate", str(tmp_path / "dpo"), "--chat", "--prompt", "About 3?", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0

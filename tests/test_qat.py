"""Quantization-aware training through the one loop: fake quantization is `gptlab quantize`'s own rounding with a
straight-through gradient; each checkpoint is a real quantized checkpoint whose logits equal the fake-quantized
forward; fake quantization starts when asked; runs resume exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptlab.checkpoint import load_checkpoint
from gptlab.cli import main
from gptlab.peft.qat import QAT, QATLinear, fake_quantize
from gptlab.quant.formats import QuantSpec, dequantize, quantize

LORA = {"r": 4, "alpha": 8, "targets": "c_attn,c_proj,c_fc"}


def task(tmp_path: Path) -> Path:
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"The train {i} left", "completion": " at noon."}) + "\n"
                            for i in range(16)))
    return path


def run(ckpt, out, data, *flags, steps=3):
    return main(["finetune", str(ckpt), "--method", "qat", "--data", str(data), "--out", str(out), "--quiet",
                 f"--train.max_steps={steps}", "--train.batch_size=2", "--train.eval_every=0", "--train.log_every=1",
                 "--train.save_every=2", "--train.lr_decay_steps=4", "--train.lr=3e-3", *flags])


def test_fake_quantization_is_the_checkpoints_rounding_with_a_straight_through_gradient():
    torch.manual_seed(0)
    for spec in (QuantSpec("int4", 16), QuantSpec("nf4", 64), QuantSpec("int8")):
        linear = torch.nn.Linear(64, 24)
        layer = QATLinear.wrap(linear, spec)
        layer.active = True
        x = torch.randn(5, 64)
        rounded = dequantize(quantize(linear.weight, spec), spec, (24, 64))
        torch.testing.assert_close(fake_quantize(linear.weight, spec), rounded, atol=0, rtol=0)
        layer(x).square().sum().backward()
        plain = torch.nn.Linear(64, 24)
        with torch.no_grad():
            plain.weight.copy_(rounded)
            plain.bias.copy_(linear.bias)
        plain(x).square().sum().backward()
        torch.testing.assert_close(linear.weight.grad, plain.weight.grad)  # d loss / d W = d loss / d round(W)
        assert not torch.equal(rounded, linear.weight)


@pytest.mark.parametrize("flags, scheme", [(["--qat.group_size", "16"], "int4"), (["--qat.scheme", "int8"], "int8"),
                                           (["--qat.adapter", "lora", "--qat.group_size", "16", "--lora.r", "4",
                                             "--lora.alpha", "8"],
                                            "int4")],
                         ids=["full-int4", "full-int8", "lora-int4"])  # (NF4's blocks of 64 do not divide 48)
def test_the_run_is_a_quantized_checkpoint_equal_to_its_fake_quantized_forward(hf_pair, tmp_path, flags, scheme):
    _, ckpt = hf_pair
    assert run(ckpt, tmp_path / "qat", task(tmp_path), *flags) == 0
    quantized, _ = load_checkpoint(tmp_path / "qat")
    assert quantized.quantization.scheme == scheme
    model, _ = load_checkpoint(ckpt)
    lora = "lora" in flags
    method = QAT(scheme=scheme, group_size=16 if scheme == "int4" else None, adapter="lora" if lora else "full",
                 lora=LORA if lora else None)
    method.attach(model)
    method.restore(model, tmp_path / "qat")
    method.begin_step(model, 2)
    idx = torch.randint(0, 333, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(quantized(idx), model.eval()(idx), atol=1e-5, rtol=1e-5)
        method.begin_step(model, -1)  # the float weights alone differ: the rounding is what was trained through
        assert not torch.allclose(quantized(idx), model(idx), atol=1e-4)
    assert main(["generate", str(tmp_path / "qat"), "--prompt", "The", "--max-new-tokens", "3"]) == 0


def test_fake_quantization_starts_at_its_step_and_a_run_resumes_exactly(hf_pair, tmp_path):
    _, ckpt = hf_pair
    data = task(tmp_path)

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    flags = ["--qat.start_step", "2", "--qat.group_size", "16"]
    assert run(ckpt, tmp_path / "qat", data, *flags, steps=4) == 0
    assert run(ckpt, tmp_path / "split", data, *flags, steps=2) == 0
    assert run(ckpt, tmp_path / "split", data, *flags, "--resume", steps=4) == 0
    assert losses(tmp_path / "split") == losses(tmp_path / "qat")
    full = main(["finetune", str(ckpt), "--method", "full", "--data", str(data), "--out", str(tmp_path / "full"),
                 "--quiet", "--train.max_steps=4", "--train.batch_size=2", "--train.eval_every=0",
                 "--train.log_every=1", "--train.lr_decay_steps=4", "--train.lr=3e-3"])
    assert full == 0
    ours, plain = losses(tmp_path / "qat"), losses(tmp_path / "full")
    assert ours[:2] == plain[:2] and ours[2] != plain[2]  # steps 0 and 1 in float, then through the rounding


@pytest.mark.parametrize("flags, message", [
    (["--qat.scheme", "fp8"], "qat.scheme must be int4, nf4 or int8"),
    (["--qat.group_size", "7"], "group size"),
    ([], "group size 64 does not divide the width 48"),  # the default group, on a model 48 wide
    (["--qat.adapter", "prefix"], "qat.adapter must be full or lora"),
])
def test_bad_qat_settings_are_one_line(hf_pair, tmp_path, capsys, flags, message):
    capsys.readouterr()
    assert run(hf_pair[1], tmp_path / "x", task(tmp_path), *flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "x").exists()

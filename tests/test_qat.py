"""Quantization-aware training through the one loop: fake quantization is `gptlab quantize`'s own rounding with a
straight-through gradient; each checkpoint is a real quantized checkpoint whose logits equal the fake-quantized
forward; fake quantization starts when asked; runs resume exactly."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from gptlab.checkpoint import load_checkpoint
from gptlab.cli import main
from gptlab.peft.qat import QAT, QATLinear, fake_quantize
from gptlab.quant.formats import QuantSpec, dequantize, quantize, unpack_nibbles

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


def torchao_qat():
    """torchao's QAT modules and quantization primitives (a test dependency). Its import logs that the optional CUDA
    kernels of the wheel do not load on a CPU build; fake quantization is plain PyTorch, so that log is kept quiet."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    from torchao.quantization import qat, quant_primitives

    return qat, quant_primitives


def weights() -> torch.Tensor:
    """A (64, 256) matrix with one all-zero row (a pruned unit: its groups have no scale)."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    w[5] = 0
    return w


def codes(parts: dict[str, torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """The signed integer codes (out, in) of a stored int4 or int8 matrix."""
    q = parts["qweight"]
    return q if spec.scheme == "int8" else unpack_nibbles(q).to(torch.int8) - 8


@pytest.mark.parametrize("spec", [QuantSpec("int4", 32), QuantSpec("int4", 64), QuantSpec("int4", 128),
                                  QuantSpec("int8")], ids=["int4-g32", "int4-g64", "int4-g128", "int8-row"])
def test_int4_and_int8_fake_quantization_are_torchaos_symmetric_absmax_quantization(spec):
    """Our int4 (int8) is torchao's symmetric affine quantization over the codes -7..7 (-127..127): scale
    absmax / 7 (/ 127) in float32 per group of a row, zero point 0, round half to even, clamp. torchao's
    `choose_qparams_affine` gives our scales bit for bit and `quantize_affine` our codes; its `IntxFakeQuantizer`,
    given those scales, our fake-quantized weight and our straight-through gradient, to a float32 rounding (it
    multiplies the code by absmax / 7 where we multiply absmax by the level code / 7)."""
    qat, prim = torchao_qat()
    w = weights()
    levels = 7 if spec.scheme == "int4" else 127
    g = spec.group(w.shape[1])
    parts = quantize(w, spec)
    scale, zero = prim.choose_qparams_affine(w, prim.MappingType.SYMMETRIC, (1, g), torch.int8, quant_min=-levels,
                                             quant_max=levels, scale_dtype=torch.float32)
    absmax, scale = parts["absmax"], scale.flatten()
    assert torch.equal(scale[absmax > 0], absmax[absmax > 0] / levels) and not zero.any()
    q = prim.quantize_affine(w, (1, g), scale, zero, torch.int8, quant_min=-levels, quant_max=levels)
    assert torch.equal(q, codes(parts, spec))

    granularity = {"group_size": g} if spec.scheme == "int4" else {"granularity": "per_channel"}
    dtype = torch.int4 if spec.scheme == "int4" else torch.int8  # codes -8..7, -128..127: ours never reach -8, -128
    fq = qat.IntxFakeQuantizer(qat.IntxFakeQuantizeConfig(dtype, is_dynamic=False, **granularity))
    fq.scale, fq.zero_point = scale.view(w.shape[0], -1), zero.view(w.shape[0], -1).to(torch.int32)
    theirs_w, ours_w = w.clone().requires_grad_(), w.clone().requires_grad_()
    theirs, ours = fq(theirs_w), fake_quantize(ours_w, spec)
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)
    assert not ours[5].any() and not theirs[5].any()
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    (theirs * upstream).sum().backward()
    (ours * upstream).sum().backward()
    assert torch.equal(ours_w.grad, upstream)  # straight through, every weight (none is clipped)
    torch.testing.assert_close(theirs_w.grad, ours_w.grad, atol=1e-6, rtol=0)  # theirs: upstream * scale / scale


def test_torchaos_default_int4_fake_quantizer_is_another_format():
    """torchao's default int4 weight fake quantizer, `IntxFakeQuantizeConfig(torch.int4, group_size=g)`, is symmetric
    over all 16 codes -8..7 with scale absmax / 7.5 (not ours: -7..7, absmax / 7): steps 7% finer, but a group whose
    largest magnitude is positive puts it at round(7.5) = 8, clipped to 7, i.e. to 14/15 of its value, and that
    weight gets no gradient. (torchao's Int4WeightOnlyConfig QAT is further off: asymmetric, 16 codes over
    [min, max] with scale (max - min) / 15 and a float zero point.) This pins that reading of torchao's numbers."""
    qat, _ = torchao_qat()
    w = weights()
    g = 32
    x = w.clone().requires_grad_()
    theirs = qat.IntxFakeQuantizer(qat.IntxFakeQuantizeConfig(torch.int4, group_size=g))(x)
    groups = w.view(-1, g)
    scale = (groups.abs().amax(dim=1, keepdim=True) / 7.5).clamp(min=torch.finfo(torch.float32).smallest_normal)
    formula = (torch.round(groups * (1 / scale)).clamp(-8, 7) * scale).view(w.shape)
    torch.testing.assert_close(theirs, formula, atol=1e-6, rtol=0)
    ours = fake_quantize(w, QuantSpec("int4", g))
    assert (theirs - ours).abs().max() > 0.3
    theirs.sum().backward()
    clipped = x.grad == 0
    positive_max = ((groups == groups.amax(dim=1, keepdim=True)) & (groups > 0)).view(w.shape)
    assert clipped.any() and not (clipped & ~positive_max).any()  # only a group's positive extreme, in some groups
    torch.testing.assert_close(theirs[clipped], w[clipped] * 14 / 15, atol=1e-6, rtol=0)


_LORA_FLAGS = ["--qat.adapter", "lora", "--qat.group_size", "16", "--lora.r", "4", "--lora.alpha", "8"]


@pytest.mark.parametrize("flags, scheme", [(["--qat.group_size", "16"], "int4"), (["--qat.scheme", "int8"], "int8"),
                                           (_LORA_FLAGS, "int4"),
                                           ([*_LORA_FLAGS, "--lora.targets", "c_attn"], "int4")],
                         ids=["full-int4", "full-int8", "lora-int4", "lora-some-layers"])  # (NF4's 64 do not divide 48)
def test_the_run_is_a_quantized_checkpoint_equal_to_its_fake_quantized_forward(hf_pair, tmp_path, flags, scheme):
    """Layers outside LoRA's targets are frozen but fake-quantized too: the checkpoint quantizes every layer."""
    _, ckpt = hf_pair
    assert run(ckpt, tmp_path / "qat", task(tmp_path), *flags) == 0
    quantized, _ = load_checkpoint(tmp_path / "qat")
    assert quantized.quantization.scheme == scheme
    model, _ = load_checkpoint(ckpt)
    lora = "lora" in flags
    targets = flags[flags.index("--lora.targets") + 1] if "--lora.targets" in flags else LORA["targets"]
    method = QAT(scheme=scheme, group_size=16 if scheme == "int4" else None, adapter="lora" if lora else "full",
                 lora={**LORA, "targets": targets} if lora else None)
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
    (["--qat.adapter", "lora", "--qat.group_size", "16", "--lora.dropout", "0.1"], "set it to 0"),
    (["--qat.group_size", "32"], "choose a --qat.group_size that divides"),
])
def test_bad_qat_settings_are_one_line(hf_pair, tmp_path, capsys, flags, message):
    capsys.readouterr()
    assert run(hf_pair[1], tmp_path / "x", task(tmp_path), *flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "x").exists()


def test_bf16_lora_qat_on_a_float_base_only_and_resumed_with_its_own_settings(hf_pair, tmp_path, capsys):
    """A bf16 run's checkpoint serves (its frozen weights come back to float); a quantized base is refused, as is a
    resume with other settings (another scheme, group or rank would load the run into another model)."""
    _, ckpt = hf_pair
    data = task(tmp_path)
    assert run(ckpt, tmp_path / "bf16", data, *_LORA_FLAGS, "--train.dtype", "bfloat16") == 0
    model, _ = load_checkpoint(tmp_path / "bf16")
    assert {p.dtype for p in model.parameters()} | {b.dtype for b in model.buffers() if b.is_floating_point()} \
        == {torch.float32}
    assert main(["generate", str(tmp_path / "bf16"), "--prompt", "The", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert run(tmp_path / "bf16", tmp_path / "again", data, *_LORA_FLAGS) == 2
    assert "needs float weights" in capsys.readouterr().err and not (tmp_path / "again").exists()
    for changed, message in [(["--qat.scheme", "int8"], "--qat.scheme \"int4\", not \"int8\""),
                             (["--lora.r", "2"], "--lora.r 4, not 2")]:
        flags = [*_LORA_FLAGS, *changed, "--train.dtype", "bfloat16", "--resume"]
        assert run(ckpt, tmp_path / "bf16", data, *flags, steps=5) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err

"""Quantization against bitsandbytes and independent references, quantized checkpoints through every verb, the
inference kernels against the dequantized model, QLoRA equal to LoRA on the dequantized base, and one clear line for
each bad input."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import gptlab
from gptlab.checkpoint import load_checkpoint, save_checkpoint
from gptlab.cli import main
from gptlab.config import ModelConfig
from gptlab.generate import Engine, SamplingParams
from gptlab.inference import prepare_for_inference
from gptlab.model import GPT
from gptlab.peft.lora import LoRA, LoRALinear, QLoRA
from gptlab.quant import formats, kernels
from gptlab.quant.formats import LEVELS, QuantSpec, dequantize, quantize
from gptlab.quant.kernels import Bnb4bitLinear, FusedQuantLinear, Int8Linear, TinygemmLinear, kernel_for
from gptlab.quant.layers import QuantLinear, dequantize_model, quantize_model

F = pytest.importorskip("bitsandbytes.functional")
SPECS = [QuantSpec("int8"), QuantSpec("int8", 32), QuantSpec("int4"), QuantSpec("int4", 32, True),
         QuantSpec("nf4"), QuantSpec("nf4", 128, True), QuantSpec("fp4"), QuantSpec("fp4", 64, True)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    """A small float checkpoint whose widths (64, 256) take groups of 64."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)
    path = tmp_path_factory.mktemp("quant") / "float"
    save_checkpoint(path, GPT(cfg), tokenizer)
    return path


def weight(rows: int = 48, cols: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[3, 17] = 0.9  # an outlier: its group's other weights lose precision, as they would in a real model
    w[5, :64] = 0.0  # an all-zero group
    return w


def test_level_tables_are_bitsandbytes_own():
    for scheme in ("nf4", "fp4"):
        assert F.get_4bit_type(scheme, device="cpu").tolist() == list(LEVELS[scheme])


@pytest.mark.parametrize("scheme", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_codes_and_scales_equal_quantize_4bit(ckpt, tmp_path, scheme, double_quant):
    """Through a checkpoint on disk: the stored codes and scales are bitsandbytes' own for the same weights."""
    out = tmp_path / scheme
    argv = ["quantize", str(ckpt), "--scheme", scheme, "--out", str(out)] + (["--double-quant"] if double_quant else [])
    assert main(argv) == 0
    stored = load_file(str(out / "model.safetensors"))
    source = load_file(str(ckpt / "model.safetensors"))
    name = "transformer.h.1.mlp.c_proj"
    w = source[f"{name}.weight"]  # (64, 256)
    q, state = F.quantize_4bit(w, blocksize=64, quant_type=scheme, compress_statistics=double_quant)
    assert torch.equal(stored[f"{name}.qweight"].flatten(), q.flatten())
    assert torch.equal(stored[f"{name}.absmax"], state.absmax)
    if double_quant:
        assert torch.equal(stored[f"{name}.nested_absmax"], state.state2.absmax)
        assert torch.equal(stored[f"{name}.nested_code"], state.state2.code)
        assert torch.equal(stored[f"{name}.offset"], state.offset)
    # and the float weights they stand for are bitsandbytes' dequantization
    ours = load_checkpoint(out)[0].get_submodule(name).dequantize(torch.float32)
    torch.testing.assert_close(ours, F.dequantize_4bit(q, state), rtol=0, atol=0)
    assert json.loads((out / "config.json").read_text())["quantization"] == \
        {"scheme": scheme, "group_size": None, "double_quant": double_quant}


def test_int8_per_row_equals_llm_int8_quantization():
    w = weight()
    parts = quantize(w, QuantSpec("int8"))
    codes, row_absmax, _ = F.int8_vectorwise_quant(w)
    assert torch.equal(parts["qweight"], codes)
    torch.testing.assert_close(parts["absmax"], row_absmax)


def test_int4_equals_a_nearest_level_reference():
    """Our int4 against an independent formulation: each weight takes the nearest of the 15 levels of its group."""
    w = weight().numpy().astype(np.float64)
    parts = quantize(torch.from_numpy(w).float(), QuantSpec("int4", 32))
    groups = w.reshape(-1, 32)
    absmax = np.abs(groups).max(axis=1, keepdims=True)
    levels = np.arange(-7, 8) / 7
    scaled = np.divide(groups, absmax, out=np.zeros_like(groups), where=absmax > 0)
    nearest = np.abs(scaled[..., None] - levels).argmin(-1) - 7 + 8  # stored codes are value + 8
    codes = formats.unpack_nibbles(parts["qweight"]).reshape(-1, 32).numpy()
    disagree = codes != nearest
    # ties (exactly half-way between two levels) may round either way; nothing else may differ
    assert disagree.sum() <= 2, np.argwhere(disagree)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_dequantized_error_is_within_the_scheme_bound(spec):
    w = weight()
    parts = quantize(w, spec)
    deq = dequantize(parts, spec, tuple(w.shape))
    g = spec.group(w.shape[1])
    absmax = w.view(-1, g).abs().amax(1, keepdim=True)
    if spec.scheme == "int8":
        half_gap = 0.5 / 127
    elif spec.scheme == "int4":
        half_gap = 0.5 / 7
    else:
        levels = sorted(LEVELS[spec.scheme])
        half_gap = max(b - a for a, b in zip(levels, levels[1:])) / 2
    bound = half_gap * absmax
    if spec.double_quant:  # the scales carry their own 8-bit error (relative, about 1%)
        scale = formats.scales(parts)[:, None]
        assert ((scale - absmax).abs() <= 0.02 * absmax.max()).all()
        bound = half_gap * scale + (scale - absmax).abs()
    err = (deq - w).view(-1, g).abs()
    assert (err <= bound + 1e-6).all(), (err - bound).max()
    assert deq[5, :64].abs().max() < 1e-3  # zero weights stay (near) zero


@pytest.mark.parametrize("spec", [s for s in SPECS if s.scheme in ("nf4", "fp4")], ids=str)
def test_plain_pytorch_dequantization_equals_bitsandbytes(spec, monkeypatch):
    """Where bitsandbytes is missing, loading a quantized checkpoint still works, with the same numbers."""
    w = weight()
    parts = quantize(w, spec)
    want = dequantize(parts, spec, tuple(w.shape))
    monkeypatch.setattr(formats, "has_bnb", lambda: False)
    torch.testing.assert_close(dequantize(parts, spec, tuple(w.shape)), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4", "fp4"])
def test_quantized_model_generates_what_its_dequantized_copy_does(ckpt, tmp_path, scheme):
    out = tmp_path / scheme
    assert main(["quantize", str(ckpt), "--scheme", scheme, "--out", str(out), "--group-size", "32"]) == 0
    quantized, tokenizer = load_checkpoint(out)
    assert quantized.quantization == QuantSpec(scheme, 32)
    assert any(isinstance(m, QuantLinear) for m in quantized.modules())
    floated = dequantize_model(copy.deepcopy(quantized))
    assert not any(isinstance(m, QuantLinear) for m in floated.modules())
    prompt = [tokenizer.encode("The train left")]
    greedy = SamplingParams(temperature=0.0)
    got = torch.stack(list(Engine(quantized, tokenizer).generate_ids(prompt, 40, greedy)))
    want = torch.stack(list(Engine(floated, tokenizer).generate_ids(prompt, 40, greedy)))
    assert torch.equal(got, want)
    original, _ = load_checkpoint(ckpt)
    idx = torch.tensor(prompt)
    with torch.no_grad():
        torch.testing.assert_close(quantized(idx), original(idx), atol=0.05 if scheme == "int8" else 0.5, rtol=0)


def test_quantized_folder_works_in_generate_evaluate_api_and_bf16(ckpt, tmp_path, capsys):
    out = tmp_path / "nf4"
    assert main(["quantize", str(ckpt), "--scheme", "nf4", "--double-quant", "--out", str(out)]) == 0
    assert (out / "model.safetensors").stat().st_size < 0.5 * (ckpt / "model.safetensors").stat().st_size
    assert not list(out.glob("*.pt")) and not list(out.glob("*.bin"))  # no pickles
    assert main(["generate", str(out), "--prompt", "The train", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    layer = load_checkpoint(out, dtype=torch.bfloat16)[0].transformer.h[0].mlp.c_fc
    assert isinstance(layer, QuantLinear) and layer.dtype == torch.bfloat16
    assert layer.absmax.dtype == torch.uint8 and layer.nested_absmax.dtype == torch.float32  # scales keep float32
    llm = gptlab.load(out, device="cpu", dtype="bf16")
    assert isinstance(llm.model.transformer.h[0].mlp.c_fc, Bnb4bitLinear if BNB_CPU_KERNEL else QuantLinear)
    assert isinstance(llm.generate("The train", max_new_tokens=4, temperature=0), str)
    text = tmp_path / "text"
    text.mkdir()
    for i in range(4):
        (text / f"{i}.txt").write_text("The train left the station at noon.\n" * 30)
    data = tmp_path / "data"
    assert main(["prepare", str(text), "--out", str(data), "--tokenizer", str(ckpt / "tokenizer.json"),
                 "--val-fraction", "0.5"]) == 0
    assert main(["evaluate", str(out), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["perplexity"] > 1


BNB_CPU_KERNEL = kernels.bnb_kernel_known()  # bitsandbytes registers its fused 4-bit CPU kernel on AVX-512 BF16 CPUs
KERNELS = [(QuantSpec("int8"), Int8Linear), (QuantSpec("int8", 32), TinygemmLinear),
           (QuantSpec("int4", 32), TinygemmLinear), (QuantSpec("int4", 64, True), TinygemmLinear),
           (QuantSpec("nf4", 64), Bnb4bitLinear if BNB_CPU_KERNEL else QuantLinear),
           (QuantSpec("fp4", 32, True), Bnb4bitLinear if BNB_CPU_KERNEL else QuantLinear)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("spec", "kind"), KERNELS, ids=[str(s) for s, _ in KERNELS])
def test_inference_kernels_compute_what_the_dequantized_model_does(ckpt, spec, kind, dtype, monkeypatch):
    """Prepared for inference, every quantized layer runs on its kernel, in bf16 whatever the model's dtype: its
    logits stay within 0.5% of their range of the dequantized model's (1% in a bf16 model, whose dequantized copy
    rounds too; measured 0.15% and 0.4-0.5%), on the kernel and on the rebuilt weight that many rows take, within
    the scheme's bound of the float model, and its greedy tokens are the dequantized model's wherever the top two
    logits are further apart than twice the largest deviation."""
    original, tokenizer = load_checkpoint(ckpt)
    quantized = quantize_model(copy.deepcopy(original), spec).to(dtype)
    floated = dequantize_model(copy.deepcopy(quantized))
    prepared = prepare_for_inference(quantized)
    layers = [m for m in prepared.modules() if isinstance(m, (QuantLinear, FusedQuantLinear))]
    assert len(layers) == 4 * original.config.n_layer and all(type(m) is kind for m in layers)
    prompt = tokenizer.encode("The train left")
    greedy = SamplingParams(temperature=0.0)
    ours = [int(t) for t in Engine(floated).generate_ids([prompt], 24, greedy)]
    sequence = torch.tensor([prompt + ours])
    with torch.no_grad():
        want, float_logits = (m(sequence)[0].float() for m in (floated, original))  # (T, vocab)
        paths = []
        for max_rows in (10**6, 0):  # every product on the kernel, then every one on the rebuilt weight
            monkeypatch.setattr(kind, "max_rows", max_rows, raising=False)  # (QuantLinear: no such switch)
            paths.append(prepared(sequence)[0].float())
        monkeypatch.undo()
    bound = (0.005 if dtype == torch.float32 else 0.01) * want.abs().max()
    for got in paths:
        assert (got - want).abs().max() <= bound
        torch.testing.assert_close(got, float_logits, atol=0.05 if spec.scheme == "int8" else 0.5, rtol=0)
    got = paths[0]
    deviation = (got - want).abs().amax(-1)  # (T,)
    top2 = want.topk(2, dim=-1).values  # (T, 2)
    clear = top2[:, 0] - top2[:, 1] > 2 * deviation
    assert clear.sum() >= len(ours) // 2 and torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
    near = torch.nonzero(~clear[len(prompt) - 1: -1]).flatten()  # greedy steps where a near-tie could flip
    steps = int(near[0]) if len(near) else len(ours)
    assert [int(t) for t in Engine(prepared).generate_ids([prompt], steps, greedy)] == ours[:steps]


def test_layers_no_kernel_takes_keep_their_own_product(ckpt):
    """A group size or width that no kernel takes, or kernels turned off, leaves QuantLinear: the dequantized model's
    numbers."""
    model, _ = load_checkpoint(ckpt)
    quantized = quantize_model(copy.deepcopy(model), QuantSpec("int4", 16))
    floated = dequantize_model(copy.deepcopy(quantized))
    for prepared in (prepare_for_inference(quantized),
                     prepare_for_inference(quantize_model(copy.deepcopy(model), QuantSpec("int8")),
                                           quantized_kernels=False)):
        assert not any(isinstance(m, FusedQuantLinear) for m in prepared.modules())
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(quantized(idx), floated(idx), atol=1e-5, rtol=1e-5)
    narrow = QuantLinear.from_linear(torch.nn.Linear(40, 32), QuantSpec("int8"))  # the int8 kernel needs 16 | width
    assert kernel_for(narrow) is None and kernel_for(QuantLinear.from_linear(torch.nn.Linear(48, 32),
                                                                             QuantSpec("int8"))) is Int8Linear


def test_kernel_layouts_are_the_kernels_own_and_read_back():
    """bitsandbytes' CPU layout as its own converter writes it; both layouts read back to the codes (the weight that
    many rows rebuild)."""
    codes = torch.randint(0, 16, (128, 96), dtype=torch.uint8)  # (out, in)
    assert torch.equal(kernels.bnb_stored_layout(kernels.bnb_cpu_layout(codes)), formats.pack_nibbles(codes))
    if hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        assert kernels.tinygemm_block() in kernels.TINYGEMM_BLOCKS  # 64 on AVX-512 CPUs, 32 on AVX2 ones
        assert torch.equal(kernels.tinygemm_codes(packed, 128, 96, kernels.tinygemm_block()), codes)
    convert = getattr(F, "_convert_weight_packed_for_cpu", None)
    if convert is None:
        pytest.skip("this bitsandbytes has no CPU layout")
    q, state = F.quantize_4bit(weight(64, 128), blocksize=64, quant_type="nf4")
    packed, state = convert(q.clone(), state)
    assert torch.equal(kernels.bnb_cpu_layout(formats.unpack_nibbles(q.view(64, 64))), packed)


def test_streaming_quantized_load_equals_quantizing_after_load(ckpt):
    spec = QuantSpec("nf4", 64, True)
    streamed, _ = load_checkpoint(ckpt, quantize=spec)
    loaded, _ = load_checkpoint(ckpt)
    quantize_model(loaded, spec)
    a, b = streamed.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_report_lists_every_scheme_and_says_whether_nf4_beats_int4(ckpt, tmp_path, capsys):
    assert main(["quantize", str(ckpt), "--report", "--out", str(tmp_path / "report"), "--max-tokens", "600"]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((tmp_path / "report" / "quantize-report.json").read_text())
    assert [r["format"] for r in rows] == ["float32", "bf16", "int8", "int4", "nf4", "fp4", "nf4+dq"]
    by = {r["format"]: r for r in rows}
    assert by["bf16"]["vs_fp16"] == pytest.approx(1.0)
    assert by["int8"]["memory_bytes"] < by["bf16"]["memory_bytes"]
    assert by["nf4"]["memory_bytes"] == by["int4"]["memory_bytes"] < by["int8"]["memory_bytes"]
    # each matrix's bytes as the format defines them; the float parts (embeddings, norms, biases) as in bf16 x 2
    model, _ = load_checkpoint(ckpt)
    quantized = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    float_bytes = by["float32"]["memory_bytes"] - 4 * sum(m.weight.numel() for m in quantized)
    for name, spec in (("int8", QuantSpec("int8")), ("nf4", QuantSpec("nf4")), ("nf4+dq", QuantSpec("nf4", 64, True))):
        want = float_bytes + sum(formats.stored_bytes(m.out_features, m.in_features, spec) for m in quantized)
        assert by[name]["memory_bytes"] == want, name
    assert all(r["decode_tok_s"] > 0 and r["perplexity"] > 1 for r in rows)
    assert "NF4 is" in printed and "Int4" in printed
    assert (tmp_path / "report" / "quantize-report.md").read_text().startswith("Quantization report")


def test_qlora_equals_lora_on_the_dequantized_base(ckpt):
    base, _ = load_checkpoint(ckpt)
    qlora_model = copy.deepcopy(base)
    QLoRA(r=4, alpha=8).attach(qlora_model)
    torch.manual_seed(1)
    for m in qlora_model.modules():
        if isinstance(m, LoRALinear):
            assert isinstance(m.base, QuantLinear) and m.base.spec == QuantSpec("nf4", 64, True)
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)  # the adapter changes the output
    float_model = copy.deepcopy(base)
    quantize_model(float_model, QuantSpec("nf4", 64, True))
    dequantize_model(float_model)
    LoRA(r=4, alpha=8).attach(float_model)
    adapters = {k: v for k, v in qlora_model.state_dict().items() if "lora_" in k}
    assert not float_model.load_state_dict(adapters, strict=False).unexpected_keys
    idx = torch.randint(0, base.config.vocab_size, (2, 24))
    logits_q, loss_q = qlora_model(idx, idx)
    logits_f, loss_f = float_model(idx, idx)
    torch.testing.assert_close(logits_q, logits_f, atol=1e-5, rtol=1e-5)
    loss_q.backward()
    loss_f.backward()
    grads_q = {n: p.grad for n, p in qlora_model.named_parameters() if p.requires_grad}
    grads_f = {n: p.grad for n, p in float_model.named_parameters() if p.requires_grad}
    assert grads_q.keys() == grads_f.keys() and len(grads_q) == 4 * base.config.n_layer * 2
    for n in grads_q:
        torch.testing.assert_close(grads_q[n], grads_f[n], atol=1e-5, rtol=1e-4)


def test_qlora_under_bf16_autocast_backpropagates_in_bf16(ckpt):
    model, _ = load_checkpoint(ckpt)
    QLoRA(r=2).attach(model)
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, idx)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads[1::2])


def test_finetune_qlora_saves_small_resumes_and_loads_as_a_float_model(ckpt, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}: ", "completion": f"answer {i % 3}"}) + "\n"
                            for i in range(40)))
    out = tmp_path / "qlora"
    argv = ["finetune", str(ckpt), "--method", "qlora", "--data", str(data), "--out", str(out), "--quiet",
            "--train.batch_size", "4", "--train.eval_every", "0", "--train.save_every", "2", "--train.lr", "1e-2"]
    assert main([*argv, "--train.max_steps", "2"]) == 0
    assert main([*argv, "--train.max_steps", "4", "--resume"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["method"] == "qlora" and config["scheme"] == "nf4" and config["double_quant"] is True
    assert (out / "adapter.safetensors").stat().st_size < 0.2 * (ckpt / "model.safetensors").stat().st_size
    model, _ = load_checkpoint(out)  # merged: a float model
    assert not any(isinstance(m, (QuantLinear, LoRALinear)) for m in model.modules())
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s][-1] == 4
    assert main(["generate", str(out), "--prompt", "Q1: ", "--max-new-tokens", "4", "--temperature", "0"]) == 0


def test_lora_on_a_quantized_folder_and_compare_with_qlora(ckpt, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}: ", "completion": f"answer {i % 3}"}) + "\n"
                            for i in range(40)))
    nf4 = tmp_path / "nf4"
    assert main(["quantize", str(ckpt), "--scheme", "nf4", "--out", str(nf4)]) == 0
    out = tmp_path / "lora-on-nf4"
    assert main(["finetune", str(nf4), "--method", "lora", "--data", str(data), "--out", str(out), "--quiet",
                 "--train.max_steps", "2", "--train.batch_size", "4", "--train.eval_every", "0"]) == 0
    model, _ = load_checkpoint(out)
    assert isinstance(model.transformer.h[0].attn.c_attn, torch.nn.Linear)  # merged into a float layer
    assert main(["compare", str(ckpt), "--data", str(data), "--methods", "lora,qlora", "--steps", "2",
                 "--out", str(tmp_path / "cmp"), "--batch-size", "4"]) == 0
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| qlora |" in report and "| lora |" in report


def test_bad_input_is_one_line(ckpt, tmp_path, capsys):
    nf4 = tmp_path / "nf4"
    assert main(["quantize", str(ckpt), "--scheme", "nf4", "--out", str(nf4)]) == 0
    before = (nf4 / "model.safetensors").read_bytes()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}: ", "completion": "a"}) + "\n" for i in range(8)))
    cases = {
        ("quantize", str(ckpt), "--scheme", "int3", "--out", str(tmp_path / "x")): "invalid choice: 'int3'",
        ("quantize", str(nf4), "--scheme", "int8", "--out", str(tmp_path / "x")): "already quantized (nf4)",
        ("quantize", str(nf4), "--report"): "already quantized",
        ("quantize", str(ckpt), "--scheme", "int4", "--group-size", "48", "--out", str(tmp_path / "x")):
            "group size 48 does not divide the width 64",
        ("quantize", str(ckpt), "--scheme", "nf4", "--group-size", "48", "--out", str(tmp_path / "x")):
            "bitsandbytes' block sizes",
        ("quantize", str(ckpt), "--scheme", "int8", "--double-quant", "--out", str(tmp_path / "x")):
            "double quantization is for the 4-bit schemes",
        ("quantize", str(ckpt), "--scheme", "int8", "--out", str(nf4)): "already exists",
        ("quantize", str(ckpt)): "needs --scheme and --out",
        ("finetune", str(nf4), "--method", "full", "--data", str(data), "--out", str(tmp_path / "ft")):
            "is quantized (nf4); full training needs float weights",
    }
    for argv, message in cases.items():
        assert main(list(argv)) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
    assert (nf4 / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "x").exists()


def test_four_bit_float_layers_without_a_kernel_say_so_once(ckpt, capsys):
    """nf4 and fp4 run on bitsandbytes' fused kernel where it is registered (AVX-512 BF16 CPUs); elsewhere each
    product dequantizes, and loading for inference says so in one line (int4 has a kernel on every x86 CPU)."""
    model, _ = load_checkpoint(ckpt)
    quantize_model(model, QuantSpec("nf4", 64))
    capsys.readouterr()
    prepare_for_inference(model)
    err = capsys.readouterr().err
    if BNB_CPU_KERNEL:
        assert err == ""
    else:
        assert err.startswith("gptlab: note: this CPU has no fused nf4 kernel") and len(err.splitlines()) == 1, err
    int4, _ = load_checkpoint(ckpt)
    prepare_for_inference(quantize_model(int4, QuantSpec("int4", 32)))
    assert capsys.readouterr().err == ""

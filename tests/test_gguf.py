"""GGUF export: every tensor and key read back with the gguf package's own reader, and (marked slow, where
llama-cpp-python is installed: `make test-llama-cpp`) llama.cpp's tokens and logits against gptlab's."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from gptlab.checkpoint import load_checkpoint, model_state, save_checkpoint
from gptlab.cli import main
from gptlab.config import ModelConfig
from gptlab.generate import Engine, SamplingParams
from gptlab.interop.hf import import_hf
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer

from .conftest import TEXT, make_hf_gpt2
from .test_families import build

gguf = pytest.importorskip("gguf")
# kind -> (tests/test_families.py's family, its fields changed to a shape llama.cpp's architecture runs as gptlab does)
FAMILY_KINDS = {
    "llama3": ("llama3", {}),
    "qwen2": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, use_sliding_window=False)),
    "qwen3": ("qwen3", dict(hidden_size=64, head_dim=32)),  # heads * head_dim != hidden_size
    # scaled by head_dim's root, as llama.cpp does; logits capped at 6: still bent, clear of near-ties under Q8_0
    "gemma2": ("gemma2", dict(query_pre_attn_scalar=16, final_logit_softcapping=6.0)),
    # sliding layers 0 and 2: not llama.cpp's default pattern of 6
    "gemma3": ("gemma3", dict(num_attention_heads=4, head_dim=32, query_pre_attn_scalar=32)),
    # short factors only: llama.cpp runs it with n_ctx <= the original context (the slow test does; llama.cpp
    # rounds n_ctx up to a multiple of 256)
    "phi3": ("phi3", dict(max_position_embeddings=512, original_max_position_embeddings=256, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5, short_factor=[1.0, 1.5, 2.0, 2.5],
        long_factor=[2.0, 4.0, 8.0, 9.0]))),
    "olmo2": ("olmo2", dict(max_position_embeddings=128, rope_parameters=dict(rope_type="default", rope_theta=1e4))),
    # rotary left out of every 4th layer, as llama.cpp's; smaller weights keep Q8_0's rounding in bounds over 4 layers
    "smollm3": ("smollm3", dict(num_hidden_layers=4, no_rope_layer_interval=4, initializer_range=0.1)),
}
KINDS = ("gpt2", "llama", "gemma", "char", *FAMILY_KINDS)
ARCH = {"gpt2": "gpt2", "llama": "llama", "gemma": "gemma", "char": "gpt2", "llama3": "llama", **{
    k: k for k in ("qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "smollm3")}}
PROMPT = "The train left the"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer) -> dict:
    """One small checkpoint per kind, with widths that Q8_0's blocks of 32 divide and weights large enough that the
    next token is rarely a near-tie."""
    root = tmp_path_factory.mktemp("gguf")
    make_hf_gpt2(root / "hf-gpt2", tokenizer, n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=320,
                 initializer_range=0.2)
    import_hf(root / "hf-gpt2", root / "gpt2")
    families = {"llama": ("llama", {}), "gemma": ("gemma", {}), **FAMILY_KINDS}
    for kind, (family, fields) in families.items():
        build(family, root / f"hf-{kind}", tokenizer, **{**dict(hidden_size=64, intermediate_size=96,
                                                               initializer_range=0.2), **fields})
        import_hf(root / f"hf-{kind}", root / kind)
    chars = Tokenizer.train_char([TEXT])  # a character tokenizer: llama.cpp's SentencePiece-style vocabulary
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", vocab_size=chars.vocab_size))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    save_checkpoint(root / "char", model, chars)
    return {kind: root / kind for kind in KINDS}


def field(reader, key: str):
    f = reader.fields[key]
    if len(f.types) > 1 or f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode() for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[-1]).decode()
    return f.parts[-1].tolist()[0]


def read_tensor(t, shape: tuple[int, ...]) -> np.ndarray:
    """A GGUF tensor's values as float32, in `shape` (quantized ones dequantized by the gguf package)."""
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32)


def unrotate(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's interleaved rotary rows back to rotate-half order (the inverse of the exporter's permutation)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def llama3_factors(cfg: ModelConfig) -> np.ndarray:
    """Llama 3.1's per-pair rope factors, written out from Meta's rule: wavelengths under the original context over
    high_freq_factor kept, those over it / low_freq_factor divided by `factor`, a smooth ramp between."""
    s = cfg.rope_scaling
    original, low, high, factor = (s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"],
                                   s["factor"])
    freqs = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    out = []
    for wavelen in 2 * np.pi / freqs:
        smooth = (original / wavelen - low) / (high - low)
        out.append(1.0 if wavelen < original / high else factor if wavelen > original / low else
                   1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def expected_tensors(kind: str, model: GPT) -> dict[str, np.ndarray]:
    """What each GGUF tensor must hold, written out from our own parameter names."""
    cfg, arch = model.config, ARCH[kind]
    s = {k: v.float().numpy() for k, v in model_state(model).items()}
    plus = 1.0 if cfg.norm_offset else 0.0  # Gemma's (1 + w)
    out = {"token_embd.weight": s["transformer.wte.weight"], "output_norm.weight": s["transformer.ln_f.weight"] + plus}
    if arch == "gpt2":
        out["position_embd.weight"] = s["transformer.wpe.weight"]
        out["output_norm.bias"] = s["transformer.ln_f.bias"]
    if not cfg.tie_embeddings or arch == "olmo2":  # llama.cpp's OLMo 2 always reads its own output matrix
        out["output.weight"] = s.get("lm_head.weight", s["transformer.wte.weight"])
    q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    norms = {"attn_norm": "ln_1", "ffn_norm": "ln_2", "post_attention_norm": "post_attn_norm",
             "post_ffw_norm": "post_mlp_norm", "attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm"}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        names = {"attn_output": "attn.c_proj", "ffn_down": "mlp.c_proj"}
        if arch in ("gpt2", "phi3"):  # one qkv matrix, one up matrix (Phi-3's gate and up side by side)
            names.update(attn_qkv="attn.c_attn", ffn_up="mlp.c_fc")
        for theirs, ours in {**norms, **names}.items():
            for part in ("weight", "bias"):
                if f"{p}{ours}.{part}" in s:
                    shift = plus if theirs in norms and part == "weight" else 0.0
                    out[f"blk.{i}.{theirs}.{part}"] = s[f"{p}{ours}.{part}"] + shift
        if arch not in ("gpt2", "phi3"):
            for part in ("weight", "bias"):
                if f"{p}attn.c_attn.{part}" in s:
                    qkv = s[f"{p}attn.c_attn.{part}"]
                    out[f"blk.{i}.attn_q.{part}"], out[f"blk.{i}.attn_k.{part}"] = qkv[:q], qkv[q:q + kv]
                    out[f"blk.{i}.attn_v.{part}"] = qkv[q + kv:]
            hidden = s[p + "mlp.c_fc.weight"].shape[0] // 2
            out[f"blk.{i}.ffn_gate.weight"] = s[p + "mlp.c_fc.weight"][:hidden]
            out[f"blk.{i}.ffn_up.weight"] = s[p + "mlp.c_fc.weight"][hidden:]
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "llama3":
        out["rope_freqs.weight"] = llama3_factors(cfg)
    if scaling.get("rope_type") == "longrope":
        out["rope_factors_long.weight"] = np.array(scaling["long_factor"], dtype=np.float32)
        out["rope_factors_short.weight"] = np.array(scaling["short_factor"], dtype=np.float32)
    return out


def arch_keys(kind: str, cfg: ModelConfig) -> tuple[dict, set[str]]:
    """The keys llama.cpp reads for this kind's architecture with the values they must have, and keys that must
    not be there (their absence is what llama.cpp must see)."""
    arch = ARCH[kind]
    a = f"{arch}."
    want: dict = {a + "rope.dimension_count": cfg.rotary_dims} if arch != "gpt2" else {}
    absent: set[str] = set()
    if arch in ("llama", "smollm3"):
        want[a + "vocab_size"] = cfg.vocab_size
    if kind == "llama3":  # its scaling is the rope_freqs tensor alone
        absent |= {a + "rope.scaling.type", a + "rope.scaling.factor"}
    if kind == "qwen3":
        want.update({a + "rope.scaling.type": "yarn", a + "rope.scaling.factor": pytest.approx(4.0),
                     a + "rope.scaling.original_context_length": 32})
    if kind == "gemma2":  # layers 0 and 2 slide: llama.cpp's default pattern for Gemma 2, so none is written
        want.update({a + "attention.sliding_window": 8, a + "attn_logit_softcapping": pytest.approx(2.0),
                     a + "final_logit_softcapping": pytest.approx(6.0), a + "rope.freq_base_swa": pytest.approx(1e4)})
        absent.add(a + "attention.sliding_window_pattern")
    if kind == "gemma3":
        want.update({a + "attention.sliding_window": 8, a + "attention.sliding_window_pattern": [True, False, True],
                     a + "rope.freq_base_swa": pytest.approx(1e4), a + "rope.scaling.type": "linear",
                     a + "rope.scaling.factor": pytest.approx(4.0)})
        absent |= {a + "attn_logit_softcapping", a + "final_logit_softcapping"}
    if kind == "phi3":
        want.update({a + "rope.dimension_count": 8, a + "rope.scaling.original_context_length": 256,
                     a + "rope.scaling.attn_factor": pytest.approx(math.sqrt(1 + math.log(2) / math.log(256))),
                     a + "attention.sliding_window": 0})
    return want, absent


def q8_0_close(data: np.ndarray, want: np.ndarray) -> bool:
    """Q8_0's rounding: half a step (absmax / 127 per block of 32), plus the f16 rounding of the step itself."""
    blocks = want.reshape(-1, 32)
    step = np.abs(blocks).max(axis=1, keepdims=True) / 127
    return bool((np.abs(data.reshape(-1, 32) - blocks) <= step * (0.5 + 127 * 2.0**-11) + 1e-6).all())


def q4_0_close(data: np.ndarray, want: np.ndarray) -> bool:
    """Q4_0's rounding: the step is d = m / -8 for the block's value m of largest magnitude, its grid -8..7 steps,
    so half a step, but up to a whole one past 7.5 steps on the side away from m (the grid stops at 7); plus the
    f16 rounding of d (at most 8 steps times 2^-11)."""
    blocks = want.reshape(-1, 32)
    m = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)  # (blocks, 1)
    d = m / -8
    with np.errstate(divide="ignore", invalid="ignore"):
        past = np.where(d != 0, blocks / d, 0) > 7.5  # the side the grid stops short on
    bound = np.abs(d) * (np.where(past, 1.0, 0.5) + 8 * 2.0**-11) + 1e-6
    return bool((np.abs(data.reshape(-1, 32) - blocks) <= bound).all())


def q4_0_kind(name: str, tensors: set[str]) -> str:
    """The type llama.cpp's llama-quantize gives a matrix of a Q4_0 file, Q8_0 in place of its Q6_K: the head (the
    token embedding where there is no output.weight) Q8_0, the position table float32, the rest Q4_0."""
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    return "Q8_0" if name == head else "F32" if name == "position_embd.weight" else "Q4_0"


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("kind", KINDS)
def test_gguf_holds_every_tensor_and_key(checkpoints, tmp_path, kind, dtype):
    out = tmp_path / f"{kind}.gguf"
    assert main(["export", "gguf", str(checkpoints[kind]), str(out), "--dtype", dtype]) == 0
    model, tokenizer = load_checkpoint(checkpoints[kind])
    cfg, arch = model.config, ARCH[kind]
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.architecture") == arch
    want = {f"{arch}.block_count": cfg.n_layer, f"{arch}.context_length": cfg.block_size,
            f"{arch}.embedding_length": cfg.n_embd, f"{arch}.feed_forward_length": cfg.hidden_dim,
            f"{arch}.attention.head_count": cfg.n_head,
            "general.file_type": {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}[dtype],
            "tokenizer.ggml.eos_token_id": tokenizer.eos_id}
    if arch == "gpt2":
        want[f"{arch}.attention.layer_norm_epsilon"] = pytest.approx(cfg.norm_eps)
    else:
        want.update({f"{arch}.attention.head_count_kv": cfg.kv_heads, f"{arch}.attention.key_length": cfg.head_dim,
                     f"{arch}.attention.layer_norm_rms_epsilon": pytest.approx(cfg.norm_eps),
                     f"{arch}.rope.freq_base": pytest.approx(cfg.rope_theta)})
    if kind == "phi3":  # llama.cpp gives a model named like Phi-3 Phi-3's special tokens, which this vocabulary lacks
        assert field(reader, "general.name") == "Phi 3-import"
    extra, absent = arch_keys(kind, cfg)
    for key, value in {**want, **extra}.items():
        assert field(reader, key) == value, key
    assert not absent & set(reader.fields), absent & set(reader.fields)
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size and tokens[tokenizer.eos_id] == "<|endoftext|>"
    if kind == "char":
        assert field(reader, "tokenizer.ggml.model") == "llama" and "<0x41>" in tokens and "\u2581" in tokens
    else:
        assert field(reader, "tokenizer.ggml.model") == "gpt2"
        merges = json.loads(tokenizer.backend.to_str())["model"]["merges"]
        assert field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
        vocab = tokenizer.backend.get_vocab()
        assert all(tokens[i] == t for t, i in vocab.items())

    expected = expected_tensors(kind, model)
    stored = {t.name: t for t in reader.tensors}
    assert set(stored) == set(expected)
    for name, want_t in expected.items():
        t = stored[name]
        data = read_tensor(t, want_t.shape)
        if arch in ("llama", "smollm3") and name.endswith(("attn_q.weight", "attn_k.weight")):
            data = unrotate(data, cfg.n_head if "attn_q" in name else cfg.kv_heads)
        wanted = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}.get(dtype) or q4_0_kind(name, set(expected))
        if want_t.ndim == 1 or dtype == "f32":
            wanted = "F32"
        assert t.tensor_type.name == wanted, name
        if name == "rope_freqs.weight":  # gptlab's own float32 rope against the rule in float64
            np.testing.assert_allclose(data, want_t, rtol=1e-6)
        elif wanted == "F32":
            np.testing.assert_array_equal(data, want_t, err_msg=name)
        elif wanted == "F16":
            np.testing.assert_array_equal(data, want_t.astype(np.float16).astype(np.float32), err_msg=name)
        else:
            assert (q8_0_close if wanted == "Q8_0" else q4_0_close)(data, want_t), name


def test_rotary_permutation_keeps_attention_scores(checkpoints):
    """Interleaved rotary on the permuted rows gives the same q.k as rotate-half rotary on ours."""
    from gptlab.interop.gguf import permute_rotary

    heads, hs, width, T = 2, 8, 16, 5
    torch.manual_seed(0)
    wq, wk, x = torch.randn(heads * hs, width), torch.randn(heads * hs, width), torch.randn(T, width)
    inv = 1.0 / (10000 ** (torch.arange(0, hs, 2).float() / hs))  # (hs/2,)
    ang = torch.arange(T).float()[:, None] * inv  # (T, hs/2)
    cos, sin = ang.cos(), ang.sin()

    def half(v):  # (T, heads, hs), Hugging Face's rotate_half
        a, b = v[..., : hs // 2], v[..., hs // 2:]
        return torch.cat([a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]], -1)

    def pairs(v):  # llama.cpp's normal rope: consecutive pairs
        a, b = v[..., 0::2], v[..., 1::2]
        return torch.stack([a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]], -1).flatten(-2)

    def scores(q, k):
        return torch.einsum("thd,shd->hts", q, k)

    ours = scores(half((x @ wq.T).view(T, heads, hs)), half((x @ wk.T).view(T, heads, hs)))
    theirs = scores(pairs((x @ permute_rotary(wq, heads).T).view(T, heads, hs)),
                    pairs((x @ permute_rotary(wk, heads).T).view(T, heads, hs)))
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_quantized_checkpoint_exports_its_float_weights(checkpoints, tmp_path):
    pytest.importorskip("bitsandbytes")
    assert main(["quantize", str(checkpoints["gpt2"]), "--scheme", "int8", "--out", str(tmp_path / "q")]) == 0
    assert main(["export", "gguf", str(tmp_path / "q"), str(tmp_path / "q.gguf"), "--dtype", "f32"]) == 0
    model, _ = load_checkpoint(tmp_path / "q")
    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    qkv = next(t for t in reader.tensors if t.name == "blk.0.attn_qkv.weight")
    want = model.transformer.h[0].attn.c_attn.dequantize(torch.float32).numpy()
    np.testing.assert_array_equal(np.asarray(qkv.data).reshape(want.shape), want)


def test_bad_gguf_exports_are_one_line(checkpoints, tmp_path, tokenizer, capsys):
    odd = tmp_path / "odd"  # learned positions with RMSNorm and SwiGLU: no llama.cpp architecture has that
    save_checkpoint(odd, GPT(ModelConfig.from_preset("tiny", norm="rmsnorm", mlp="swiglu", bias=False,
                                                     vocab_size=tokenizer.vocab_size)), tokenizer)
    (tmp_path / "taken.gguf").write_bytes(b"keep")
    cases = {
        ("export", "gguf", str(odd), str(tmp_path / "x.gguf")): "llama.cpp has no architecture for this model",
        ("export", "gguf", str(checkpoints["gpt2"]), str(tmp_path / "taken.gguf")): "already exists",
        ("export", "gguf", str(checkpoints["gpt2"]), str(tmp_path / "x.gguf"), "--dtype", "q4_k"):
            "GGUF export cannot write q4_k: the gguf package quantizes Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 but only reads "
            "K-quants",
        ("export", "gguf", str(checkpoints["gpt2"]), str(tmp_path / "x.gguf"), "--dtype", "q5_k"):
            "GGUF export cannot write q5_k",
        ("export", "gguf", str(checkpoints["gpt2"]), str(tmp_path / "x.gguf"), "--dtype", "q4"):
            "unknown GGUF dtype 'q4'; choose one of f32, f16, q8_0, q4_0",
        ("export", "gguf", str(tmp_path / "missing"), str(tmp_path / "x.gguf")): "does not exist",
    }
    for argv, message in cases.items():
        assert main(list(argv)) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
    assert (tmp_path / "taken.gguf").read_bytes() == b"keep"
    assert not (tmp_path / "x.gguf").exists()


def test_k_quants_are_refused_from_python_too(checkpoints, tmp_path):
    from gptlab.errors import GptlabError
    from gptlab.interop.gguf import export_gguf

    with pytest.raises(GptlabError, match="cannot write q5_k"):
        export_gguf(checkpoints["gpt2"], tmp_path / "x.gguf", "q5_k")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_rows_that_are_not_whole_blocks_are_f16_with_one_note(tmp_path, tokenizer, dtype, capsys):
    """llama-quantize's fallback for a 32-value block type: a matrix whose rows do not divide into blocks is F16."""
    build("llama", tmp_path / "hf", tokenizer, hidden_size=64, intermediate_size=48)
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    capsys.readouterr()
    assert main(["export", "gguf", str(tmp_path / "ckpt"), str(tmp_path / "x.gguf"), "--dtype", dtype]) == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(
        f"gptlab: note: 2 matrices have rows that are not whole {dtype.upper()} blocks of 32 and are written f16"), err
    assert "blk.0.ffn_down.weight (rows of 48), blk.1.ffn_down.weight (rows of 48)" in err
    model, _ = load_checkpoint(tmp_path / "ckpt")
    expected = expected_tensors("llama", model)
    for t in gguf.GGUFReader(tmp_path / "x.gguf").tensors:
        want = expected[t.name]
        if t.name.endswith("ffn_down.weight"):
            assert t.tensor_type == gguf.GGMLQuantizationType.F16
            np.testing.assert_array_equal(read_tensor(t, want.shape), want.astype(np.float16).astype(np.float32))
        elif want.ndim == 2:
            assert t.tensor_type.name == (dtype.upper() if dtype == "q8_0" else q4_0_kind(t.name, set(expected)))


def quantize_to(checkpoint, out, scheme: str, group: int, double_quant: bool = False):
    argv = ["quantize", str(checkpoint), "--scheme", scheme, "--group-size", str(group), "--out", str(out)]
    assert main(argv + (["--double-quant"] if double_quant else [])) == 0
    model, _ = load_checkpoint(out)
    return model


def float32_weights(model: GPT) -> GPT:
    """A quantized model's float copy, dequantized in float32 (as the exporter does)."""
    from gptlab.quant.layers import dequantize_model

    return dequantize_model(model.float())


def q4_0_nibbles(data: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A Q4_0 tensor's codes (rows, cols) in 0..15 and its block scales (rows, cols / 32), from its bytes."""
    blocks = np.asarray(data).reshape(-1, 18)
    scales = blocks[:, :2].copy().view(np.float16).astype(np.float32).reshape(shape[0], -1)
    low, high = blocks[:, 2:] & 0x0F, blocks[:, 2:] >> 4  # (blocks, 16) each: values j and j + 16
    return np.concatenate([low, high], axis=1).reshape(shape), scales


@pytest.mark.parametrize("group, double_quant", [(32, False), (64, False), (64, True)])
def test_int4_goes_to_q4_0_code_for_code(checkpoints, tmp_path, tokenizer, group, double_quant, capsys):
    """gptlab's int4 (code * absmax / 7, codes -7..7) is Q4_0 ((q - 8) * d) with q = code + 8 and d = absmax / 7:
    every block takes the codes as they are, and only its scale rounds (to f16). Checked on GPT-2's bytes against
    the checkpoint's own codes and scales, and on a Llama (permuted q and k rows, gate and up split) by value."""
    from gptlab.quant.formats import scales, unpack_nibbles

    quantized = quantize_to(checkpoints["gpt2"], tmp_path / "q", "int4", group, double_quant)
    capsys.readouterr()
    assert main(["export", "gguf", str(tmp_path / "q"), str(tmp_path / "q.gguf"), "--dtype", "q4_0"]) == 0
    assert capsys.readouterr().err == ""  # no re-quantization note
    stored = {t.name: t for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    for i, block in enumerate(quantized.transformer.h):
        for layer, name in ((block.attn.c_attn, "attn_qkv"), (block.attn.c_proj, "attn_output"),
                            (block.mlp.c_fc, "ffn_up"), (block.mlp.c_proj, "ffn_down")):
            t = stored[f"blk.{i}.{name}.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
            codes, d = q4_0_nibbles(t.data, (layer.out_features, layer.in_features))
            np.testing.assert_array_equal(codes, unpack_nibbles(layer.qweight).numpy())
            absmax = scales(layer.parts()).numpy().reshape(layer.out_features, -1)  # (rows, groups)
            want = np.repeat(absmax / 7, group // 32, axis=1).astype(np.float16).astype(np.float32)
            np.testing.assert_array_equal(d, want)

    build("llama", tmp_path / "hf", tokenizer, hidden_size=128, intermediate_size=256, initializer_range=0.2)
    import_hf(tmp_path / "hf", tmp_path / "llama")  # widths every group size divides
    quantize_to(tmp_path / "llama", tmp_path / "ql", "int4", group, double_quant)
    assert main(["export", "gguf", str(tmp_path / "ql"), str(tmp_path / "ql.gguf"), "--dtype", "q4_0"]) == 0
    model = float32_weights(load_checkpoint(tmp_path / "ql")[0])
    expected = expected_tensors("llama", model)
    matrices = [t for t in gguf.GGUFReader(tmp_path / "ql.gguf").tensors
                if t.name.startswith("blk.") and expected[t.name].ndim == 2]
    assert len(matrices) == 7 * model.config.n_layer  # q, k, v, output, gate, up, down
    for t in matrices:
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0, t.name
        want = expected[t.name]
        data = read_tensor(t, want.shape)
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            data = unrotate(data, model.config.n_head if "attn_q" in t.name else model.config.kv_heads)
        absmax = np.abs(want.reshape(-1, group)).max(axis=1, keepdims=True)
        # the f16 scale's rounding alone: under 2^-11 of the group's absmax, a seventh of what one code apart is
        assert (np.abs(data - want).reshape(-1, group) <= absmax * 2.0**-11).all(), t.name


@pytest.mark.parametrize("scheme, group, why", [
    ("int4", 16, "int4 groups of 16 are not whole Q4_0 blocks of 32"),
    ("nf4", 64, "nf4's levels are not Q4_0's evenly spaced ones")])
def test_other_4_bit_checkpoints_are_quantized_again_with_a_note(checkpoints, tmp_path, scheme, group, why, capsys):
    quantize_to(checkpoints["gpt2"], tmp_path / "q", scheme, group)
    capsys.readouterr()
    assert main(["export", "gguf", str(tmp_path / "q"), str(tmp_path / "q.gguf"), "--dtype", "q4_0"]) == 0
    err = capsys.readouterr().err.strip()
    assert err == f"gptlab: note: {why}: the weights are dequantized and quantized again to Q4_0 (a second rounding)"
    model = float32_weights(load_checkpoint(tmp_path / "q")[0])
    expected = expected_tensors("gpt2", model)
    for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.Q4_0:
            assert q4_0_close(read_tensor(t, expected[t.name].shape), expected[t.name]), t.name


_YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)
# (kind, config fields changed, what the one line says): shapes llama.cpp's architecture would run otherwise
REFUSED = [
    ("qwen2", dict(sliding_window=8, layer_types=["full_attention", "sliding_attention"]),
     "qwen2 architecture has no per-layer sliding windows"),
    ("qwen2", dict(head_size=32), "qwen2 architecture sizes heads as n_embd / n_head (16)"),
    ("qwen2", dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=16)), "has no 'llama3' rope scaling"),
    ("olmo2", dict(rope_scaling=dict(rope_type="dynamic", factor=2.0, original_max_position_embeddings=64)),
     "olmo2 architecture has no 'dynamic' rope scaling"),
    ("qwen3", dict(rope_scaling=dict(_YARN, beta_fast=8)), "reads only YaRN's factor and original context, not this "
     "model's beta_fast"),
    ("gemma2", dict(attn_scalar=24.0), "gemma2 architecture scales attention by 16 ** -0.5 for this shape, not by "
     "this model's 24.0 ** -0.5"),
    ("gemma2", dict(attn_softcap=None), "always soft-caps attention scores and logits"),
    ("gemma2", dict(tie_embeddings=False), "ties the output layer to the token embedding"),
    ("gemma3", dict(attn_softcap=5.0), "gemma3 architecture has no attention soft-capping"),
    ("gemma3", dict(rope_local_theta=None), "llama.cpp has no architecture for this model"),  # scaled local rope
    ("smollm3", dict(nope_layers=[1, 3]), "leaves rotary embeddings out of every 4th layer (here [3]), and this "
     "model out of layers [1, 3]"),
    ("llama", dict(bias=True), "writes biases on q, k and v only, and this model also has them on the attention "
     "output and the MLP"),
    ("gpt2", dict(block_norms="post"), "llama.cpp has no architecture for GPT-1's post-norm blocks"),
]


@pytest.mark.parametrize("kind, fields, message", REFUSED, ids=[f"{k}-{next(iter(f))}" for k, f, _ in REFUSED])
def test_shapes_llama_cpp_would_run_otherwise_are_one_line(checkpoints, tmp_path, kind, fields, message, capsys):
    model, tokenizer = load_checkpoint(checkpoints[kind])
    save_checkpoint(tmp_path / "ckpt", GPT(dataclasses.replace(model.config, **fields)), tokenizer)
    out = tmp_path / "x.gguf"
    capsys.readouterr()
    assert main(["export", "gguf", str(tmp_path / "ckpt"), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_what_llama_cpp_runs_otherwise_only_past_a_length_is_one_note(checkpoints, tmp_path, capsys):
    """A sliding window where llama.cpp's architecture attends over the whole context (Mistral, Phi-3), and
    LongRoPE past the original context, where llama.cpp picks the long factors by its context size, not by the
    sequence's: written, with one note each."""
    notes = {"llama": "llama.cpp's llama architecture attends over the whole context; this model's sliding window "
                      "(8) makes its outputs differ beyond that many tokens",
             "phi3": "llama.cpp turns every position with LongRoPE's long factors once its context (n_ctx, rounded up "
                     "to a multiple of 256) is over 256"}
    for kind, note in notes.items():
        model, tokenizer = load_checkpoint(checkpoints[kind])
        folder = checkpoints[kind]
        if kind == "llama":
            folder = tmp_path / "mistral"
            save_checkpoint(folder, GPT(dataclasses.replace(model.config, sliding_window=8)), tokenizer)
        capsys.readouterr()
        assert main(["export", "gguf", str(folder), str(tmp_path / f"{kind}.gguf")]) == 0
        err = capsys.readouterr().err.strip()
        assert err.startswith("gptlab: note: " + note) and len(err.splitlines()) == 1, err
    model, tokenizer = load_checkpoint(checkpoints["phi3"])
    windowed = tmp_path / "phi3-window"
    save_checkpoint(windowed, GPT(dataclasses.replace(model.config, sliding_window=9, rope_scaling=None)), tokenizer)
    assert main(["export", "gguf", str(windowed), str(tmp_path / "phi3-window.gguf")]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptlab: note: llama.cpp's phi3 architecture attends over the whole context") and \
        len(err.splitlines()) == 1, err
    reader = gguf.GGUFReader(tmp_path / "phi3-window.gguf")
    assert field(reader, "phi3.attention.sliding_window") == 9
    assert not {"rope_factors_long.weight", "rope_factors_short.weight"} & {t.name for t in reader.tensors}


def as_stored(model: GPT, dtype: str, group: int | None = None) -> GPT:
    """A float copy of `model` with every matrix as the `dtype` file holds it: written as the exporter writes it
    (its per-tensor type, int4's codes where `group` is an int4 group size) and read back. Rows only move and split
    on the way into llama.cpp's layout, and blocks run along rows, so this is the file's model in gptlab's layout."""
    from gptlab.interop.gguf import UNTIED, architecture, encode, tensor_kind

    cfg = model.config
    file_head = not cfg.tie_embeddings or architecture(cfg) in UNTIED  # else the embedding is llama.cpp's head
    names = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "lm_head.weight": "output.weight"}
    state = {k: v.float() for k, v in model_state(model).items()}  # a tied head not repeated
    if file_head:  # a head of its own in the file (OLMo 2's even when tied): a model of its own here too
        state["lm_head.weight"] = state.get("lm_head.weight", state["transformer.wte.weight"])
        cfg = dataclasses.replace(cfg, tie_embeddings=False)
    for key, w in state.items():
        name = names.get(key, key)
        head = name == ("output.weight" if file_head else "token_embd.weight")
        data, qtype = encode(w.numpy(), tensor_kind(name, tuple(w.shape), dtype, head), gguf, group)
        state[key] = torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(w.shape).astype(np.float32))
    if not file_head:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    copy = GPT(cfg)
    copy.load_state_dict(state)
    return copy.eval()


def assert_same_weights(out, kind: str, model: GPT) -> None:
    """The file holds exactly `model`'s weights (in llama.cpp's layout)."""
    expected = expected_tensors(kind, model)
    for t in gguf.GGUFReader(out).tensors:
        data = read_tensor(t, expected[t.name].shape)
        if ARCH[kind] in ("llama", "smollm3") and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            data = unrotate(data, model.config.n_head if "attn_q" in t.name else model.config.kv_heads)
        if t.name == "rope_freqs.weight":
            continue  # gptlab's rope against the rule: test_gguf_holds_every_tensor_and_key
        np.testing.assert_array_equal(data, expected[t.name], err_msg=t.name)


def assert_llama_cpp_runs(out, model: GPT, tokenizer: Tokenizer, exact: bool) -> dict:
    """llama.cpp (through llama-cpp-python) tokenizes as we do and computes what `model` computes (the file's own
    weights). `exact` (a float file): its logits within 1% of their range and its greedy tokens ours. A quantized
    file's products also round the activations to 8 bits (Q8_0), so its check is on logits along gptlab's greedy
    path: within 10% of their range, the same argmax wherever gptlab's top two logits are further apart than twice
    that position's largest deviation, and llama.cpp's own greedy tokens ours up to the first step closer than that.
    Returns what was measured."""
    llama_cpp = pytest.importorskip("llama_cpp")
    prompt = tokenizer.encode(PROMPT)
    ours = [int(t) for t in Engine(model).generate_ids([prompt], 24, SamplingParams(temperature=0))]
    scaling = model.config.rope_scaling or {}
    n_ctx = model.config.block_size
    if scaling.get("rope_type") == "longrope":  # within the original context: LongRoPE's short factors, as gptlab's
        n_ctx = scaling["original_max_position_embeddings"]
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=n_ctx, logits_all=True, verbose=False)
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == prompt
    assert llm.detokenize(prompt).decode() == PROMPT
    if "\ufffd" not in tokenizer.decode(ours):  # a random model's byte tokens need not form UTF-8
        assert llm.detokenize(ours).decode() == tokenizer.decode(ours)
    sequence = prompt + ours
    llm.reset()
    llm.eval(sequence)
    theirs = np.array(llm.scores[: len(sequence)])  # (T, vocab) logits llama.cpp computed at each position
    with torch.no_grad():
        logits = model(torch.tensor([sequence]))[0].numpy()  # (T, vocab)
    scale = np.abs(logits).max()
    deviation = np.abs(theirs - logits).max(axis=-1)  # (T,) the largest at each position
    assert deviation.max() < (0.01 if exact else 0.1) * scale
    top2 = np.sort(logits, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * deviation  # no rounding of this size can swap the first two
    steps = len(ours)
    if not exact:
        assert clear.sum() >= 3
        assert (theirs.argmax(-1)[clear] == logits.argmax(-1)[clear]).all()
        near = np.flatnonzero(~clear[len(prompt) - 1: -1])  # the greedy steps where a near-tie could flip
        steps = int(near[0]) if len(near) else len(ours)
    generated = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
        if len(generated) == steps:
            break
        generated.append(t)
    assert generated == ours[:steps]
    return {"deviation": float(deviation.max() / scale), "clear": int(clear.sum()), "positions": len(sequence),
            "steps": steps}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("kind", KINDS)
def test_llama_cpp_runs_the_export_as_gptlab_does(checkpoints, tmp_path, kind, dtype):
    """llama.cpp runs each family's file as gptlab runs the same weights: f16 as the float model (whose f16 rounding
    is within the 1%), q8_0 as the float model too (within Q8_0's rounding), and q4_0 as the model with the q4_0
    file's own weights: their 4-bit steps (about 9% of the weights' rms) move these small random models' logits by
    10-60% of their range, so against the float model the check would say nothing."""
    out = tmp_path / f"{kind}.gguf"
    assert main(["export", "gguf", str(checkpoints[kind]), str(out), "--dtype", dtype]) == 0
    model, tokenizer = load_checkpoint(checkpoints[kind])
    if dtype == "q4_0":
        model = as_stored(model, dtype)
        assert_same_weights(out, kind, model)
    assert_llama_cpp_runs(out, model, tokenizer, exact=dtype == "f16")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma2"])
def test_llama_cpp_runs_an_int4_checkpoints_q4_0_export_as_gptlab_runs_it(checkpoints, tmp_path, kind):
    """An int4 checkpoint (groups of 32) goes to q4_0 code for code: llama.cpp runs it as gptlab runs the int4 model
    itself, but for the scales' f16 rounding and the head's Q8_0 (llama-quantize's Q6_K), which `as_stored` adds."""
    quantized = quantize_to(checkpoints[kind], tmp_path / "q", "int4", 32)
    out = tmp_path / "q.gguf"
    assert main(["export", "gguf", str(tmp_path / "q"), str(out), "--dtype", "q4_0"]) == 0
    model = as_stored(float32_weights(quantized), "q4_0", group=32)
    assert_same_weights(out, kind, model)
    _, tokenizer = load_checkpoint(tmp_path / "q")
    assert_llama_cpp_runs(out, model, tokenizer, exact=False)


# digits in runs, contractions, punctuation, runs of spaces and newlines: where the families' word splits differ
SPLIT_TEXT = "[INST] I'll pay 1234567 dollars, won't I? [/INST]\n\n  Pi is 3.14159;\tdone   \n (the) end"
HUB_PRE = {"llama3": "llama-bpe", "qwen": "qwen2", "smollm3": "dbrx", "olmo2": "gpt-2"}


def hub_checkpoint(kind: str, root) -> tuple:
    """A small Llama-shaped checkpoint with the tokenizer of a hub family's shape (tests/hub_tokenizers.py), read
    as `gptlab import hf` reads it."""
    from gptlab.interop.hf import read_hf_tokenizer

    from . import hub_tokenizers as hub

    tok = read_hf_tokenizer(hub.BUILDERS[kind](root / f"hf-{kind}"))
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=64, mlp_hidden=96, block_size=128, vocab_size=448, pos="rope",
                      norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, family="llama")
    torch.manual_seed(0)
    save_checkpoint(root / kind, GPT(cfg), tok)
    return root / kind, tok


@pytest.mark.parametrize("kind", list(HUB_PRE))
def test_byte_level_tokenizers_name_llama_cpps_pre_tokenizer_of_their_split(tmp_path, kind, capsys):
    """Llama 3's, Qwen's, SmolLM3's and OLMo 2's tokenizers (a Split regex before byte-level BPE) export, each
    under the name of llama.cpp's pre-tokenizer with the same regex (Llama 3's with its whole-word rule)."""
    folder, _ = hub_checkpoint(kind, tmp_path)
    assert main(["export", "gguf", str(folder), str(tmp_path / "m.gguf")]) == 0
    assert capsys.readouterr().err == ""
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == HUB_PRE[kind]


def test_pre_tokenizers_llama_cpp_lacks_are_written_as_gpt2_with_one_note(tmp_path, tokenizer, capsys):
    """SmolLM2's digit split and Phi-4-mini's o200k regex have names; a split llama.cpp has no name for is GPT-2's
    with a note, and the file is still written."""
    from tokenizers import Regex, pre_tokenizers

    from gptlab.interop.gguf import SPLITS, pre_tokenizer

    digits = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "add_prefix_space": False}]},
        "model": {}}
    assert pre_tokenizer(digits) == ("smollm", None)
    o200k = next(r for r, name in SPLITS.items() if name == "gpt-4o")
    split = {"type": "Split", "pattern": {"Regex": o200k}, "behavior": "Isolated", "invert": False}
    level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
    assert pre_tokenizer({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, level]},
                          "model": {}}) == ("gpt-4o", None)
    odd = Tokenizer(Tokenizer.train_bpe([TEXT], vocab_size=320).backend)
    odd.backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\w+|\s+|[^\w\s]+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=64, block_size=32, vocab_size=320))
    save_checkpoint(tmp_path / "odd", model, odd)
    assert main(["export", "gguf", str(tmp_path / "odd"), str(tmp_path / "odd.gguf")]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptlab: note: llama.cpp has no pre-tokenizer that splits text into words as this") and \
        len(err.splitlines()) == 1, err
    assert field(gguf.GGUFReader(tmp_path / "odd.gguf"), "tokenizer.ggml.pre") == "gpt-2"


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(HUB_PRE))
def test_llama_cpp_tokenizes_as_the_hub_tokenizer_does(tmp_path, kind):
    """llama.cpp splits digits, contractions and spaces as Llama 3's, Qwen's, SmolLM3's and OLMo 2's tokenizers do,
    so a prompt gets the same ids in llama.cpp as in transformers' AutoTokenizer (and gptlab)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    folder, tok = hub_checkpoint(kind, tmp_path)
    want = AutoTokenizer.from_pretrained(tmp_path / f"hf-{kind}")(SPLIT_TEXT, add_special_tokens=False).input_ids
    ours = tok.backend.encode(SPLIT_TEXT, add_special_tokens=False).ids
    assert ours == want
    assert main(["export", "gguf", str(folder), str(tmp_path / "m.gguf")]) == 0
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=128, verbose=False)
    assert llm.tokenize(SPLIT_TEXT.encode(), add_bos=False, special=False) == want
    assert llm.detokenize(ours).decode() == SPLIT_TEXT

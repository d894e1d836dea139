"""The `gptlab` command: its output, and one clear line (never a traceback) for every kind of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gptlab
from gptlab.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_presets_table_and_json(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0 and "gpt2-xl" in out and "1,557,611,200" in out and "gpt3-175b" in out
    code, out, _ = run(capsys, "presets", "--json")
    counts = {r["name"]: r["parameters"] for r in json.loads(out)}
    assert counts["gpt2"] == 124_439_808
    assert counts["gpt2-medium"] == 354_823_168
    assert counts["gpt2-large"] == 774_030_080
    assert counts["gpt2-xl"] == 1_557_611_200
    assert 174e9 < counts["gpt3-175b"] < 176e9
    # the open-weight families, as their Hugging Face checkpoints count them
    assert counts["llama2-7b"] == 6_738_415_616
    assert counts["llama2-13b"] == 13_015_864_320
    assert counts["llama2-70b"] == 68_976_648_192
    assert counts["mistral-7b"] == 7_241_732_096
    assert counts["gemma-2b"] == 2_506_172_416
    assert counts["gemma-7b"] == 8_537_680_896
    assert 12.5e9 < counts["gpt3-13b"] < 13.1e9
    code, out, _ = run(capsys, "presets", "gpt2", "llama2-7b", "--sizes")
    assert code == 0 and "497.8MB" in out and "62.2MB" in out and "nf4 (gptlab)" in out
    assert "3.9GB" in out.splitlines()[2]  # Llama-2-7B in gptlab's own NF4 (the course's table: 3.9 GB)


def test_a_closed_pipe_ends_quietly():
    """`gptlab presets --json | true`: the reader left before the output came; no traceback, as Unix tools."""
    done = subprocess.run(f"{sys.executable} -m gptlab presets --json | true", shell=True, capture_output=True,
                          text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_own_nf4_size_is_what_a_quantized_checkpoint_holds(capsys, tokenizer, tmp_path):
    """The presets table's `nf4 (gptlab)` counts the layout a quantized checkpoint really stores."""
    from gptlab.checkpoint import read_weights, save_checkpoint
    from gptlab.config import ModelConfig
    from gptlab.model import GPT
    from gptlab.presets import quantized_bytes

    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=tokenizer.vocab_size)
    save_checkpoint(tmp_path / "ckpt", GPT(cfg), tokenizer)
    assert main(["quantize", str(tmp_path / "ckpt"), "--scheme", "nf4", "--double-quant", "--out",
                 str(tmp_path / "nf4")]) == 0, capsys.readouterr().err
    stored = sum(t.numel() * t.element_size() for t in read_weights(tmp_path / "nf4" / "model.safetensors").values())
    assert quantized_bytes(cfg, float_bytes=4) == stored  # the checkpoint keeps its float tensors in float32


def test_generate_json_equals_the_api(capsys, hf_pair):
    _, ckpt = hf_pair
    code, out, _ = run(capsys, "generate", str(ckpt), "--prompt", "The train", "--max-new-tokens", "12",
                       "--temperature", "0", "--json")
    assert code == 0
    result = json.loads(out)
    (want,) = gptlab.load(ckpt, device="cpu").complete("The train", max_new_tokens=12, temperature=0)
    assert result["text"] == want.text and result["token_ids"] == want.token_ids


def test_generate_stream_and_config_file(capsys, hf_pair, tmp_path):
    _, ckpt = hf_pair
    cfg = tmp_path / "gen.yaml"
    cfg.write_text("prompt: The ship\nmax_new_tokens: 8\ntemperature: 0\n")
    code, out, _ = run(capsys, "generate", str(ckpt), "--config", str(cfg), "--stream")
    text = gptlab.load(ckpt, device="cpu").generate("The ship", max_new_tokens=8, temperature=0)
    assert code == 0 and out == "The ship" + text + "\n"
    code, out, _ = run(capsys, "generate", str(ckpt), "--config", str(cfg), "--max-new-tokens", "3", "--json")
    assert len(json.loads(out)["token_ids"]) == 3  # the flag wins over the file


def bad_inputs(hf_pair, tmp_path):
    _, ckpt = hf_pair
    incomplete = tmp_path / "incomplete"
    shutil.copytree(ckpt, incomplete)
    (incomplete / "model.safetensors").unlink()
    mismatch = tmp_path / "mismatch"
    shutil.copytree(ckpt, mismatch)
    cfg = json.loads((mismatch / "config.json").read_text())
    cfg["model"]["n_embd"] = 60
    (mismatch / "config.json").write_text(json.dumps(cfg))
    garbage = tmp_path / "garbage"
    shutil.copytree(ckpt, garbage)
    (garbage / "model.safetensors").write_bytes(b"not safetensors")
    badyaml = tmp_path / "bad.yaml"
    badyaml.write_text("top_p: [1\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("temprature: 1\n")
    c = str(ckpt)
    return {
        "unknown preset": (["presets", "gpt5"], "unknown preset 'gpt5'"),
        "missing folder": (["generate", str(tmp_path / "nope")], "does not exist"),
        "incomplete folder": (["generate", str(incomplete)], "missing model.safetensors"),
        "config vs weights": (["generate", str(mismatch)], "does not match the model config"),
        "corrupt weights": (["generate", str(garbage)], "cannot read"),
        "prompt too long": (["generate", c, "--prompt", "The train left " * 100], "context is 96 tokens"),
        "top-p 1.5": (["generate", c, "--top-p", "1.5"], "argument --top-p: 1.5 is not in (0, 1]"),
        "not a number": (["generate", c, "--top-k", "many"], "argument --top-k: 'many' is not an integer"),
        "bad yaml": (["generate", c, "--config", str(badyaml)], "not valid YAML"),
        "unknown yaml key": (["generate", c, "--config", str(unknown)], "unknown option(s) temprature"),
        "bad device": (["generate", c, "--device", "tpu"], "unknown device"),
        "export over its input": (["export", "hf", c, c], "or inside it"),
        "serve a missing folder": (["serve", str(tmp_path / "nope")], "does not exist"),
        "serve with no slots": (["serve", c, "--max-concurrency", "0"], "argument --max-concurrency: 0 is not in [1, "),
    }


def test_bad_input_gives_one_line(capsys, hf_pair, tmp_path):
    before = {p.name: p.read_bytes() for p in hf_pair[1].iterdir()}
    for what, (argv, message) in bad_inputs(hf_pair, tmp_path).items():
        code, out, err = run(capsys, *argv)
        assert code == 2, what
        assert err.count("\n") == 1 and err.startswith("gptlab: error: "), (what, err)
        assert message in err, (what, err)
    assert {p.name: p.read_bytes() for p in hf_pair[1].iterdir()} == before  # nothing on disk was touched


@pytest.mark.parametrize("entry", [[sys.executable, "-m", "gptlab"], [str(Path(sys.executable).parent / "gptlab")]],
                         ids=["python -m gptlab", "console script"])
def test_real_process_prints_no_traceback(entry, tmp_path):
    proc = subprocess.run([*entry, "generate", str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"gptlab: error: checkpoint folder {tmp_path / 'missing'} does not exist"
    assert "Traceback" not in proc.stderr

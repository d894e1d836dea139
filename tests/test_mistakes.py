"""The mistakes people make, by class: each gives one line on stderr and exit status 2, and leaves every input as it
was. One test per class (outputs over or inside inputs, corrupt or hostile files, values out of range, what a
killed run leaves), with the cases of that class as parameters."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptlab.cli import main
from gptlab.data.prepare import prepare
from gptlab.errors import GptlabError
from gptlab.train.config import SECTIONS, _fields

from .conftest import TEXT

TINY = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
        "--train.batch_size=2", "--train.eval_every=0", "--train.log_every=1", "--train.threads=1"]


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` and a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys, argv: list[str], message: str = "") -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert err.count("\n") == 1 and err.startswith("gptlab: error: "), (argv, err)
    assert message in err, (argv, err)
    return err


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A prepared data folder, a pretrained checkpoint, a LoRA run on it, and a task file."""
    root = tmp_path_factory.mktemp("mistakes")
    (root / "corpus.txt").write_text(TEXT * 4)
    prepare([str(root / "corpus.txt")], root / "data", tokenizer="char", val_fraction=0.2, progress=False)
    assert main(["pretrain", "--data", str(root / "data"), "--out", str(root / "ckpt"), "--quiet",
                 "--train.max_steps=2", *TINY]) == 0
    (root / "task.jsonl").write_text("".join(json.dumps({"prompt": f"add {i} ", "completion": f"= {i}"}) + "\n"
                                             for i in range(20)))
    assert main(["finetune", str(root / "ckpt"), "--data", str(root / "task.jsonl"), "--out", str(root / "lora"),
                 "--quiet", "--train.max_steps=2", "--train.batch_size=2", "--train.eval_every=0"]) == 0
    return root


OVER_INPUTS = {
    "finetune into its base": (["finetune", "{ckpt}", "--data", "{task}", "--out", "{ckpt}", "--quiet"], "inside it"),
    "full finetune into its base": (["finetune", "{ckpt}", "--method", "full", "--data", "{task}", "--out", "{ckpt}"],
                                    "inside it"),
    "finetune a LoRA run": (["finetune", "{lora}", "--data", "{task}", "--out", "{ckpt}/x"], "not a full checkpoint"),
    "pretrain over a checkpoint": (["pretrain", "--data", "{data}", "--out", "{lora}", "--quiet", *TINY],
                                   "already holds a training run"),
    "pretrain into its data": (["pretrain", "--data", "{data}", "--out", "{data}/run", "--quiet", *TINY],
                               "inside it"),
    "prepare over a checkpoint": (["prepare", "{corpus}", "--out", "{ckpt}", "--tokenizer", "char"],
                                  "already holds"),
    "quantize inside its input": (["quantize", "{ckpt}", "--scheme", "int8", "--out", "{ckpt}/q"], "inside it"),
    "quantize inside a LoRA run's base": (["quantize", "{lora}", "--scheme", "int8", "--out", "{ckpt}/q"],
                                          "inside it"),
    "quantize report into its input": (["quantize", "{ckpt}", "--report", "--out", "{ckpt}", "--max-tokens", "64"],
                                       "inside it"),
    "export hf inside its input": (["export", "hf", "{ckpt}", "{ckpt}/hf"], "inside it"),
    "export gguf inside its input": (["export", "gguf", "{ckpt}", "{ckpt}/m.gguf"], "inside it"),
    "export peft inside its base": (["export", "peft", "{lora}", "{ckpt}/peft"], "inside it"),
    "import hf over a checkpoint": (["import", "hf", "{ckpt}", "{lora}"], "not empty"),
    "compare inside its input": (["compare", "{ckpt}", "--data", "{task}", "--steps", "1", "--out", "{ckpt}/c"],
                                 "inside it"),
    "an --out that is a file": (["quantize", "{ckpt}", "--scheme", "int8", "--out", "{task}"], "is a file"),
    "autoprompt inside its input": (["autoprompt", "{ckpt}", "--data", "{task}", "--steps", "1", "--out",
                                     "{ckpt}/ap"], "inside it"),
    "autoprompt over a checkpoint": (["autoprompt", "{ckpt}", "--data", "{task}", "--steps", "1", "--out", "{lora}"],
                                     "not empty"),
}


@pytest.mark.parametrize("case", OVER_INPUTS, ids=list(OVER_INPUTS))
def test_no_command_writes_over_or_inside_what_it_reads(workspace, capsys, case):
    argv, message = OVER_INPUTS[case]
    names = {k: str(workspace / v) for k, v in dict(ckpt="ckpt", lora="lora", data="data", task="task.jsonl",
                                                      corpus="corpus.txt").items()}
    before = tree(workspace)
    one_line_error(capsys, [a.format(**names) for a in argv], message)
    assert tree(workspace) == before


def test_what_a_killed_writer_left_is_cleaned_by_the_next_run(workspace, tmp_path):
    """A staging folder or a temporary file named for a process that no longer runs is removed; one of a running
    process stays."""
    dead = 2**22 + 12345  # above the default pid_max: no process has it
    assert not os.path.exists(f"/proc/{dead}")
    stale = tmp_path / f".hf.staging-{dead}"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    live = tmp_path / f".hf.staging-{os.getpid()}-other"
    live.mkdir()
    tmp = tmp_path / f".m.gguf.tmp-{dead}"
    tmp.write_bytes(b"half")
    assert main(["export", "hf", str(workspace / "ckpt"), str(tmp_path / "hf")]) == 0
    assert main(["export", "gguf", str(workspace / "ckpt"), str(tmp_path / "m.gguf")]) == 0
    assert not stale.exists() and not tmp.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "hf", "m.gguf"])


def _safetensors(header: object) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 64


def _corrupt(folder: Path, case: str) -> None:
    config = folder / "config.json"
    data = json.loads(config.read_text())
    if case == "config not UTF-8":
        config.write_bytes(b"\xff\xfe{}")
    elif case == "config not JSON":
        config.write_text("{model: 1")
    elif case == "config a list":
        config.write_text("[1, 2]")
    elif case == "n_layer of the wrong type":
        data["model"]["n_layer"] = "two"
        config.write_text(json.dumps(data))
    elif case == "n_layer 10^9":
        data["model"]["n_layer"] = 10**9
        config.write_text(json.dumps(data))
    elif case == "block_size 10^9":
        data["model"]["block_size"] = 10**9
        config.write_text(json.dumps(data))
    elif case == "header a list":
        (folder / "model.safetensors").write_bytes(_safetensors([1, 2]))
    elif case == "a 4 TiB tensor":
        (folder / "model.safetensors").write_bytes(_safetensors(
            {"transformer.wte.weight": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}))
    elif case == "negative dimensions":
        (folder / "model.safetensors").write_bytes(_safetensors(
            {"transformer.wte.weight": {"dtype": "F32", "shape": [-4, -4], "data_offsets": [0, 64]}}))
    elif case == "truncated weights":
        w = folder / "model.safetensors"
        w.write_bytes(w.read_bytes()[:-100])
    elif case == "tokenizer not JSON":
        (folder / "tokenizer.json").write_text("nope")


CORRUPT = ["config not UTF-8", "config not JSON", "config a list", "n_layer of the wrong type", "n_layer 10^9",
           "block_size 10^9", "header a list", "a 4 TiB tensor", "negative dimensions", "truncated weights",
           "tokenizer not JSON"]


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_or_hostile_checkpoint_files_are_one_line(workspace, tmp_path, capsys, case):
    """Sizes in a file are checked against the file, and a config against its weights, before anything is
    allocated."""
    folder = tmp_path / "ckpt"
    shutil.copytree(workspace / "ckpt", folder)
    _corrupt(folder, case)
    before = tree(folder)
    for argv in (["generate", str(folder), "--prompt", "The", "--max-new-tokens", "2"],
                 ["export", "hf", str(folder), str(tmp_path / "hf")]):
        one_line_error(capsys, argv)
    assert tree(folder) == before and not (tmp_path / "hf").exists()


def test_corrupt_run_and_data_files_are_one_line(workspace, tmp_path, capsys):
    def copy(name: str) -> Path:
        shutil.copytree(workspace / name, tmp_path / name, dirs_exist_ok=True)
        return tmp_path / name

    lora = copy("lora")
    cfg = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "base"}))
    one_line_error(capsys, ["generate", str(lora)], "lacks base")
    (lora / "adapter_config.json").write_text(json.dumps({**cfg, "base": str(lora)}))
    one_line_error(capsys, ["generate", str(lora)], "itself a fine-tuned run")  # once a RecursionError

    data = copy("data")
    (data / "meta.json").write_text("{")
    one_line_error(capsys, ["evaluate", str(workspace / "ckpt"), "--data", str(data)], "not valid JSON")
    (data / "meta.json").write_text("{}")
    one_line_error(capsys, ["evaluate", str(workspace / "ckpt"), "--data", str(data)], "names no token dtype")
    shutil.copy(workspace / "data" / "meta.json", data / "meta.json")
    with open(data / "train.bin", "ab") as f:
        f.write(b"\0")
    one_line_error(capsys, ["evaluate", str(workspace / "ckpt"), "--data", str(data), "--split", "train"],
                   "not a whole number")

    other = tmp_path / "bpe"  # the same text prepared with another tokenizer
    prepare([str(workspace / "corpus.txt")], other, tokenizer="bpe", vocab_size=300, val_fraction=0.2,
            progress=False)
    one_line_error(capsys, ["evaluate", str(workspace / "ckpt"), "--data", str(other)], "another tokenizer")

    run = copy("ckpt")
    resume = ["pretrain", "--data", str(workspace / "data"), "--out", str(run), "--resume", "--quiet",
              "--train.max_steps=4", *TINY]
    state = torch.load(run / "train_state.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "optimizer"}, run / "train_state.pt")
    one_line_error(capsys, resume, "lacks optimizer")
    torch.save({**state, "extra": Path("x")}, run / "train_state.pt")  # an object a plain load refuses
    one_line_error(capsys, resume, "never unpickles")


def test_a_torn_last_metrics_line_is_dropped_on_resume(workspace, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(workspace / "ckpt", run)
    metrics = run / "metrics.jsonl"
    text = metrics.read_text()
    metrics.write_text(text + text.splitlines()[-1][:7])  # a kill in the middle of a write
    capsys.readouterr()
    assert main(["pretrain", "--data", str(workspace / "data"), "--out", str(run), "--resume", "--quiet",
                 "--train.max_steps=3", *TINY]) == 0
    assert "dropped the torn last line" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3]


BAD_FLAGS = [
    (["--train.lr", "nan"], "train.lr"), (["--train.beta1", "2"], "train.beta1"),
    (["--train.threads", "-1"], "train.threads"), (["--train.weight_decay", "-1"], "train.weight_decay"),
    (["--train.grad_clip", "-1"], "train.grad_clip"), (["--train.device", "cuda"], "no CUDA GPU"),
    (["--train.max_steps", "two"], "--train.max_steps must be int"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[f[0] for f, _ in BAD_FLAGS])
def test_settings_out_of_range_are_one_line(workspace, tmp_path, capsys, flags, message):
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    one_line_error(capsys, ["pretrain", "--data", str(workspace / "data"), "--out", str(tmp_path / "run"),
                            *TINY, *flags], message)
    assert not (tmp_path / "run").exists()


def test_verb_options_out_of_range_are_one_line(workspace, tmp_path, capsys):
    c, task = str(workspace / "ckpt"), str(workspace / "task.jsonl")
    (tmp_path / "limit.yaml").write_text(f"data: {task}\nlimit: 0\n")
    for argv, message in [
        (["finetune", c, "--method", "lora", "--lora.dropout", "1.5", "--data", task, "--out", str(tmp_path / "x")],
         "lora.dropout must be in [0, 1)"),
        (["finetune", c, "--method", "llama-adapter", "--llama_adapter.layers", "99", "--data", task, "--out",
          str(tmp_path / "x")], "but the model has 2 layers"),
        (["serve", c, "--port", "99999"], "--port: 99999 is not in [1, 65535]"),
        (["evaluate", c, "--data", str(workspace / "data"), "--split", "test"], "invalid choice: 'test'"),
        (["evaluate", c, "--data", task, "--limit", "0"], "--limit: 0 is not in [1, "),
        (["evaluate", c, "--data", task, "--shots", "-3"], "--shots: -3 is not in [0, "),
        (["evaluate", c, "--config", str(tmp_path / "limit.yaml")], "limit: 0 is not in [1, "),  # from a file too
        (["quantize", c, "--report", "--max-tokens", "0"], "--max-tokens: 0 is not in [1, "),
        (["generate", c, "--seed", str(2**64)], "--seed"),
        (["generate", c, "--prompt", "caf\udce9"], "--prompt is not UTF-8 text"),  # the bytes b"caf\xe9" in argv
        (["autoprompt", c, "--data", task, "--candidates", "0"], "--candidates: 0 is not in [1, "),
        (["autoprompt", c, "--data", task, "--val-fraction", "1.5"], "--val-fraction: 1.5 is not in (0, "),
        (["autoprompt", c, "--data", task, "--template", "{input} ->"], "has no trigger slot [T]"),
        (["evaluate", c, "--data", task, "--template", "{input} [T] [T]"], "has trigger slots [T]"),
    ]:
        one_line_error(capsys, argv, message)
    assert not (tmp_path / "x").exists()


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                   st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                                  st.integers()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(SECTIONS)), st.data())
def test_any_value_of_any_setting_is_taken_or_refused_in_one_line(section, data):
    """The typed settings (YAML files, config.json, flags, Python) are the one validation layer: whatever a field
    is given, the settings are made or a GptlabError says why; nothing else escapes."""
    name = data.draw(st.sampled_from(sorted(_fields(section))))
    value = data.draw(VALUES)
    try:
        SECTIONS[section](**{name: value})
    except GptlabError as e:
        assert "\n" not in str(e)


def test_data_and_configs_from_elsewhere_are_one_line(workspace, tmp_path, capsys):
    """Files a person brings: a task file or corpus that is not UTF-8, a Hugging Face config without a field."""
    from transformers import LlamaConfig, LlamaForCausalLM

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n' * 50 + b'{"prompt": "\xff", "completion": "c"}\n')
    for extra in ([], ["--skip-bad-lines"]):
        one_line_error(capsys, ["finetune", str(workspace / "ckpt"), "--data", str(bad), "--out", str(tmp_path / "f"),
                                *extra], "is not UTF-8 text")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe text")
    capsys.readouterr()
    assert main(["prepare", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "p"), "--vocab-size", "300",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "skipping" in err[0] and "hold no text" in err[1]  # the skip said once, then the error
    hf = tmp_path / "hf"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                 intermediate_size=64, vocab_size=300)).save_pretrained(hf)
    shutil.copy(workspace / "ckpt" / "tokenizer.json", hf / "tokenizer.json")
    config = json.loads((hf / "config.json").read_text())
    for field in ("hidden_size", "num_hidden_layers", "vocab_size"):
        (hf / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != field}))
        one_line_error(capsys, ["import", "hf", str(hf), str(tmp_path / "imported")], f"lacks '{field}'")
    (hf / "config.json").write_text(json.dumps({**config, "num_attention_heads": "two"}))
    one_line_error(capsys, ["import", "hf", str(hf), str(tmp_path / "imported")], "must be integer")
    assert not (tmp_path / "imported").exists()


def test_a_killed_export_leaves_nothing_half_written_and_the_rerun_succeeds(workspace, tmp_path):
    """SIGKILL at moments through `export hf` and `quantize`: the output is absent or whole, never half; the same
    command run again succeeds (what the kill left is cleaned)."""
    import signal
    import subprocess
    import sys
    import time

    for n, (verb, delay) in enumerate([("hf", 0.8), ("hf", 1.6), ("hf", 2.4), ("quantize", 1.2), ("quantize", 2.2)]):
        out = tmp_path / f"out{n}"
        argv = ([sys.executable, "-m", "gptlab", "export", "hf", str(workspace / "ckpt"), str(out)] if verb == "hf"
                else [sys.executable, "-m", "gptlab", "quantize", str(workspace / "ckpt"), "--scheme", "int8",
                      "--out", str(out)])
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        names = ["config.json", "model.safetensors", "tokenizer.json"]
        assert not out.exists() or all((out / f).is_file() for f in names), sorted(p.name for p in out.iterdir())
        if not out.exists():
            assert subprocess.run(argv, capture_output=True).returncode == 0
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".out{n}.")) == []


def _typed_options() -> list[tuple[str, str]]:
    """(verb, option) for every verb option that takes a number or a choice."""
    from gptlab.cli import build_parser

    verbs = build_parser()._subparsers._group_actions[0].choices
    return [(verb, action.option_strings[0]) for verb, parser in verbs.items() for action in parser._actions
            if action.option_strings and (callable(action.type) or action.choices) and "." not in action.dest]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(_typed_options()), st.one_of(st.text(max_size=6), st.sampled_from(
    ["nan", "inf", "-inf", "-1", "0", "1e99", "99999999999999999999", "", "1.5", "-0"])))
def test_any_value_of_any_verb_option_is_one_line(tmp_path_factory, option, value):
    """Every verb's numeric and choice options, given anything: exit 2 with one line (the folder named does not
    exist, so a value that is taken still stops there, and nothing runs)."""
    import contextlib
    import io

    verb, flag = option
    missing = str(tmp_path_factory.getbasetemp() / "no-such-folder")
    positional = {"presets": [], "prepare": [missing], "pretrain": [], "download": [],
                  "import": ["hf", missing, missing + "-out"], "export": ["hf", missing, missing + "-out"],
                  "ask": [missing, missing, "why?"], "agent": [missing, "why?"]}
    argv = [verb, *positional.get(verb, [missing]), f"{flag}={value}"]
    if verb == "pretrain":
        argv += ["--data", missing, "--out", missing + "-out"]
    if verb in ("download",):
        return  # its positional is a hub name: reaching the hub is not for a test
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    if verb == "presets" and code == 0:
        return
    assert code == 2 and err.getvalue().count("\n") == 1 and err.getvalue().startswith("gptlab: error: "), \
        (argv, err.getvalue())


def _file_options() -> list[tuple[str, str, bool]]:
    """(verb, option's key in a --config file, whether it is a switch) for every verb option."""
    import argparse

    from gptlab.cli import build_parser

    verbs = build_parser()._subparsers._group_actions[0].choices
    return [(verb, action.dest, isinstance(action, argparse._StoreTrueAction)) for verb, parser in verbs.items()
            for action in parser._actions if action.dest not in ("help", "config") and "." not in action.dest
            and not isinstance(action, argparse._SubParsersAction)]


@pytest.mark.parametrize("verb, key, switch", _file_options(), ids=lambda v: str(v))
def test_a_config_files_value_of_the_wrong_kind_is_one_line(tmp_path, capsys, verb, key, switch):
    """A --config file's value for any verb option must be what the flag would give: true or false for a switch
    ("false" in quotes is a text, not false), a text or number otherwise (a repeatable option: a list of them)."""
    missing = str(tmp_path / "no-such-folder")
    positional = {"presets": [], "prepare": [missing], "pretrain": [], "download": ["a/b"],
                  "import": ["hf", missing, missing + "-out"], "export": ["hf", missing, missing + "-out"],
                  "ask": [missing, missing, "why?"], "agent": [missing, "why?"]}
    (tmp_path / "c.yaml").write_text(json.dumps({key: "false" if switch else {"a": 1}}))
    one_line_error(capsys, [verb, *positional.get(verb, [missing]), "--config", str(tmp_path / "c.yaml")],
                   "must be ")


def test_data_of_the_wrong_kind_is_one_line(workspace, tmp_path, capsys):
    """Data that exists but is of another kind than the verb or method takes says what it is."""
    c, task, data = str(workspace / "ckpt"), str(workspace / "task.jsonl"), str(workspace / "data")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "add 1"},
                                             {"role": "assistant", "content": "= 1"}]}) + "\n")
    (tmp_path / "folder").mkdir()
    out = ["--out", str(tmp_path / "x")]
    for argv, message in [
        (["finetune", c, "--method", "dpo", "--data", "stdlib-summaries", *out], "built-in set of task examples"),
        (["finetune", c, "--method", "full", "--data", "stdlib-preferences", *out], "built-in set of preference"),
        (["finetune", c, "--method", "dpo", "--data", data, *out], "needs preference pairs"),
        (["finetune", c, "--method", "orpo", "--data", "stdlib-preferences", "--val-data", data, *out],
         "prepared token folder"),
        (["finetune", c, "--method", "dpo", "--data", task, *out], "a file of prompt and completion is task data"),
        (["finetune", c, "--data", data, "--val-data", task, *out], "its own val split"),
        (["finetune", c, "--data", str(tmp_path / "folder"), *out], "is a folder"),
        (["autoprompt", c, "--data", data], "prepared token folder"),
        (["autoprompt", c, "--data", str(chat)], "holds conversations"),
        (["evaluate", c, "--data", data, "--template", "{input} ="], "scored by perplexity"),
        (["evaluate", c, "--data", str(chat), "--template", "{input} ="], "these are conversations"),
    ]:
        one_line_error(capsys, argv, message)
    assert not (tmp_path / "x").exists()

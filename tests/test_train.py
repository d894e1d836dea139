"""The one training loop: exact resume, survival of SIGKILL, DDP equal to one process, and clear errors."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from gptlab.cli import main
from gptlab.data.loader import TokenShards
from gptlab.data.prepare import prepare
from gptlab.errors import GptlabError
from gptlab.train import state
from gptlab.train.config import TrainConfig, merge_sections, model_config
from gptlab.train.loop import Run, train

from .conftest import TEXT

ROOT = Path(__file__).resolve().parents[1]
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.1}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        (src / f"doc{i}.txt").write_text(TEXT * 3 + f"document {i}\n")
    out = tmp_path_factory.mktemp("data") / "char"
    prepare([str(src)], out, tokenizer="char", val_fraction=0.2, progress=False)
    return out


def make_run(data: Path, out: Path, resume: bool = False, **train) -> Run:
    shards = TokenShards(data)
    tok = shards.tokenizer()
    settings = dict(max_steps=8, batch_size=4, lr=3e-3, warmup_steps=2, log_every=1, eval_every=4, eval_steps=2,
                    save_every=4, seed=7)
    return Run(model=model_config(TINY, tok.vocab_size), train=TrainConfig(**{**settings, **train}), data=shards,
               tokenizer=tok, out=out, resume=resume, progress=False)


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_stopped_and_resumed_equals_uninterrupted(data, tmp_path, optimizer):
    train(make_run(data, tmp_path / "full", max_steps=8, lr_decay_steps=8, optimizer=optimizer))
    train(make_run(data, tmp_path / "split", max_steps=4, lr_decay_steps=8, optimizer=optimizer))
    train(make_run(data, tmp_path / "split", resume=True, max_steps=8, lr_decay_steps=8, optimizer=optimizer))
    assert losses(tmp_path / "split") == losses(tmp_path / "full")
    assert len(losses(tmp_path / "full")) == 8
    a = (tmp_path / "full" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "split" / "model.safetensors").read_bytes()
    for f in ("config.json", "tokenizer.json", "loss.png", "train_state.pt"):
        assert (tmp_path / "full" / f).is_file()


def test_training_lowers_the_loss_and_the_checkpoint_generates(data, tmp_path):
    import gptlab

    last = train(make_run(data, tmp_path / "run", max_steps=60, eval_every=30, save_every=30, warmup_steps=5))
    first = losses(tmp_path / "run")[1]
    assert last["loss"] < first - 1.0
    assert isinstance(gptlab.load(tmp_path / "run", device="cpu").generate("The", max_new_tokens=5), str)


def pretrain_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gptlab", "pretrain", "--data", str(data), "--out", str(out), "--quiet",
            *[f"--model.{k}={v}" for k, v in TINY.items()], "--train.batch_size=4", "--train.log_every=1",
            "--train.eval_every=0", "--train.lr=3e-3", "--train.seed=3", "--train.threads=1", *extra]


def test_sigkill_at_any_moment_resumes_from_the_last_checkpoint(data, tmp_path):
    steps = ["--train.max_steps=300", "--train.lr_decay_steps=300", "--train.save_every=3"]
    subprocess.run(pretrain_cmd(data, tmp_path / "ref", *steps), check=True, capture_output=True)
    proc = subprocess.Popen(pretrain_cmd(data, tmp_path / "run", *steps), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (tmp_path / "run" / "train_state.pt").exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(random.uniform(0.2, 0.6))  # somewhere in the middle of the run, quite possibly during a save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.load_train_state(tmp_path / "run")["step"] < 300
    done = subprocess.run(pretrain_cmd(data, tmp_path / "run", *steps, "--resume"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")


@pytest.mark.parametrize("strategy,loss_chunk", [("ddp", 0), ("fsdp", 0), ("fsdp", 24)])
def test_torchrun_two_processes_match_one(data, tmp_path, strategy, loss_chunk):
    common = ["--train.max_steps=4", "--train.grad_accum=2", f"--train.distributed={strategy}",
              "--model.dropout=0.0", f"--train.loss_chunk={loss_chunk}"]
    subprocess.run(pretrain_cmd(data, tmp_path / "one", *common), check=True, capture_output=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *pretrain_cmd(data, tmp_path / "two", *common)[1:]], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    one_l, two_l = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one_l.keys() == two_l.keys()
    for step in one_l:
        assert two_l[step] == pytest.approx(one_l[step], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_muon_under_torchrun_matches_one_process_and_resumes(data, tmp_path, strategy):
    """Muon orthogonalizes whole matrices: under FSDP2 each process holds a shard, and the update is still the whole
    matrix's; its momentum saves (gathered) and resumes (sharded again) as AdamW's moments do."""
    common = ["--train.lr_decay_steps=4", "--train.grad_accum=2", f"--train.distributed={strategy}",
              "--model.dropout=0.0", "--train.loss_chunk=0", "--train.optimizer=muon", "--train.save_every=2"]
    subprocess.run(pretrain_cmd(data, tmp_path / "one", *common, "--train.max_steps=4"), check=True,
                   capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for extra in (["--train.max_steps=2"], ["--train.max_steps=4", "--resume"]):
        two = subprocess.run([*torchrun, *pretrain_cmd(data, tmp_path / "two", *common, *extra)[1:]],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert two.returncode == 0, two.stderr[-3000:]
    one_l, two_l = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one_l.keys() == two_l.keys() == {1, 2, 3, 4}
    for step in one_l:
        assert two_l[step] == pytest.approx(one_l[step], rel=1e-5, abs=1e-5)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    from gptlab.model import GPT
    from gptlab.train.optim import MuonAdamW, build_optimizer

    model = GPT(model_config({**TINY, "tie_embeddings": False}, 40))
    opt = build_optimizer(list(model.named_parameters()), TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02),
                          torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g.get("muon") for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]} == set(names.values()) - muon
    assert [g["lr_scale"] for g in opt.param_groups] == [20.0, 1.0, 1.0]  # the schedule scales Muon's peak


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this PyTorch has no torch.optim.Muon")
def test_muon_updates_are_torch_muons():
    from gptlab.model import GPT
    from gptlab.train.optim import MuonAdamW

    ours, theirs = GPT(model_config(TINY, 40)), GPT(model_config(TINY, 40))
    theirs.load_state_dict(ours.state_dict())
    opt = MuonAdamW(list(ours.named_parameters()), TrainConfig(lr=1e-3, muon_lr=0.02, muon_weight_decay=0.1),
                    fused=False)
    matrices = [p for n, p in theirs.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2]
    ref = torch.optim.Muon(matrices, lr=0.02, weight_decay=0.1, momentum=0.95)
    for _ in range(3):
        for a, b in zip(ours.parameters(), theirs.parameters()):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    got = [p for n, p in ours.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2]
    assert all(torch.equal(a, b) for a, b in zip(got, matrices))


def test_wsd_schedule_is_flat_then_a_straight_line_to_the_floor():
    """Warm-up, the peak held, then the last cooldown_fraction of the steps after warm-up falling linearly to min_lr
    (the speedrun's schedule), and the floor after decay_steps: after warm-up, transformers' `get_wsd_schedule` with
    a linear decay (its warm-up starts at 0, ours at lr / warmup, as our cosine's); the cosine stays the default."""
    from transformers.optimization import get_wsd_schedule

    from gptlab.train.optim import lr_at

    cfg = TrainConfig(max_steps=110, warmup_steps=10, lr=1.0, min_lr=0.1, schedule="wsd", cooldown_fraction=0.4)
    lrs = [lr_at(s, cfg) for s in range(120)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_wsd_schedule(opt, num_warmup_steps=10, num_stable_steps=60, num_decay_steps=40, decay_type="linear",
                              min_lr_ratio=0.1).lr_lambdas[0]  # 100 steps after warm-up: 60 flat, 40 down
    assert lrs[10:] == pytest.approx([theirs(s) for s in range(10, 120)])
    assert lrs[10:70] == pytest.approx([1.0] * 60) and lrs[110:] == pytest.approx([0.1] * 10)
    cosine = TrainConfig(max_steps=110, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(60, cosine) == pytest.approx(0.55)
    with pytest.raises(GptlabError, match="train.schedule"):
        TrainConfig(schedule="linear")


# -- the config contract ---------------------------------------------------------------------------------------
def test_flags_win_over_the_file_which_wins_over_the_preset():
    merged = merge_sections({"model": {"preset": "gpt2", "n_layer": 6}, "train": {"lr": 1e-3, "compile": True}},
                            {"model.n_layer": "4", "train.max_steps": "9", "train.compile": "false"})
    cfg = model_config(merged["model"], vocab_size=300)
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size) == (4, 768, 320)
    tc = TrainConfig(**merged["train"])
    assert (tc.lr, tc.max_steps, tc.compile, tc.decay_steps) == (1e-3, 9, False, 9)
    assert merge_sections({"model": "gpt2-medium"}, {})["model"] == {"preset": "gpt2-medium"}


@pytest.mark.parametrize("file,flags,message", [
    ({"train": {"max_stepz": 3}}, {}, "train.max_stepz: unknown field"),
    ({"train": {"lr": "fast"}}, {}, "train.lr must be float"),
    ({}, {"model.n_layer": "four"}, "--model.n_layer must be int"),
    ({"model": {"bias": "maybe"}}, {}, "model.bias must be bool"),
])
def test_config_errors(file, flags, message):
    with pytest.raises(GptlabError, match=message.replace(".", r"\.")):
        merge_sections(file, flags)


def test_every_shipped_config_parses():
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files
    for path in files:
        raw = yaml.safe_load(path.read_text())
        merged = merge_sections(raw, {}, str(path))
        model_config(merged["model"], vocab_size=50257)
        TrainConfig(**merged["train"])
        assert {"data", "out"} <= raw.keys()


# -- bad input -------------------------------------------------------------------------------------------------
def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_pretrain_bad_input(capsys, data, tmp_path):
    noval = tmp_path / "noval"
    prepare([str(data / "tokenizer.json")], noval, tokenizer="char", val_fraction=0.0, progress=False)
    base = ["pretrain", "--data", str(data), "--quiet", "--model.n_layer=1", "--model.n_head=2", "--model.n_embd=16",
            "--model.block_size=16"]
    cases = [
        (["pretrain", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "a")], "does not exist"),
        ([*base, "--out", str(tmp_path / "b"), "--train.batch_size=100000"], "less than one batch"),
        ([*base, "--out", str(tmp_path / "c"), "--train.nope=1"], "unrecognized arguments: --train.nope"),
        ([*base, "--out", str(tmp_path / "d"), "--train.lr=abc"], "--train.lr must be float"),
        ([*base, "--out", str(tmp_path / "e"), "--resume"], "no resumable run"),
        ([*base, "--out", str(tmp_path / "f"), "--model.block_size=100000"], "less than one batch"),
        ([*base, "--out", str(tmp_path / "h"), "--train.loss_chunk=-1"], "train.loss_chunk must be >= 0"),
        (["pretrain", "--data", str(noval), "--out", str(tmp_path / "g"), "--model.block_size=16"],
         "the val split has 0 tokens, fewer than one block"),
    ]
    for argv, message in cases:
        code, err = run_cli(capsys, *argv)
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    train(make_run(data, out, max_steps=4, save_every=4))
    with pytest.raises(GptlabError, match=r"the loss became (nan|inf) at step (\d+).*checkpoint \(step (\d+)\)") as e:
        train(make_run(data, out, resume=True, max_steps=40, lr=1e30, warmup_steps=0, save_every=1, grad_clip=0))
    bad_step, good_step = map(int, re.search(r"at step (\d+).*\(step (\d+)\)", str(e.value)).groups())
    assert good_step == bad_step - 1 == state.load_train_state(out)["step"]  # nothing saved after the NaN
    assert all(torch.isfinite(t).all() for t in load_file(out / "model.safetensors").values())


def test_disk_full_while_saving_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(make_run(data, out, max_steps=4, save_every=4))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name not in ("metrics.jsonl", "loss.png")}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(GptlabError, match="No space left on device; the previous checkpoint there is intact"):
        train(make_run(data, out, resume=True, max_steps=8, save_every=4))
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.name not in ("metrics.jsonl", "loss.png")}
    assert after == before and not (out / state.STAGING).exists()
    train(make_run(data, out, resume=True, max_steps=8, save_every=4))  # and the run goes on


def test_resume_with_other_data_is_refused(data, tmp_path):
    out = tmp_path / "run"
    train(make_run(data, out, max_steps=2, save_every=2))
    other = tmp_path / "other"
    (tmp_path / "src.txt").write_text("completely different text " * 500)
    prepare([str(tmp_path / "src.txt")], other, tokenizer="char", val_fraction=0.2, progress=False)
    with pytest.raises(GptlabError, match="tokenizer does not match"):
        train(make_run(other, out, resume=True, max_steps=4))
    with pytest.raises(GptlabError, match="already holds a training run"):
        train(make_run(data, out, max_steps=4))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(dtype):
    """Recomputing each block in backward changes memory, not numbers, under the loop's autocast too (on the CPU
    bf16 picks the math attention kernel, and the recompute must pick it again)."""
    import copy

    from gptlab.config import ModelConfig
    from gptlab.model import GPT
    from gptlab.train.loop import autocast

    torch.manual_seed(0)
    plain = GPT(ModelConfig.from_preset("tiny")).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing = True
    idx = torch.randint(0, plain.config.vocab_size, (2, 32))
    results = []
    for model in (plain, checkpointed):
        with autocast(torch.device("cpu"), dtype):
            _, loss = model(idx, idx)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("frozen_head", [False, True])
def test_chunked_loss_equals_the_whole_loss_and_its_gradients(dtype, frozen_head):
    """train.loss_chunk (the output layer and loss fused, gptlab/loss.py) changes memory, not the loss or the
    gradients: in float32 up to summation order; under bf16 or fp16 autocast its gradients are as close to float32's
    as the unfused loss's are (the two round 16-bit products at different places)."""
    import copy

    from gptlab.config import ModelConfig
    from gptlab.model import GPT

    torch.manual_seed(0)
    whole = GPT(ModelConfig.from_preset("tiny")).train()
    if frozen_head:  # as LoRA and the other frozen-base methods train: only the input of the head needs a gradient
        whole.transformer.wte.weight.requires_grad_(False)
    chunked, reference = copy.deepcopy(whole), copy.deepcopy(whole)
    chunked.loss_chunk = 24  # does not divide the 2 x 40 tokens: the last chunk is short
    idx = torch.randint(0, whole.config.vocab_size, (2, 40))
    targets = idx.clone()
    targets[0, :7] = -100  # masked prompt tokens do not count
    targets[1, 16:40] = -100  # a whole chunk of them too
    with torch.autocast("cpu", dtype=getattr(torch, dtype), enabled=dtype != "float32"):
        logits, loss_whole = whole(idx, targets)
        none, loss_chunked = chunked(idx, targets)
    assert none is None and logits.shape == (2, 40, whole.config.vocab_size)
    torch.testing.assert_close(loss_chunked, loss_whole, rtol=1e-6, atol=1e-6)
    scale = 1024.0 if dtype == "float16" else 0.5  # a scaled loss, as fp16's GradScaler and gradient accumulation
    (loss_whole * scale).backward()
    (loss_chunked * scale).backward()
    (reference(idx, targets)[1] * scale).backward()  # float32, unfused

    def error(model: torch.nn.Module) -> float:
        return max(((p.grad - r.grad).norm() / r.grad.norm()).item()
                   for p, r in zip(model.parameters(), reference.parameters()) if r.grad is not None)

    for (name, a), b in zip(whole.named_parameters(), chunked.parameters()):
        assert (a.grad is None) == (b.grad is None) == (frozen_head and name == "transformer.wte.weight")
        if a.grad is not None and dtype == "float32":
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)
    if dtype != "float32":
        assert 0 < error(chunked) < 1.5 * error(whole) < 0.05


@pytest.mark.slow
def test_chunked_loss_compiles_to_the_same_loss_and_gradients():
    """torch.compile traces the fused output layer and loss whole (no graph break) and computes the same numbers."""
    import copy

    import torch._dynamo

    from gptlab.config import ModelConfig
    from gptlab.model import GPT

    torch.manual_seed(0)
    eager = GPT(ModelConfig.from_preset("tiny")).train()
    eager.loss_chunk = 24
    compiled = copy.deepcopy(eager)
    idx = torch.randint(0, eager.config.vocab_size, (2, 40))
    targets = idx.clone()
    targets[0, :7] = -100
    torch._dynamo.reset()
    _, loss = eager(idx, targets)
    _, loss_compiled = torch.compile(compiled, fullgraph=True)(idx, targets)
    torch.testing.assert_close(loss_compiled, loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    loss_compiled.backward()
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)


def test_chunked_loss_of_a_single_chunk_is_exact_in_float32():
    """One chunk holding every token computes the same products as the unfused path."""
    from gptlab.loss import linear_cross_entropy

    torch.manual_seed(0)
    h, w = torch.randn(30, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    ref = torch.nn.functional.cross_entropy(h @ w.T, targets)
    ref.backward()
    grads = h.grad, w.grad
    h.grad = w.grad = None
    linear_cross_entropy(h, w, targets, chunk=64).backward()
    torch.testing.assert_close(h.grad, grads[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w.grad, grads[1], rtol=1e-6, atol=1e-7)


ALLOCATION_PROBE = """
import resource, torch
from gptlab.allocator import tune_for_tensors

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        t = torch.ones(16 * 2**20)  # 64 MB, written: every page touched
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

untuned = faults()
tuned = tune_for_tensors()
faults()  # the first large block grows the heap once
print(untuned, tuned, faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize("env", [{}, {"GPTLAB_MALLOC": "system"}, {"MALLOC_ARENA_MAX": "2"}])
def test_the_allocator_reuses_freed_tensor_memory_unless_told_otherwise(env):
    """A 64 MB tensor allocated and freed eight times costs ~16K page faults each time with glibc's defaults; once the
    loop has set the allocator up, the freed block is reused (the heap may still grow once or twice where small
    allocations land at its top); a user's own allocator settings are left alone."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GPTLAB_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", ALLOCATION_PROBE], capture_output=True, text=True, check=True,
                         env={**clean, **env}).stdout.split()
    untuned, tuned, after = int(out[0]), out[1] == "True", int(out[2])
    assert untuned > 8 * 15_000  # the premise: fresh pages for every large block
    assert tuned == (not env)
    assert (after < untuned / 3) if tuned else (after > untuned / 2)

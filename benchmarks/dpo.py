"""DPO with LoRA, gptlab vs TRL's DPOTrainer: time per optimizer step and peak memory on the CPU, same model,
adapters, data and loss.

    python benchmarks/dpo.py [--steps 4] [--rounds 2] [--batch-size 4] [--seq 128] [--threads N] [--dtype float32]
                             [--same-malloc]

The model: GPT-2 124M (`transformers.GPT2Config()`), random weights from a fixed seed, saved once as a Hugging Face
folder; TRL loads it with `AutoModelForCausalLM.from_pretrained`, gptlab imports it (`gptlab import hf`) and loads its
checkpoint. The data: preference pairs cut from the built-in `stdlib-preferences` texts (signatures and summaries as
one token stream, tokenized once by a byte-level BPE trained here; the model keeps GPT-2's 50,257-token output layer):
each pair a prompt of seq/2 tokens, a chosen completion that fills the row to `--seq` tokens (its EOS included) and a
shorter rejected one, right-padded. Both libraries get the same token ids in every step.

- gptlab runs its own pieces as `gptlab finetune --method dpo` does: DPO (beta 0.1, sigmoid loss) on LoRA, the reference
  log-probabilities from the same model with the adapters switched off, the loop's `train_step` with the method's loss,
  fused AdamW (`build_optimizer`), gradient clipping at 1.0, the loop's allocator setup for tensors on the CPU.
- TRL runs `DPOTrainer.train()` as a user runs it: `peft_config` a LoraConfig, `ref_model=None` (so the reference is the
  adapter-disabled model, no second copy), `precompute_ref_log_probs=False`, fused AdamW (its default), clipping at 1.0.
  Its per-step time is measured by a callback from `on_step_begin` to `on_step_end`: the trainer's `training_step`
  (chosen and rejected rows in one forward, the reference forward, backward), clipping, the optimizer and scheduler
  steps and `zero_grad`, which is what gptlab's `train_step` does. The batches are TRL's own collator's output of the
  pre-tokenized pairs (its dataset is swapped for them after the trainer is built); collation is outside the timing.
- Both: LoRA r=8, alpha 16, no dropout, on c_attn, c_proj and c_fc of every block (attention and MLP), the adapters
  set to the same seeded values (B nonzero, so that the first loss is not log 2 trivially); dropout off, no activation
  checkpointing (TRL's default turns it on; gptlab's is off), float32 (`--dtype bfloat16`: bf16 autocast in both, as
  each library does it). The first step's loss of each is printed: the same model, adapters and batch give the same
  loss, so both do the same work.

Each variant runs in its own process, so that its memory is its own; rounds alternate the variants. Time: the median
over `--steps` steps after two warm-up steps, then the median over rounds. Memory: the peak anonymous resident memory
during the steps (sampled every 20 ms), plus the resident pages of memory-mapped weight files (transformers maps the
safetensors file and its pages are read in at the first step; gptlab reads the weights into memory of its own, which
the anonymous memory counts), minus the process's before the model was loaded (Python, PyTorch and the libraries
imported). Each library runs with the allocator its users get (gptlab's loop sets glibc up to keep freed memory for
reuse; TRL leaves glibc as it is); `--same-malloc` runs both under glibc with a fixed 64 KB mmap threshold instead (as
benchmarks/qlora.py), which returns large freed blocks at once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from qlora import AnonPeak, rss_mb

VARIANTS = ("gptlab", "trl")
BETA, LR, RANK, ALPHA = 0.1, 5e-4, 8, 16
TARGETS = ["c_attn", "c_proj", "c_fc"]  # GPT-2's names, in transformers and in gptlab alike
WARMUP = 2


# -- inputs, built once -------------------------------------------------------------------------------------------
def build_inputs(root: Path, layers: int | None, seq: int, batch: int, steps: int) -> dict[str, Any]:
    """The Hugging Face folder, gptlab's checkpoint of it, and the pre-tokenized pairs of every step."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptlab.data.preferences import stdlib_preferences
    from gptlab.interop.hf import import_hf
    from gptlab.tokenizer import Tokenizer

    prefs = stdlib_preferences()
    texts = [p.prompt + p.chosen for p in prefs]
    tok = Tokenizer.train_bpe(texts, vocab_size=8192)
    eos = tok.eos_id
    torch.manual_seed(0)
    shape = {"n_layer": layers} if layers else {}
    hf = GPT2LMHeadModel(GPT2Config(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **shape))
    hf.save_pretrained(root / "hf")
    del hf
    tok.save_folder(root / "hf")  # tokenizer.json, and the config AutoTokenizer reads it with
    import_hf(root / "hf", root / "ckpt")
    stream = [t for text in texts for t in tok.encode(text + "\n", special=False)]
    g = torch.Generator().manual_seed(0)
    prompt_len = seq // 2
    completion = seq - prompt_len - 1  # + EOS: the chosen row is `seq` tokens long
    pos, pairs = 0, []
    for _ in range((steps + WARMUP) * batch):
        short = int(torch.randint(completion // 2, completion, (1,), generator=g))  # rejected: shorter, padded
        need = prompt_len + completion + short
        if pos + need > len(stream):
            pos = 0
        cut = stream[pos: pos + need]
        pos += need
        pairs.append({"prompt_ids": cut[:prompt_len], "chosen_ids": cut[prompt_len: prompt_len + completion] + [eos],
                      "rejected_ids": cut[prompt_len + completion:] + [eos]})
    (root / "pairs.json").write_text(json.dumps(pairs))
    return {"hf": str(root / "hf"), "ckpt": str(root / "ckpt"), "pairs": str(root / "pairs.json"), "pad": eos}


def set_lora(layers: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]) -> None:
    """The same adapters in both variants, by the adapted layer's name (`transformer.h.0.attn.c_attn` in gptlab and in
    transformers): A ~ U(-1/sqrt(in), 1/sqrt(in)) as Kaiming's init, B ~ N(0, 0.02^2) (not 0: the policy differs from
    its reference from the first step), drawn in the order of the sorted names."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in sorted(layers):
            a, b = layers[name]
            bound = a.shape[1] ** -0.5
            a.copy_(torch.rand(a.shape, generator=g) * 2 * bound - bound)
            b.copy_(torch.randn(b.shape, generator=g) * 0.02)


def mapped_mb(suffix: str = ".safetensors") -> float:
    """Resident pages of this process's memory maps of files ending in `suffix`: transformers keeps the weights it
    loads mapped from their file, where they are resident memory that RssAnon does not count."""
    total, counting = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's first line: range perms offset dev ...
            counting = len(head) == 6 and head[5].endswith(suffix)
        elif counting and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total / 1024


def gptlab_batch(pairs: list[dict[str, list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs as `PreferenceBatches.batch` lays them out: rows 2i and 2i + 1 the chosen and the rejected row of
    pair i, right-padded, inputs (2B, T - 1) and targets shifted by one, -100 where not scored (prompt, padding)."""
    seqs = [(p["prompt_ids"] + p[k], len(p["prompt_ids"])) for p in pairs for k in ("chosen_ids", "rejected_ids")]
    T = max(len(ids) for ids, _ in seqs)
    x = torch.full((len(seqs), T), pad, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    for r, (ids, n_prompt) in enumerate(seqs):
        x[r, : len(ids)] = torch.tensor(ids)
        y[r, n_prompt - 1: len(ids) - 1] = torch.tensor(ids[n_prompt:])  # each completion token, from the one before
    return x[:, :-1], y[:, :-1]


# -- the two workers ----------------------------------------------------------------------------------------------
def gptlab_worker(args: argparse.Namespace, inputs: dict[str, Any]) -> dict[str, Any]:
    from gptlab.allocator import tune_for_tensors
    from gptlab.checkpoint import load_checkpoint
    from gptlab.loss import default_chunk
    from gptlab.peft.lora import LoRALinear
    from gptlab.peft.preference import DPO
    from gptlab.train.config import TrainConfig
    from gptlab.train.distributed import Dist
    from gptlab.train.loop import store_frozen_linears, train_step
    from gptlab.train.optim import build_optimizer

    device = torch.device("cpu")
    tune_for_tensors()  # as the loop does on the CPU (a no-op under --same-malloc, whose MALLOC_ setting wins)
    pairs = json.loads(Path(inputs["pairs"]).read_text())
    batches = [gptlab_batch(pairs[i: i + args.batch_size], inputs["pad"]) for i in range(0, len(pairs),
                                                                                         args.batch_size)]
    cfg = TrainConfig(batch_size=args.batch_size, dtype=args.dtype, lr=LR, warmup_steps=0)
    before = rss_mb("RssAnon") + mapped_mb()
    model, _ = load_checkpoint(inputs["ckpt"])
    method = DPO(beta=BETA, lora={"r": RANK, "alpha": ALPHA, "targets": ",".join(TARGETS)})
    method.attach(model)
    set_lora({n: (m.lora_A.weight, m.lora_B.weight) for n, m in model.named_modules() if isinstance(m, LoRALinear)})
    if cfg.dtype != "float32":
        store_frozen_linears(model, getattr(torch, cfg.dtype))
    model.activation_checkpointing = False
    model.loss_chunk = default_chunk(device)
    model.to(device).train()
    named = method.trainable(model)
    params = [p for _, p in named]
    optimizer = build_optimizer(named, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    d = Dist(device=device)
    sampler = AnonPeak()
    times, losses = [], []
    for x, y in batches:
        t = time.perf_counter()
        loss, _, _ = train_step(model, model, optimizer, scaler, params, cfg, d, lambda _, x=x, y=y: (x, y),
                                method.loss)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    peak = sampler.stop() + mapped_mb() - before  # the mapped weights' pages stay resident once touched
    return {"step_s": statistics.median(times[WARMUP:]), "peak_mb": peak,
            "loss": losses[0], "trainable": sum(p.numel() for p in params), "tokens": int(batches[0][0].numel())}


def trl_worker(args: argparse.Namespace, inputs: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    transformers.logging.set_verbosity_error()
    losses: list[torch.Tensor] = []
    times: list[float] = []

    class Trainer(DPOTrainer):
        def _send_telemetry(self) -> None:  # nothing sent
            pass

        def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(loss.detach())
            return loss

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            times.append(time.perf_counter() - self.t)

    pairs = json.loads(Path(inputs["pairs"]).read_text())
    tok = AutoTokenizer.from_pretrained(inputs["hf"])
    tok.pad_token = tok.pad_token or tok.eos_token  # what DPOTrainer does too
    out = tempfile.TemporaryDirectory()  # the trainer saves nothing there
    config = DPOConfig(
        output_dir=out.name, report_to="none", per_device_train_batch_size=args.batch_size,
        train_sampling_strategy="sequential", dataloader_num_workers=0, activation_checkpointing=False,
        bf16=args.dtype == "bfloat16", fp16=False, use_cpu=True, save_strategy="no", logging_strategy="no",
        disable_dropout=True, seed=0, data_seed=0, beta=BETA, loss_type=["sigmoid"], max_length=None,
        precompute_ref_log_probs=False, learning_rate=LR, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
        lr_scheduler_type="constant", max_steps=len(pairs) // args.batch_size,
    )
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, fan_in_fan_out=True,
                      task_type="CAUSAL_LM")
    before = rss_mb("RssAnon") + mapped_mb()
    model = AutoModelForCausalLM.from_pretrained(inputs["hf"], dtype=torch.float32)
    records = [{"prompt": "a", "chosen": " b", "rejected": " c"}]  # the constructor's; the pairs replace it below
    trainer = Trainer(model=model, ref_model=None, args=config, train_dataset=Dataset.from_list(records),
                      processing_class=tok, peft_config=lora)
    layers: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
    for name, module in trainer.model.named_modules():
        if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) and "default" in module.lora_A:
            layers[name.removeprefix("base_model.model.")] = (module.lora_A["default"].weight,
                                                              module.lora_B["default"].weight)
    set_lora(layers)
    trainer.train_dataset = Dataset.from_list(pairs)  # pre-tokenized: TRL's collator pads and stacks them
    trainer.add_callback(StepTimer())
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    first = next(iter(trainer.get_train_dataloader()))
    sampler = AnonPeak()
    trainer.train()
    peak = sampler.stop() + mapped_mb() - before  # the mapped weights' pages stay resident once touched
    out.cleanup()
    return {"step_s": statistics.median(times[WARMUP:]), "peak_mb": peak,
            "loss": losses[0].item(), "trainable": trainable, "tokens": int(first["input_ids"].numel())}


# -- the driver ---------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process, after two warm-up steps")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4, help="preference pairs per step (2x rows)")
    parser.add_argument("--seq", type=int, default=128, help="tokens of a chosen row: prompt + completion + EOS")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--same-malloc", action="store_true",
                        help="both under glibc with a fixed 64 KB mmap threshold (gptlab's allocator setup off)")
    parser.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)  # smaller GPT-2 for smoke runs
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        if args.threads:
            torch.set_num_threads(args.threads)
        inputs = json.loads(args.inputs)
        result = (gptlab_worker if args.variant == "gptlab" else trl_worker)(args, inputs)
        print(json.dumps({"variant": args.variant, "threads": torch.get_num_threads(), **result}))
        return

    import peft
    import transformers
    import trl

    command = "python " + shlex.join(sys.argv)
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1")
    if args.same_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    with tempfile.TemporaryDirectory() as tmp:
        inputs = build_inputs(Path(tmp), args.layers, args.seq, args.batch_size, args.steps)
        for _ in range(args.rounds):
            for variant in VARIANTS:
                cmd = [sys.executable, __file__, "--variant", variant, "--inputs", json.dumps(inputs),
                       "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq", str(args.seq),
                       "--dtype", args.dtype]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                run = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if run.returncode:
                    sys.exit(f"the {variant} process failed:\n{run.stderr[-4000:]}")
                results[variant].append(json.loads(run.stdout.strip().splitlines()[-1]))
                r = results[variant][-1]
                print(f"# {variant}: {r['step_s']:.3f} s/step, peak {r['peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "peak_mb")}
           for v, rs in results.items()}
    first = {v: rs[0] for v, rs in results.items()}
    layers = args.layers or 12
    print(f"# {command}")
    print(f"# {cpu_model()}, {first['gptlab']['threads']} threads; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}")
    print(f"GPT-2 {'124M' if layers == 12 else f'with {layers} layers'}, DPO (sigmoid, beta {BETA}) on LoRA r={RANK} "
          f"alpha {ALPHA} on c_attn/c_proj/c_fc, {args.batch_size} pairs x {args.seq} tokens "
          f"(TRL's forward takes the {first['trl']['tokens']} tokens, gptlab's the {first['gptlab']['tokens']} inputs "
          f"before each last token), {args.dtype}, "
          f"{'fixed glibc mmap threshold' if args.same_malloc else 'allocators as each library runs them'}; medians "
          f"of {args.rounds} rounds x {args.steps} steps")
    print("| variant | time/step | peak memory (training) | trainable parameters | first-step loss |")
    print("|---|---|---|---|---|")
    for v in VARIANTS:
        print(f"| {v} | {med[v]['step_s']:.3f} s | {med[v]['peak_mb']:.0f} MB | {first[v]['trainable']:,} | "
              f"{first[v]['loss']:.6f} |")
    speed = med["trl"]["step_s"] / med["gptlab"]["step_s"]
    mem = med["gptlab"]["peak_mb"] / med["trl"]["peak_mb"]
    print(f"gptlab: {speed:.2f}x TRL's speed, {mem:.2f}x its peak memory (goal: at least 1.5x the speed, less memory)")
    diff = abs(first["gptlab"]["loss"] - first["trl"]["loss"])
    tol = 1e-4 if args.dtype == "float32" else 1e-2  # bf16: each library rounds its products its own way
    print(f"first-step loss: gptlab {first['gptlab']['loss']:.6f}, TRL {first['trl']['loss']:.6f}: difference "
          f"{diff:.1e}, " + (f"within {tol:g}: the same computation" if diff < tol else
                             f"MORE than {tol:g}: not the same computation"))


if __name__ == "__main__":
    main()

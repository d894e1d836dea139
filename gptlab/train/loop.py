"""The one training loop: pretraining and every fine-tuning method run through `train`.

What differs between them is a parameter, not a copy of this file: the `Method` decides which parameters train and
what a checkpoint stores, and the `Batches` decide what a batch is (random windows of a token stream for pretraining,
masked examples for fine-tuning). Everything else — schedule, accumulation, clipping, autocast, compile, evaluation,
metrics, atomic checkpoints and exact resume, DDP/FSDP — is here once.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from gptlab.allocator import tune_for_tensors
from gptlab.checkpoint import CONFIG, TOKENIZER, check_fits, load_checkpoint, read_folders
from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.files import check_new_folder, check_outside
from gptlab.loss import default_chunk
from gptlab.model import GPT
from gptlab.peft.base import Method, next_token_loss
from gptlab.tokenizer import Tokenizer
from gptlab.train import distributed, state
from gptlab.train.config import TrainConfig
from gptlab.train.metrics import ACCURACY, Metrics, flops_per_token, peak_flops
from gptlab.train.optim import build_optimizer, lr_at

PRETRAIN_LR = 6e-4  # GPT-2 small's, as nanoGPT trains it
RUN_LOGS = {"metrics.jsonl", "loss.png", "tensorboard"}  # what a run writes before its first checkpoint
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class Batches(Protocol):
    """Inputs and targets (B, T) as a pure function of the key; targets of -100 are not scored."""

    def batch(self, split: str, key: tuple[int, ...], batch_size: int, block_size: int
              ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def check(self, block_size: int, batch_size: int, need_val: bool) -> None: ...


@dataclass
class Run:
    model: ModelConfig
    train: TrainConfig
    data: Batches
    tokenizer: Tokenizer
    out: Path
    resume: bool = False
    method: Method = field(default_factory=Method)
    progress: bool = True
    base: Path | None = None  # fine-tuning: the checkpoint folder the model starts from
    inputs: tuple[Path, ...] = ()  # other folders the run reads (its data): `out` may not lie inside them


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward (and so the backward). On the CPU, attention then runs as plain matrix
    products: PyTorch's CPU flash-attention kernel is slow in bf16 backward, and bf16 products are fast (measured on
    2 cores: quickstart step 24.1 -> 19.9 ms, GPT-2 124M at context 256: 2.31 -> 2.10 s)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=getattr(torch, dtype)))
    if device.type == "cpu":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    return stack


def _full_state(model: GPT, optimizer: torch.optim.Optimizer | None, d: distributed.Dist
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Full (unsharded) model and optimizer state on the CPU, keyed by parameter name, whatever the wrapping."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=opts)
    optim = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return weights, optim


def plain_settings(method: Method) -> dict[str, Any]:
    """The method's settings as plain values (what a training state may hold and a resume compares)."""
    return json.loads(json.dumps(method.settings, default=str))


def check_same_settings(out: Path, saved: dict[str, Any], now: dict[str, Any], section: str) -> None:
    """A run resumes with the method settings it was trained with: another rank, scheme or beta would load its
    weights into another model, or change its objective halfway, without a word."""
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            check_same_settings(out, old, new, key)
        elif old != new:
            flag = f"--{section.replace('-', '_')}.{key}"
            raise GptlabError(f"{out} was trained with {flag} {json.dumps(old)}, not {json.dumps(new)}: resume it "
                              "with the settings it was trained with")


def _check_out(run: Run) -> dict[str, Any] | None:
    """The saved state to resume from, or None for a fresh run. A fresh run starts only in a new or empty folder, a
    resumed one only in a folder that holds a run; neither inside a folder it reads."""
    out = run.out
    inputs = [*(read_folders(run.base) if run.base is not None else []), *run.inputs]
    check_outside(out, inputs)
    if run.resume:
        state.recover(out)
        saved = state.load_train_state(out)
        stored = json.loads((out / TOKENIZER).read_text()) if (out / TOKENIZER).is_file() else None
        if stored != json.loads(run.tokenizer.backend.to_str()):
            raise GptlabError(f"the data's tokenizer does not match the one in {out}; resume with the same data")
        if saved.get("method", run.method.name) != run.method.name:
            raise GptlabError(f"{out} holds a {saved['method']} run; resume it with --method {saved['method']}")
        if "method_settings" in saved:
            check_same_settings(out, saved["method_settings"], plain_settings(run.method), run.method.name)
        return saved
    if (out / state.TRAIN_STATE).exists() or (out / state.STAGING).exists():
        raise GptlabError(f"{out} already holds a training run; pass --resume to continue it, or choose a new --out")
    if not (out.is_dir() and {p.name for p in out.iterdir()} <= RUN_LOGS):  # logs of a run that saved nothing
        check_new_folder(out, inputs)
    return None


def train(run: Run) -> dict[str, Any]:
    """Train until `train.max_steps`; returns the last logged record. Raises GptlabError on a user error or NaN."""
    cfg = run.train = run.train.resolved(run.method.lr if run.base is not None else PRETRAIN_LR)
    d = distributed.setup(cfg.device)
    if d.device.type == "cpu":
        tune_for_tensors()  # large tensors reuse freed heap memory instead of page-faulting fresh pages each step
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # for this run only: restored at its end
    try:
        return _train(run, cfg, d)
    finally:
        torch.set_num_threads(threads)


def _train(run: Run, cfg: TrainConfig, d: distributed.Dist) -> dict[str, Any]:
    if cfg.batch_size % d.world:
        raise GptlabError(f"train.batch_size {cfg.batch_size} must be divisible by the number of processes {d.world}")
    saved = _check_out(run)
    distributed.barrier(d)  # every process has checked `out` before the first one writes there
    torch.manual_seed(cfg.seed)
    if run.base is not None:  # the base's weights; a resumed method restores its own below
        model, _ = load_checkpoint(run.base, quantize=run.method.base_quantization)
        if model.quantization is not None and run.method.needs_float_weights:
            raise GptlabError(f"{run.base} is quantized ({model.quantization.scheme}); {run.method.name} training "
                              "needs float weights: fine-tune its float source, or use a method that keeps the "
                              "base frozen (lora, qlora, adapter, prefix, prompt, llama-adapter)")
    elif saved:
        model = GPT(ModelConfig.from_json(str(run.out / CONFIG)))
    else:
        check_fits(4 * run.model.approx_params(), f"a new model of about {run.model.approx_params():,} parameters")
        model = GPT(run.model)
    if run.tokenizer.vocab_size > model.config.vocab_size:
        model.resize_vocab(run.tokenizer.vocab_size)  # task tokens added for fine-tuning
    model_cfg = model.config
    run.data.check(model_cfg.block_size, cfg.batch_size, need_val=cfg.eval_every > 0)
    run.method.attach(model)
    if saved:
        run.method.restore(model, run.out)
    if cfg.dtype != "float32" and not (d.active and cfg.distributed == "fsdp"):  # FSDP2 shards one dtype per group
        store_frozen_linears(model, getattr(torch, cfg.dtype))
    model.activation_checkpointing = cfg.activation_checkpointing
    model.loss_chunk = cfg.loss_chunk if cfg.loss_chunk is not None else default_chunk(d.device)
    model.to(d.device).train()
    wrapped = distributed.wrap(model, d, cfg.distributed)
    named = run.method.trainable(model)  # after wrapping: FSDP replaces the parameters with sharded ones
    params = [p for _, p in named]
    optimizer = build_optimizer(named, cfg, d.device, sharded=d.active and cfg.distributed == "fsdp",
                                paged=run.method.paged_optimizer)
    start = 0
    if saved:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
        start = int(saved["step"])
        torch.set_rng_state(saved["rng"]["cpu"])
        if d.device.type == "cuda" and saved["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(saved["rng"]["cuda"], d.device)
    forward = torch.compile(wrapped) if cfg.compile else wrapped
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.dtype == "float16")

    metrics = Metrics(run.out, start if saved else None, cfg.tensorboard) if d.main else None
    n_params = model.num_params()
    peak = peak_flops(d.device)
    bar = tqdm(total=cfg.max_steps, initial=start, desc=run.method.name, disable=not (d.main and run.progress),
               dynamic_ncols=True, mininterval=1.0)
    last: dict[str, Any] = {"step": start, "note": f"already at step {start}; raise train.max_steps to go on"} \
        if start >= cfg.max_steps else {}
    last_saved = start
    tokens_seen = int(saved.get("tokens_seen", 0)) if saved else 0
    tokens_since_log = 0

    def save(step: int) -> None:
        weights, optim = _full_state(model, optimizer, d)
        if d.main:
            rng = {"cpu": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state(d.device) if d.device.type == "cuda" else None}
            train_state = {"step": step, "optimizer": optim, "rng": rng, "tokens_seen": tokens_seen,
                           "train_config": asdict(cfg), "method": run.method.name,
                           "method_settings": plain_settings(run.method)}

            def write(folder: Path) -> None:
                run.method.save(folder, model, weights, run.tokenizer, run.base)
                torch.save(train_state, folder / state.TRAIN_STATE)

            state.save(run.out, write)
        distributed.barrier(d)

    if d.main:
        run.out.mkdir(parents=True, exist_ok=True)
    try:
        t_start = t_last = time.perf_counter()  # elapsed_s counts from this (re)start
        t_paused = 0.0
        t_aside = 0.0  # evaluation and saving so far: train_s leaves them out (the time to a loss, however often
        # it is measured)
        for step in range(start, cfg.max_steps):
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's groups: its own peak, the same schedule
            run.method.begin_step(model, step)
            loss_sum, tokens, stats = train_step(
                forward, wrapped, optimizer, scaler, params, cfg, d,
                lambda micro, step=step: run.data.batch("train", (cfg.seed, step, micro), cfg.batch_size,
                                                        model_cfg.block_size), run.method.loss)

            done = step + 1
            if cfg.compile and done == start + 1 and d.main and run.progress:
                from torch._inductor.runtime.cache_dir_utils import cache_dir

                bar.write(f"step {done} took {time.perf_counter() - t_start:.1f} s with torch.compile's compilation; "
                          f"its cache ({cache_dir()}; TORCHINDUCTOR_CACHE_DIR moves it) lets the next run start warm")
            tokens_seen += tokens
            tokens_since_log += tokens
            loss_value = distributed.mean(loss_sum, d).item()
            if not math.isfinite(loss_value):
                raise GptlabError(f"the loss became {loss_value} at step {done}; training stopped. The last good "
                                  f"checkpoint (step {last_saved}) is in {run.out}" if last_saved else
                                  f"the loss became {loss_value} at step {done}; training stopped before any "
                                  "checkpoint was saved (try a lower train.lr)")
            if done % cfg.log_every == 0 or done == cfg.max_steps or done == start + 1:
                now = time.perf_counter()
                tps = tokens_since_log / max(now - t_last - t_paused, 1e-9)
                t_last, t_paused, tokens_since_log = now, 0.0, 0
                last = {"step": done, "loss": round(loss_value, 6), "lr": lr, "tokens_per_s": round(tps, 1),
                        "elapsed_s": round(now - t_start, 2), "peak_memory_mb": round(peak_memory_mb(d.device), 1),
                        **{k: round(distributed.mean(v, d).item(), 6) for k, v in stats.items()}}  # the method's
                mfu = tps * flops_per_token(model_cfg, n_params) / peak if peak else None
                if metrics:
                    metrics.log(**last, **({"mfu": round(mfu, 4)} if mfu is not None else {}))
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}",
                                mfu=f"{mfu:.1%}" if mfu is not None else "unknown",
                                **({"acc": f"{last[ACCURACY]:.2f}"} if ACCURACY in last else {}))
            bar.update(1)
            t_pause = time.perf_counter()  # tokens/s counts training steps, not evaluation or saving
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.max_steps):
                val, val_stats = evaluate(forward, run.data, cfg, model_cfg, d, run.method.loss)
                val_stats = {f"val_{k}": round(v, 6) for k, v in val_stats.items()}
                if metrics:
                    ppl = {} if val_stats else {"val_ppl": round(math.exp(min(val, 50)), 3)}  # of a next-token loss
                    metrics.log(step=done, val_loss=round(val, 6), **ppl,
                                elapsed_s=round(time.perf_counter() - t_start, 2),
                                train_s=round(t_pause - t_start - t_aside, 2), **val_stats)
                    metrics.plot()
                if d.main and run.progress:
                    bar.write(f"step {done}: val loss {val:.4f}" + (
                        f", reward accuracy {val_stats['val_' + ACCURACY]:.3f}" if "val_" + ACCURACY in val_stats
                        else ""))
                last.update(val_loss=val, **val_stats)
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.max_steps:
                save(done)
                last_saved = done
            t_paused += time.perf_counter() - t_pause
            t_aside += time.perf_counter() - t_pause
        distributed.barrier(d)  # the main process's last save is done before any process tears the group down
    finally:
        bar.close()
        if metrics:
            metrics.close()
        distributed.teardown(d)
    return last


def store_frozen_linears(model: GPT, dtype: torch.dtype) -> None:
    """Keep frozen Linear weights in the autocast dtype: autocast casts them to it for every product anyway, so the
    numbers are the same, while memory halves and the per-step cast goes away (LoRA's base in 16 bits, as peft users
    load it). Embeddings and norms stay float32, as does every trainable weight."""
    tied = model.transformer.wte.weight
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad and module.weight is not tied:
                module.weight.data = module.weight.data.to(dtype)
                if module.bias is not None and not module.bias.requires_grad:
                    module.bias.data = module.bias.data.to(dtype)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def share(t: torch.Tensor, d: distributed.Dist) -> torch.Tensor:
    """This process's rows of a batch (whole rows in order: a preference batch keeps its pairs)."""
    n = t.size(0)
    return t[d.rank * n // d.world: (d.rank + 1) * n // d.world]


def train_step(forward: torch.nn.Module, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, params: list[torch.nn.Parameter], cfg: TrainConfig,
               d: distributed.Dist, batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
               loss_fn: LossFn = next_token_loss) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    """One optimizer step over `grad_accum` micro-batches; returns the summed (already averaged) loss, the number
    of input tokens, all processes together (fine-tuning batches are only as long as their longest example), and the
    method's statistics averaged over the micro-batches (DPO's rewards)."""
    loss_sum = torch.zeros((), device=d.device)
    stats: dict[str, torch.Tensor] = {}
    tokens = 0
    for micro in range(cfg.grad_accum):
        x, y = batch(micro)
        x, y = share(x, d).to(d.device, non_blocking=True), share(y, d).to(d.device, non_blocking=True)
        sync = micro == cfg.grad_accum - 1
        with _no_sync(wrapped, d, cfg.distributed, sync), autocast(d.device, cfg.dtype):
            loss, micro_stats = loss_fn(forward, x, y)
            loss = loss / cfg.grad_accum
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
        for k, v in micro_stats.items():
            stats[k] = stats.get(k, 0) + v.detach().float() / cfg.grad_accum
        tokens += x.numel() * d.world
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, tokens, stats


def _no_sync(wrapped: torch.nn.Module, d: distributed.Dist, strategy: str, sync: bool
             ) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if not d.active or sync:
        if d.active and strategy == "fsdp":
            wrapped.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if strategy == "fsdp":
        wrapped.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return wrapped.no_sync()


@torch.no_grad()
def evaluate(forward: torch.nn.Module, data: Batches, cfg: TrainConfig, model_cfg: ModelConfig,
             d: distributed.Dist, loss_fn: LossFn = next_token_loss) -> tuple[float, dict[str, float]]:
    """Mean loss (and the method's statistics) over `eval_steps` val batches, the same batches at every evaluation."""
    forward.eval()
    total = torch.zeros((), device=d.device)
    stats: dict[str, torch.Tensor] = {}
    for i in range(cfg.eval_steps):
        x, y = data.batch("val", (cfg.seed, i), cfg.batch_size, model_cfg.block_size)
        with autocast(d.device, cfg.dtype):
            loss, step_stats = loss_fn(forward, share(x, d).to(d.device), share(y, d).to(d.device))
        total += loss.float()
        for k, v in step_stats.items():
            stats[k] = stats.get(k, 0) + v.float() / cfg.eval_steps
    forward.train()
    return (distributed.mean(total / cfg.eval_steps, d).item(),
            {k: distributed.mean(v, d).item() for k, v in stats.items()})

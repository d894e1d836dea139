"""Training step speed: gptlab's own step (`gptlab.train.loop.train_step`, fused AdamW) vs Hugging Face
`GPT2LMHeadModel` with `torch.optim.AdamW`, same shapes, same data, interleaved in one process.

    python benchmarks/train.py [--shapes quickstart,gpt2] [--steps 20] [--compile] [--loss-chunks default,0,1024]

On a GPU, `--compile-mode` and `--attention` (the scaled_dot_product_attention kernel gptlab's step may use) try the
settings that trade compile time or kernels for speed; MFU is printed where the device's peak is known.

quickstart: 4 layers, 4 heads, 128 wide, context 64, batch 12, a character vocabulary.
gpt2: GPT-2 124M, context 256, batch 4.
Any family preset (`gptlab presets`, e.g. llama-3.2-1b): random weights of its real shape, context `--context`,
batch 1, against transformers' own class of that family.
Each shape runs in float32 and under bf16 autocast, both libraries alike; ratios are to transformers in float32.

`--method lora`: LoRA r=8 (alpha 16) on every attention and MLP Linear instead of full training, as a user runs it in
each library: gptlab's LoRA with its frozen Linear weights in bf16 (as `gptlab finetune` keeps them), against peft on
a transformers model loaded in bf16 (float32 adapters, peft's default), both under bf16 autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from gptlab.allocator import tune_for_tensors
from gptlab.config import ModelConfig
from gptlab.interop import families
from gptlab.loss import default_chunk
from gptlab.model import GPT, build_on_meta
from gptlab.peft.lora import LoRA
from gptlab.train.config import TrainConfig
from gptlab.train.distributed import Dist
from gptlab.train.loop import store_frozen_linears, train_step
from gptlab.train.metrics import flops_per_token, peak_flops
from gptlab.train.optim import build_optimizer

SHAPES = {
    "quickstart": (ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=512), 12),
    "gpt2": (ModelConfig(block_size=256), 4),
    "gpt2-1024": (ModelConfig(vocab_size=50304), 16),  # GPU: the context GPT-2 trained with
}
ATTENTION = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gptlab_step(cfg: ModelConfig, batch: int, data: torch.Tensor, dtype: str, compile_mode: str | None,
                loss_chunk: int | None = None, attention: str = "auto", lora: bool = False) -> Callable[[int], None]:
    """gptlab's real training step: the loop's `train_step` with the loop's optimizer (and its loss_chunk default)."""
    tcfg = TrainConfig(batch_size=batch, dtype=dtype, lr=1e-4, warmup_steps=0, loss_chunk=loss_chunk)
    torch.manual_seed(0)
    d = Dist(device=data.device)
    model = GPT(cfg).to(d.device).train()
    model.loss_chunk = loss_chunk if loss_chunk is not None else default_chunk(d.device)
    named = list(model.named_parameters())
    if lora:
        method = LoRA(r=8, alpha=16)
        method.attach(model)
        if dtype == "bfloat16":
            store_frozen_linears(model, torch.bfloat16)
        named = method.trainable(model)
    opt = build_optimizer(named, tcfg, d.device)
    params = [p for _, p in named]
    scaler = torch.amp.GradScaler(d.device.type, enabled=False)
    forward = torch.compile(model, mode=compile_mode) if compile_mode else model
    kernel = contextlib.nullcontext() if attention == "auto" else sdpa_kernel(ATTENTION[attention])

    def step(i: int) -> None:
        rows = data[i % len(data)]  # (B, T+1)
        with kernel:
            train_step(forward, model, opt, scaler, params, tcfg, d, lambda _: (rows[:, :-1], rows[:, 1:]))
    return step


def hf_model(cfg: ModelConfig, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' model of the shape: GPT2LMHeadModel, or the family's own class."""
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if cfg.family in families.FAMILIES:
        ids = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
        config = AutoConfig.for_model(**families.config_to_hf(cfg, ids, cfg.family))
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    return GPT2LMHeadModel(GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                      n_positions=cfg.block_size, vocab_size=cfg.vocab_size, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)).to(dtype)


def hf_step(cfg: ModelConfig, data: torch.Tensor, dtype: str, lora: bool = False) -> Callable[[int], None]:
    """The usual Hugging Face loop: the model, torch.optim.AdamW, clipping; with `lora`, peft's LoRA on a model
    loaded in bf16, as its users load it."""
    base_dtype = torch.bfloat16 if lora and dtype == "bfloat16" else torch.float32
    model = hf_model(cfg, base_dtype).to(data.device).train()
    if lora:
        import peft

        targets = ["c_attn", "c_proj", "c_fc"] if cfg.pos == "learned" else \
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                           target_modules=targets,
                                                           fan_in_fan_out=cfg.pos == "learned"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1)

    def step(i: int) -> None:
        x = data[i % len(data), :, :-1]  # transformers shifts the labels itself
        with torch.autocast(data.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="quickstart,gpt2")
    parser.add_argument("--method", default="full", choices=["full", "lora"])
    parser.add_argument("--context", type=int, default=256, help="sequence length of a family preset's shape")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--compile", action="store_true", help="also time gptlab with train.compile")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="override the shape's batch size")
    parser.add_argument("--only-compiled", action="store_true", help="skip gptlab's eager variant")
    parser.add_argument("--compile-mode", default="default", help="torch.compile's mode for the compiled variant "
                        "(default, max-autotune-no-cudagraphs, max-autotune, reduce-overhead)")
    parser.add_argument("--loss-chunks", default="default", help="gptlab variants with train.loss_chunk set to each "
                        "value (0: the unfused output layer and loss; default: the loop's default for the device)")
    parser.add_argument("--attention", default="auto", choices=["auto", *ATTENTION],
                        help="the attention kernel gptlab's step may use (auto: PyTorch's choice)")
    parser.add_argument("--no-transformers", action="store_true", help="time gptlab's variants only")
    parser.add_argument("--system-malloc", action="store_true", help="leave glibc's allocator as it is (gptlab's "
                        "loop sets it up for tensors on the CPU, gptlab/allocator.py; here it serves both libraries)")
    args = parser.parse_args()
    tuned = args.device == "cpu" and not args.system_malloc and tune_for_tensors()

    import transformers

    transformers.logging.set_verbosity_error()
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"{'allocator set up for tensors' if tuned else 'allocator as it is'}")
    print(f"| shape | variant | tokens/s | ratio to {'the first row' if args.no_transformers else 'transformers'} |")
    print("|---|---|---:|---:|")
    for shape in args.shapes.split(","):
        cfg, batch = SHAPES[shape] if shape in SHAPES else (ModelConfig.from_preset(shape, block_size=args.context), 1)
        batch = args.batch or batch
        lora = args.method == "lora"
        T, V = cfg.block_size, cfg.vocab_size  # noqa: N806
        g = torch.Generator().manual_seed(0)
        data = torch.randint(0, V, (args.steps * 4, batch, T + 1), generator=g).to(args.device)
        variants = {}
        for dtype in args.dtypes.split(","):
            if not args.no_transformers:
                variants[f"transformers {dtype}"] = hf_step(cfg, data, dtype, lora)
            for chunk in [None if c == "default" else int(c) for c in args.loss_chunks.split(",")]:
                suffix = ("" if chunk is None else f" loss-chunk {chunk}" if chunk else " unfused loss") + \
                    (f" {args.attention} attention" if args.attention != "auto" else "")
                if not args.only_compiled:
                    variants[f"gptlab {dtype}{suffix}"] = gptlab_step(cfg, batch, data, dtype, None, chunk,
                                                                      args.attention, lora)
                if args.compile:
                    mode = "" if args.compile_mode == "default" else f" {args.compile_mode}"
                    variants[f"gptlab {dtype} compiled{mode}{suffix}"] = gptlab_step(
                        cfg, batch, data, dtype, args.compile_mode, chunk, args.attention, lora)
        for fn in variants.values():  # warm-up (and compile)
            for i in range(args.warmup):
                fn(i)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                sync(args.device)
                t0 = time.perf_counter()
                for i in range(args.steps):
                    fn(i)
                sync(args.device)
                times[name].append((time.perf_counter() - t0) / args.steps)
                print(f"# {shape} {name}: {times[name][-1]:.3f} s/step", flush=True)
        tps = {k: batch * T / statistics.median(v) for k, v in times.items()}
        base = next(iter(tps.values()))  # transformers in the first dtype, or gptlab's first variant
        peak = peak_flops(torch.device(args.device))
        flops = flops_per_token(cfg, build_on_meta(cfg).num_params())
        for name, value in tps.items():
            mfu = f" (MFU {value * flops / peak:.1%} of {peak / 1e12:.0f} TFLOP/s)" if peak else ""
            print(f"| {shape} | {name} | {value:,.0f}{mfu} | {value / base:.2f}x |")


if __name__ == "__main__":
    main()

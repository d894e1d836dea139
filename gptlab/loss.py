"""The output layer and the cross-entropy loss fused, a chunk of tokens at a time.

With GPT-2's 50K vocabulary the (tokens x vocab) logits are the largest tensor of a training step: 3.3 GB in bf16 for
32 x 1024 tokens, written by the output layer, read back as float32 by the softmax, its gradient written and read again
by the two backward products. Here each chunk's logits live only while that chunk's loss and gradients are computed:
the forward already computes the gradients of the input and the weight (the softmax minus the one-hot target, times
the weight and the input), and the backward only scales them by the incoming gradient. No product is computed twice
(unlike recomputing each chunk in backward), and the logits never exist whole. The approach of Liger Kernel's fused
linear cross-entropy (Hsu et al. 2024), written in plain PyTorch.
"""

from __future__ import annotations

import math

import torch

VOCAB_SLICE = 8192  # rows of the weight's gradient per product
# train.loss_chunk's default on the CPU, where the fused loss is the faster one (GPT-2 124M, bf16, batch 4 x 256:
# steps 1.13x eager, 1.09x compiled; 1.08x eager with gptlab/allocator.py; BENCHMARKS.md); on a GPU the default
# stays the unfused loss until measured there
CPU_CHUNK = 1024


def default_chunk(device: torch.device) -> int:
    """train.loss_chunk when it is not set: tokens per chunk on `device`, 0 for the unfused loss."""
    return CPU_CHUNK if device.type == "cpu" else 0


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `h @ weight.T` against `targets`, with targets equal to `ignore_index` not counted."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                dtype: torch.dtype, ignore_index: int) -> torch.Tensor:
        # h (N, C) hidden states, weight (V, C) output layer, targets (N,); products in `dtype`, softmax in float32
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(dtype)  # (V, C)
        valid_all = targets != ignore_index  # (N,)
        inv_count = 1.0 / valid_all.sum().clamp(min=1).float()  # the mean's denominator, a tensor: no device sync
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None  # (N, C)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None  # (V, C)
        amp = 256.0 if dtype == torch.float16 else 1.0
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.size(0), chunk):
                part = slice(start, start + chunk)
                hc, valid = h[part].to(dtype), valid_all[part]  # (n, C), (n,)
                tc = targets[part].masked_fill(~valid, 0)[:, None]  # (n, 1): ignored rows point anywhere
                logits = hc @ w.T  # (n, V)
                x_max, i_max = logits.max(dim=-1, keepdim=True)  # (n, 1)
                x_t = logits.gather(1, tc).float()  # (n, 1): the targets' logits
                p = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (n, V): one pass, float32 inside
                del logits
                lse = x_max.float() - p.gather(1, i_max).log()  # (n, 1): p at the max is >= 1/V, never 0
                total += ((lse - x_t)[:, 0] * valid).sum()
                if not (need_h or need_w):
                    continue
                # d(mean loss)/d(logits) = (softmax - one_hot(target)) / count on counted rows, 0 on ignored ones.
                # The (n, V) part is taken as it is (times `amp`, a power of two that keeps fp16's small
                # probabilities out of its subnormals); the mask and powers of two go on the (n, C) side of each
                # product, and 1/count onto the float32 results (the weight's in backward): no (n, V) pass of its
                # own, every scaling exact
                g = p.scatter_add_(1, tc, torch.full_like(x_t, -1.0))  # (n, V)
                g = (g.mul_(amp) if amp != 1 else g).to(dtype)
                del p
                if need_h:
                    grad_h[part] = (g @ w).float() * (valid[:, None] * (inv_count / amp))  # (n, C)
                if need_w:  # (V, C), a slice of the vocabulary at a time: each bf16 product is small
                    shrink = 2.0 ** -math.ceil(math.log2(hc.size(0)))  # sums of n rows stay in fp16's range
                    hs = hc * (valid[:, None] * shrink).to(dtype)  # (n, C)
                    for v in range(0, grad_w.size(0), VOCAB_SLICE):
                        grad_w[v:v + VOCAB_SLICE].add_(g[:, v:v + VOCAB_SLICE].T @ hs, alpha=1 / (shrink * amp))
        # kept on ctx, not save_for_backward: backward hands them over and drops them, so that the weight's gradient
        # becomes `weight.grad` as it is (a tensor still saved in the graph would be copied there)
        ctx.grads, ctx.weight_dtype, ctx.inv_count = [grad_h, grad_w], weight.dtype, inv_count
        return total * inv_count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("the fused output layer and loss (train.loss_chunk) cannot run backward twice")
        (grad_h, grad_w), ctx.grads = ctx.grads, None
        # scaled in place (the weight's gradient is as large as the weight: a scaled copy would double it)
        dh = grad_h.mul_(grad_out.to(grad_h.dtype)) if grad_h is not None else None
        # the weight's gradient gets its 1/count here, with the incoming gradient: one pass over it, not two
        dw = grad_w.mul_(grad_out * ctx.inv_count).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                         ignore_index: int = -100) -> torch.Tensor:
    """The mean cross-entropy of `h` (..., C) through the output layer `weight` (V, C) against `targets` (...),
    `chunk` tokens at a time; under autocast the products run in its dtype, as `F.linear` would."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return LinearCrossEntropy.apply(h.reshape(-1, h.size(-1)), weight, targets.reshape(-1), chunk, dtype,
                                    ignore_index)

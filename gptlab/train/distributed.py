"""One process or many under `torchrun`: DDP (gloo on CPU, NCCL on GPU) or FSDP2 (`fully_shard`).

Only rank 0 writes files and prints. Every rank computes the same global batch's slice, so a run's losses do not
depend on how many processes share it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from gptlab.errors import GptlabError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(device: str | None) -> Dist:
    """Join the process group that torchrun describes in the environment, if any, and pick this rank's device."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)


def wrap(model: nn.Module, d: Dist, strategy: str) -> nn.Module:
    """DDP, or FSDP2 with each block sharded on its own and then the whole model."""
    if not d.active:
        return model
    if strategy == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise GptlabError("train.distributed fsdp needs PyTorch 2.6 or newer (fully_shard)") from None
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean of a scalar over ranks."""
    if d.active:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= d.world
    return value


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def teardown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()

"""Data-parallel training with torch.distributed: torchrun-compatible setup and small helpers.

A process started by torchrun (or any launcher that sets WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT) joins the process group with env:// initialisation; otherwise
everything runs in one process and the helpers are no-ops. The models hand their parameters to
`odegrad.solve` explicitly, so every gradient method's parameter gradients arrive in `.grad`
through autograd and DistributedDataParallel all-reduces them as usual.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["Context", "setup", "shutdown", "wrap", "sampler", "all_reduce_sum", "unwrap",
           "resolve_device"]


@dataclass
class Context:
    """Where this process stands: its rank among world_size processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" (CUDA when available), "cpu", "cuda" (cuda:LOCAL_RANK under torchrun), "cuda:N"."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device cuda:{index} requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise ValueError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def setup(device: str = "auto", backend: str | None = None) -> Context:
    """Join the process group when WORLD_SIZE > 1 (env:// init), and pick this rank's device.

    The backend defaults to NCCL on CUDA and gloo on the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if resolved.type == "cuda" else "gloo")
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size)
    return Context(rank, world_size, local_rank, resolved)


def shutdown(context: Context) -> None:
    """Leave the process group (a no-op for a single process)."""
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, context: Context) -> nn.Module:
    """DistributedDataParallel around `model` when distributed (it broadcasts rank 0's weights)."""
    if not context.distributed:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def sampler(
    dataset: Dataset, context: Context, shuffle: bool = True, seed: int = 0
) -> DistributedSampler | None:
    """This rank's shard of `dataset` (None for one process: the DataLoader shuffles itself).

    Call `set_epoch(epoch)` on it every epoch so that the shuffles differ between epochs.
    """
    if not context.distributed:
        return None
    return DistributedSampler(
        dataset, num_replicas=context.world_size, rank=context.rank, shuffle=shuffle, seed=seed,
        drop_last=True,
    )


def all_reduce_sum(values: Tensor, context: Context) -> Tensor:
    """The sum of `values` over all ranks (the tensor itself for one process)."""
    if context.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values

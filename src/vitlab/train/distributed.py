"""Data-parallel training across processes started by torchrun (gloo on CPU, NCCL on CUDA).

Each process holds a full model replica and a shard of every global batch (see `vitlab.data` for the order);
DistributedDataParallel averages the gradients, so N processes with batch b take the same steps as one process
with batch N * b.

Every tensor collective of the loop goes through `all_reduce_sum` / `broadcast`, which run it on the process
group's device (`group_device`): NCCL takes only CUDA tensors, so an accumulator kept on the CPU is copied to the
GPU and back there. Objects (a run directory's name, every rank's random state) travel with `broadcast_object` and
`all_gather_objects`, which torch places itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    joined: bool = False  # in a process group (torchrun, one process included): collectives run

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.joined or self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE set, even to 1: a one-process NCCL run then
    exercises the collectives as N processes do), else a single-process DistInfo."""
    if "WORLD_SIZE" not in os.environ:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        joined=True,
    )


def group_device() -> torch.device:
    """The device the process group's collectives take tensors on: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on_group_device(collective: Callable[..., Any], t: torch.Tensor, info: DistInfo, **kwargs: Any) -> torch.Tensor:
    """Run an in-place ``collective`` on ``t`` where the process group wants it, and leave the result in ``t``."""
    if not info.enabled:
        return t
    moved = t.to(group_device())
    collective(moved, **kwargs)
    if moved is not t:
        t.copy_(moved)
    return t


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """``t`` summed over the processes, in place (and returned)."""
    return _on_group_device(dist.all_reduce, t, info, op=dist.ReduceOp.SUM)


def broadcast(t: torch.Tensor, info: DistInfo, *, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``t`` on every process, in place (and returned)."""
    return _on_group_device(dist.broadcast, t, info, src=src)


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` (picklable) on every process."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order, on every process."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first(info: DistInfo) -> Iterator[None]:
    """Rank 0 runs the block first (a download, an archive unpacked); the others run it after, reading what it
    wrote. Rank 0 reaches the barrier even when the block fails: the others then meet the error themselves."""
    if not info.is_main:
        barrier(info)
        yield
        return
    try:
        yield
    finally:
        barrier(info)

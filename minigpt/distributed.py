"""The one module that owns torchrun: rank, world size, device and the process group.

A plain `python -m minigpt.train` (no launcher) is a world of one and starts no process group.
Under `torchrun --nproc_per_node N`, RANK / LOCAL_RANK / WORLD_SIZE come from the environment and
the group uses NCCL on CUDA and gloo on CPU. Nothing happens at import time.
"""

from __future__ import annotations

import gc
import os
import platform
from dataclasses import dataclass

import torch
import torch.distributed as dist

from minigpt.errors import UserError


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto": this rank's CUDA device when CUDA is present, else the CPU."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"train.device = {name!r} is not a device name; use 'auto', 'cpu' or 'cuda'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"train.device = {name!r} but CUDA is not available here; use 'auto' or 'cpu'")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def device_name(device: torch.device) -> str:
    """The device's name as its datasheet would give it: the GPU's, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def init_distributed(device_name: str = "auto") -> DistEnv:
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistEnv(rank, local_rank, world_size, device)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_mean(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= env.world_size
    return t


def all_gather_objects(obj, env: DistEnv) -> list:
    """Every rank's `obj`, in rank order, on every rank (a world of one: [obj])."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def on_main_first(env: DistEnv, fn):
    """Run fn on rank 0, then on the other ranks (which then find its work done, e.g. a cache).

    A UserError on rank 0 is raised on every rank, so no rank waits forever at a barrier.
    """
    if not env.distributed:
        return fn()
    error = [None]
    result = None
    if env.is_main:
        try:
            result = fn()
        except UserError as e:
            error[0] = str(e)
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise UserError(error[0])
    return result if env.is_main else fn()


def shutdown(env: DistEnv, together: bool = True) -> None:
    """Leave the process group: free what still holds it, meet the other ranks, then destroy it.

    A DistributedDataParallel wrapper sits in a reference cycle, so it (and the gloo group it holds)
    would otherwise be freed during interpreter shutdown, where gloo aborts now and then
    ("terminate called without an active exception", SIGABRT) after a run that completed. Collecting
    it here, while the interpreter is whole, avoids that. `together=False` skips the barrier, for a
    rank leaving on an error its peers may not share.
    """
    if env.distributed and dist.is_initialized():
        gc.collect()
        if together:
            dist.barrier()
        dist.destroy_process_group()

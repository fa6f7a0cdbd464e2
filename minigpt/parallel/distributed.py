"""The one module that owns torchrun: rank, world size, device, the process group, and the
process-level events a run must agree on across ranks: stop signals and a wall-clock budget.

A plain `minigpt train` (no launcher) is a world of one and starts no process group. Under
`torchrun --nproc_per_node N`, RANK / LOCAL_RANK / WORLD_SIZE come from the environment and the
group uses NCCL on CUDA and gloo on CPU, with a timeout (train.dist_timeout_s) so that a hung rank
becomes an error naming it rather than a hang. Nothing happens at import time.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from minigpt.core.device import resolve_device
from minigpt.core.errors import UserError, os_error
from minigpt.core.plan import ParallelPlan
from minigpt.nn.torch_private import attempt_store, default_store


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    control: object = field(default=None, repr=False)  # host-side (gloo) group for stop agreement
    timeout_s: float = 600.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    control = None
    if world_size > 1:
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            timeout = timedelta(seconds=timeout_s)
            store = attempt_store(rank, world_size, timeout)  # a restarted attempt sees only its own keys
            dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None,
                                    timeout=timeout, store=store, rank=rank if store else -1,
                                    world_size=world_size if store else -1)
        # stop agreement runs every step: on the host (gloo), so a GPU step never waits for it
        control = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    return DistEnv(rank, local_rank, world_size, device, control, timeout_s)


def make_mesh(plan: ParallelPlan, device_type: str) -> DeviceMesh:
    """The plan's device mesh over every rank ("pp", "dp_replicate", "dp_shard", "tp"; tp innermost).
    A single process gets a process group of one first (FSDP2 and DTensor need one)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return init_device_mesh(device_type, plan.mesh_shape, mesh_dim_names=plan.mesh_names)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_mean(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= env.world_size
    return t


def broadcast_object(obj, env: DistEnv):
    """Rank 0's picklable object on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean_flat(grads: list[torch.Tensor], group, count: int) -> None:
    """The mean of `grads` over a group of `count` replicas, in place, as one flat bucket (one collective
    instead of one per tensor; a DTensor contributes its local shard, which the replicas hold alike)."""
    from torch.distributed.tensor import DTensor

    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    if not local:
        return
    flat = torch.cat([g.reshape(-1) for g in local])
    dist.all_reduce(flat, group=group)
    flat /= count
    for g, part in zip(local, flat.split([g.numel() for g in local])):
        g.copy_(part.view_as(g))


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


def on_main(env: DistEnv, fn):
    """Run fn on rank 0 alone; its UserError (or OSError the user can fix) is raised on every rank,
    so no rank waits forever for it. Returns fn's result on rank 0, None elsewhere."""
    error, result = [None], None
    if env.is_main:
        try:
            result = fn()
        except UserError as e:
            error[0] = str(e)
        except OSError as e:
            if os_error(e) is None:
                raise
            error[0] = str(os_error(e))
    if env.distributed:
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise UserError(error[0])
    return result


def shutdown(env: DistEnv, together: bool = True) -> None:
    """Leave the process group: free what still holds it, meet the other ranks, then destroy it.

    A DistributedDataParallel wrapper sits in a reference cycle, so it (and the gloo group it holds)
    would otherwise be freed during interpreter shutdown, where gloo aborts now and then
    ("terminate called without an active exception", SIGABRT) after a run that completed. Collecting
    it here, while the interpreter is whole, avoids that. `together=False` skips the barrier, for a
    rank leaving on an error its peers may not share. A single process's group of one (make_mesh's) goes
    too.
    """
    if not dist.is_initialized():
        return
    gc.collect()
    if together and env.distributed:
        dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# stopping together


STOP_CODES = {"SIGTERM": 3, "SIGINT": 2, "max_minutes": 1}  # when ranks disagree, the highest wins


class StopSignal(BaseException):
    """SIGTERM or SIGINT before the training loop began: the start is abandoned, nothing written."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class StopControl:
    """A graceful stop: in the training loop, the first SIGTERM or SIGINT lets the current step
    finish, the run saves a checkpoint and ends; a second one exits at once (the last complete
    checkpoint stays, since checkpoints commit atomically). Before the loop (data preparation,
    model setup) a signal interrupts at once with StopSignal, and the start cleans up after
    itself. train.max_minutes stops the loop the same way on a wall-clock budget.

    `requested()` is called after every step; under torchrun it is collective (a max all-reduce
    of one integer on the host-side control group), so every rank stops after the same step and
    the checkpoint is consistent. Use as a context manager: handlers are installed in the main
    thread for the loop and restored after.
    """

    def __init__(self, env: DistEnv, max_minutes: float = 0.0) -> None:
        self.env, self.signal, self.graceful = env, None, False
        self.deadline = time.monotonic() + 60 * max_minutes if max_minutes else None
        self.previous: dict = {}

    def __enter__(self) -> "StopControl":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not self.graceful:
            raise StopSignal(name)
        if self.signal is not None:
            sys.stderr.write(f"second {name}: exiting now; the last complete checkpoint is intact\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signal = name
        if self.env.is_main:
            sys.stderr.write(f"{name} received: finishing this step and saving a checkpoint "
                             f"(send it again to exit at once)\n")
            sys.stderr.flush()

    def requested(self) -> str | None:
        """Why the run stops after this step ("SIGTERM", "SIGINT", "max_minutes"), agreed by all ranks."""
        local = self.signal or ("max_minutes" if self.deadline and time.monotonic() > self.deadline else None)
        if not self.env.distributed:
            return local
        code = torch.tensor([STOP_CODES.get(local, 0)], dtype=torch.int32)
        dist.all_reduce(code, op=dist.ReduceOp.MAX, group=self.env.control)
        return {v: k for k, v in STOP_CODES.items()}.get(int(code.item()))


# ----------------------------------------------------------------------------------------------
# a rank that stops answering


def heartbeat(env: DistEnv, step: int) -> None:
    """Record this rank's last completed step in torchrun's store (host-side, no device sync)."""
    if env.distributed:
        default_store().set(f"minigpt/step/{env.rank}", str(step))


COMMUNICATION_FAILURES = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")


def silent_ranks_error(env: DistEnv, error: BaseException) -> UserError | None:
    """For a collective that timed out or lost its peer: which ranks stopped answering.

    Every rank that is still alive marks itself in the store; after a short grace the ranks left
    unmarked are the silent ones, named with their last completed step. None when `error` is not
    a communication failure (then it is a bug and keeps its traceback).
    """
    text = str(error).lower()
    if not env.distributed or not any(w in text for w in COMMUNICATION_FAILURES):
        return None
    try:
        store = default_store()
        store.set(f"minigpt/alive/{env.rank}", "1")
        time.sleep(2.0)
        silent = [r for r in range(env.world_size) if not store.check([f"minigpt/alive/{r}"])]
        steps = {r: (store.get(f"minigpt/step/{r}").decode() if store.check([f"minigpt/step/{r}"]) else "none")
                 for r in silent}
    except (RuntimeError, OSError):  # the store lives in the torchrun agent: it is gone too
        return RankError(f"rank {env.rank}: the torchrun launcher (its rendezvous store) stopped answering: it was "
                         f"killed or its machine went down; this rank stops, the last complete checkpoint is intact: "
                         f"start the job again with --resume")
    who = ", ".join(f"rank {r} (last completed step {steps[r]})" for r in silent) or "another rank"
    return RankError(f"rank {env.rank}: {who} stopped answering: a collective waited train.dist_timeout_s = "
                     f"{env.timeout_s:g} s or its connection closed; the rank hung or died (check it; "
                     f"torchrun --max-restarts with train.auto_resume=true resumes from the last checkpoint)")


class RankError(UserError):
    """A UserError that every rank reports (others are printed by rank 0 alone)."""

"""The pipeline bubble, measured on real ranks beside its formula.

Each rank runs the package's pipeline (parallelize() + PipelineBackend: the torch.distributed.pipelining
schedule training uses) at each micro-batch count m, timing the schedule's forward and backward of the
step's micro-batches (not the optimizer update) between barriers. Then, with every rank doing the same at once (the same contention), it times its
own chunks' forward and backward alone, m micro-batches with no pipeline and no communication: the
rank's busy time. Idle fraction of a rank = 1 - busy / step. Beside it the formula (p-1)/(v m + p-1)
(GPipe and 1F1B with v = 1; interleaved 1F1B with v chunks per rank; Narayanan et al. 2021). The
measured idle time also holds what the formula leaves out: point-to-point sends, the schedule's own
overhead and unequal stages (the last one also runs the head and loss).
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from minigpt.core.config import Config, ModelConfig, TrainConfig
from minigpt.core.plan import ParallelPlan
from minigpt.nn.model import GPT
from minigpt.parallel.distributed import DistEnv
from minigpt.parallel.parallelize import parallelize
from minigpt.parallel.pipeline import PipelineBackend, schedule_problem


def _batches(c: ModelConfig, micro: int, m: int) -> list:
    t = torch.randint(0, c.vocab_size, (m * micro, c.block_size + 1), generator=torch.Generator().manual_seed(0))
    return [(x[:, :-1].contiguous(), x[:, 1:].contiguous()) for x in t.split(micro)]


def _timed(fn, steps: int) -> float:
    """Median seconds of `fn` over `steps` runs, each between barriers (every rank starts together)."""
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _busy(backend: PipelineBackend, c: ModelConfig, micro: int, m: int) -> None:
    """This rank's chunks, forward and backward of m micro-batches, alone (no schedule, no sends)."""
    for chunk in backend.model.stages:
        for _ in range(m):
            x = torch.randint(0, c.vocab_size, (micro, c.block_size)) if chunk.first else \
                torch.randn(micro, c.block_size, c.n_embd, requires_grad=True)
            out = chunk(x)
            if chunk.last:
                F.cross_entropy(out.flatten(0, 1), torch.zeros(out.shape[0] * out.shape[1], dtype=torch.long)).backward()
            else:
                out.backward(torch.ones_like(out))
    backend.optimizer.zero_grad(set_to_none=True)


def _schedule(backend: PipelineBackend, batches: list) -> None:
    """The schedule's forward and backward of every micro-batch, as PipelineBackend.step runs it, without
    the optimizer step (not part of the pipeline)."""
    backend.run_schedule(batches)
    backend.optimizer.zero_grad(set_to_none=True)


def measure(c: ModelConfig, schedule: str, m: int, micro: int, steps: int, env: DistEnv) -> dict:
    """One schedule at one m: this rank's median step, busy time and idle fraction, beside the formula."""
    plan = ParallelPlan(pp=env.world_size, schedule=schedule)
    tc = TrainConfig(precision="fp32", compile=False, micro_batch_size=micro,
                     batch_size_tokens=m * micro * c.block_size, lr=1e-4)
    cfg = Config(model=c, train=tc)
    torch.manual_seed(0)
    backend = PipelineBackend(parallelize(GPT(c), plan, tc, env.device), cfg, env, plan)
    batches = _batches(c, micro, m)
    backend.step(batches)  # warm-up: the schedule's buffers, the allocator
    step = _timed(lambda: _schedule(backend, batches), steps)
    busy = _timed(lambda: _busy(backend, c, micro, m), steps)
    return {"schedule": schedule, "m": m, "rank": env.rank, "step_s": step, "busy_s": busy,
            "idle_fraction": max(0.0, 1 - busy / step), "formula": plan.bubble_formula(m),
            "stages_per_rank": plan.stages_per_rank}


def run_rank(rank: int, world: int, port: int, c: ModelConfig, schedules: list[str], ms: list[int], micro: int,
             steps: int, results) -> None:
    """One rank of the benchmark (torch.multiprocessing.spawn): gloo on this machine, one thread."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    env = DistEnv(rank, rank, world, torch.device("cpu"))
    rows = [measure(c, s, m, micro, steps, env) for s in schedules for m in ms
            if schedule_problem(ParallelPlan(pp=world, schedule=s), m) is None]
    results.put(rows)
    dist.destroy_process_group()

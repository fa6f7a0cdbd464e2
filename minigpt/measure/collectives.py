"""Collective bandwidth of this machine's process group, as nccl-tests reports it.

`minigpt bench hardware --collectives` under torchrun times all-reduce, all-gather and reduce-scatter
over buffer sizes on every rank (NCCL on GPUs, gloo on CPUs) and reports each as nccl-tests does:
size = the whole buffer (all-reduce: its input; all-gather: the gathered output; reduce-scatter: the
input before scattering), algorithm bandwidth = size / time, bus bandwidth = algbw x 2 (n-1)/n for
all-reduce, x (n-1)/n for the other two: the rate each rank's link carries a ring's bytes, the unit the
step-time model's link rates are in (`steptime.measured_rates` reads the largest buffer's all-reduce).
Time: the mean of back-to-back calls after a warm-up, the slowest rank's.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from minigpt.core.progress import Progress
from minigpt.parallel.distributed import DistEnv

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")
SIZES = {"cuda": tuple(1 << p for p in range(20, 31, 2)), "cpu": tuple(1 << p for p in range(12, 23, 2))}  # bytes


def bus_factor(op: str, n: int) -> float:
    return (2 if op == "all_reduce" else 1) * (n - 1) / n


def _call(op: str, n: int, numel: int, dtype: torch.dtype, device: torch.device):
    """The collective on buffers of `numel` elements in all (the nccl-tests size), as a callable."""
    full = torch.ones(numel, dtype=dtype, device=device)
    part = torch.ones(numel // n, dtype=dtype, device=device)
    if op == "all_reduce":
        return lambda: dist.all_reduce(full)
    if op == "all_gather":
        return lambda: dist.all_gather_single(full, part)
    return lambda: dist.reduce_scatter_single(part, full)


def _seconds(fn, env: DistEnv, repeats: int) -> float:
    for _ in range(2):
        fn()
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    slowest = torch.tensor([(time.perf_counter() - t0) / repeats], dtype=torch.float64, device=env.device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest.item())


def collective_sweep(env: DistEnv, sizes: tuple[int, ...] | None = None, repeats: int = 10) -> dict:
    """Every collective at every size on the process group of `env` (which must hold 2 ranks or more)."""
    n, dev = env.world_size, env.device
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    sizes = sizes or SIZES["cuda" if dev.type == "cuda" else "cpu"]
    el = torch.tensor([], dtype=dtype).element_size()
    rows = []
    with Progress(len(COLLECTIVES) * len(sizes), "collective sweep", "measurements", enabled=env.is_main) as progress:
        for op in COLLECTIVES:
            for size in sizes:
                numel = max(n, size // el // n * n)
                t = _seconds(_call(op, n, numel, dtype, dev), env, repeats)
                algbw = numel * el / t / 1e9
                rows.append({"op": op, "bytes": numel * el, "time_s": t, "algbw_gbs": round(algbw, 3),
                             "busbw_gbs": round(algbw * bus_factor(op, n), 3)})
                progress.update()
    return {"world_size": n, "backend": dist.get_backend(), "dtype": str(dtype).removeprefix("torch."),
            "results": rows,
            "convention": (f"nccl-tests: size = the whole buffer, algbw = size / time, busbw = algbw x 2(n-1)/n "
                           f"(all_reduce) or (n-1)/n (all_gather, reduce_scatter); time = mean of {repeats} "
                           f"back-to-back calls after 2 warm-ups, the slowest of the {n} ranks")}


def bench_collectives(device: str, repeats: int = 10) -> dict | None:
    """`bench hardware --collectives` on every rank of a torchrun job: the sweep, with the device and its
    datasheet links; the record on the main rank, None on the others."""
    from minigpt.core.device import device_name
    from minigpt.core.hardware import match_device
    from minigpt.parallel.distributed import init_distributed, shutdown

    env = init_distributed(device)
    name = device_name(env.device)
    spec = match_device(name) if env.device.type == "cuda" else None
    hw = {"bench": "hardware", "device": str(env.device), "device_name": name, "torch": torch.__version__,
          "datasheet": {"name": spec.name, "nvlink_gbs": spec.nvlink_gbs} if spec else None,
          "collectives": collective_sweep(env, repeats=repeats)}
    shutdown(env)
    return hw if env.is_main else None

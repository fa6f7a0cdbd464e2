"""Measure this device: achievable matmul FLOP/s per dtype and memory bandwidth.

The result (JSON) can be given as the peak for MFU (`train.peak_from` / `--peak-from`), which is
the only honest peak on a CPU, and an informative second one on a GPU beside its datasheet.
"""

from __future__ import annotations

import os
import platform
import time

import torch

from minigpt.distributed import resolve_device
from minigpt.hardware import match_device
from minigpt.optim import DTYPES


def device_name(device: torch.device) -> str:
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """The fastest of `repeats` timed calls: a peak is what the device can reach, and slower
    repeats are mostly interference on a shared machine."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = _best_time(lambda: torch.mm(a, b), device, repeats)
    return 2 * n**3 / t / 1e12


def copy_bandwidth_gbs(device: torch.device, nbytes: int, repeats: int) -> float:
    """Device memory bandwidth of a large copy: bytes read + bytes written per second."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    t = _best_time(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / t / 1e9


def bench_hardware(device: str = "auto", size: int = 0, repeats: int = 0, dtypes: list[str] | None = None) -> dict:
    dev = resolve_device(device)
    gpu = dev.type == "cuda"
    n = size or (8192 if gpu else 2048)
    reps = repeats or (20 if gpu else 8)
    dtypes = dtypes or (["fp32", "bf16", "fp16"] if gpu else ["fp32", "bf16"])
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 figure is plain FP32, not TF32
    name = device_name(dev)
    spec = match_device(name) if gpu else None
    result = {
        "bench": "hardware",
        "device": str(dev),
        "device_name": name,
        "cpu_cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        # CPUs without 16-bit matmul units run bf16 ~100x slower: a smaller size keeps it short
        "matmul_size": {d: (n if gpu or d == "fp32" else min(n, 512)) for d in dtypes},
        "matmul_tflops": {d: round(matmul_tflops(dev, DTYPES[d], n if gpu or d == "fp32" else min(n, 512), reps), 4)
                          for d in dtypes},
        "copy_bandwidth_gbs": round(copy_bandwidth_gbs(dev, (1 << 30) if gpu else (256 << 20), reps), 1),
        "datasheet": {"name": spec.name, "tflops": spec.tflops, "bandwidth_tbs": spec.bandwidth_tbs} if spec else None,
        "convention": f"best of {reps} n x n x n matmuls (n: matmul_size), 2 n^3 FLOPs each; copy bandwidth (best of {reps}) counts read + write bytes",
    }
    if spec:
        result["fraction_of_datasheet"] = {
            d: round(v / spec.tflops[d], 3) for d, v in result["matmul_tflops"].items() if d in spec.tflops
        }
    return result

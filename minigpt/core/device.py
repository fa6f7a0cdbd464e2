"""Device probing in one place: which device a name means, what it is called on its datasheet, how much
memory it has free and has held, the precision "auto" picks, and the process-wide settings for training
on it. torch is imported inside the functions that need it, so this module imports without torch."""

from __future__ import annotations

import os
import platform
from typing import TYPE_CHECKING

from minigpt.core.config import TrainConfig
from minigpt.core.errors import UserError

if TYPE_CHECKING:
    import torch


def memory_bytes(device: torch.device) -> tuple[int | None, str]:
    """(bytes, what they are): peak CUDA memory allocated on a GPU; the resident set size of this
    process on CPU (Linux), the honest figure available there."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "peak alloc"
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"), "rss"
    except (OSError, ValueError, IndexError):
        return None, "n/a"


def peak_memory_bytes(device: torch.device) -> tuple[int | None, str]:
    """This process's peak so far: CUDA memory allocated, or the peak resident set size on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "peak CUDA memory allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak resident set size of the process"


def memory_note(device: torch.device) -> str:
    n, what = memory_bytes(device)
    return f"{n / 2**30:.2f} GiB {what}" if n is not None else "mem n/a"


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": bf16 on a CUDA device that supports it (Ampere and later), else fp32."""
    import torch

    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise UserError("train.precision = 'fp16' needs CUDA (its grad scaler); on CPU use 'bf16' or 'fp32'")
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def default_threads() -> tuple[int, str]:
    """How many CPU threads torch should use when nobody said: OMP_NUM_THREADS when set; otherwise the cores
    this process may run on, less those other processes keep busy right now (at least 1). Oversubscribed
    cores are the slow case: on 2 busy cores, 2 threads decoded 10-16x slower than 1."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    cores = usable_cores()
    others, how = busy_cores()
    busy = min(cores - 1, others)
    if busy <= 0:
        return cores, f"default: {cores} idle core(s)"
    return cores - busy, f"default: {cores} cores, {busy} busy ({how})"


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def busy_cores(samples: int = 7) -> tuple[int, str]:
    """Cores other processes are using now: the kernel's count of runnable tasks (/proc/loadavg, this
    process excluded), the median of a few samples 20 ms apart; the 1-minute load average elsewhere (it lags
    a minute behind: a machine that just went quiet still looks busy)."""
    import statistics
    import time

    counts = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            break
        time.sleep(0.02)
    if counts:
        return max(0, int(statistics.median(counts))), "runnable tasks now"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return int(load + 0.5), f"load average {load:.2f}"


def keep_freed_memory(most: int = 32 << 20) -> bool:
    """Keep memory a thread frees for its next tensors (glibc's malloc: blocks up to `most` bytes from the heap, never
    trimmed back to the system). In a process with threads glibc otherwise hands every large freed block back and the
    next step's tensors page-fault it in again: a serving step at 64 rows took 40 ms this way against 22 ms with the
    memory kept (808k against 77k page faults a load, one decode thread beside the HTTP threads). False where the C
    library is not glibc (nothing changed)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, most)) and bool(mallopt(m_trim_threshold, 1 << 30))


def host_speed_us(repeats: int = 300) -> float:
    """One core's speed now: the median microseconds of a one-thread fp32 matmul (256 x 384 by 384 x 1536), best of
    3. Beside a benchmark it shows a host slowed by its neighbours (other virtual machines on the same cores), which
    the runnable-task count of `busy_cores` cannot see."""
    import statistics
    import time

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, w = torch.randn(256, 384), torch.randn(1536, 384)
        tries = []
        for _ in range(3):
            times = []
            for _ in range(repeats // 3):
                t = time.perf_counter()
                torch.nn.functional.linear(a, w)
                times.append(time.perf_counter() - t)
            tries.append(statistics.median(times))
        return round(min(tries) * 1e6, 1)
    finally:
        torch.set_num_threads(threads)


def use_threads(threads: int = 0, why: str = "train.threads, set") -> str:
    """Set torch's intra-op threads: `threads` (a flag or train.threads, or `why` says where from) or the
    default rule; says which."""
    import torch

    n, why = (threads, why) if threads else default_threads()
    torch.set_num_threads(n)
    return f"{n} thread(s) ({why})"


def peak_threads(tc: TrainConfig) -> int:
    """The thread count a stored CPU peak (train.peak_from) was measured with, when nobody set one: MFU then
    divides by a peak of the same threads, whatever the load (the default rule would pick by it). 0: none
    usable, the default rule decides (and a mismatch is refused with the peak)."""
    from minigpt.core.hardware import read_bench

    if not tc.peak_from or os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return 0
    data = read_bench(tc.peak_from)
    threads = data.get("threads") if isinstance(data, dict) else None
    cores = usable_cores()
    ok = isinstance(threads, int) and not isinstance(threads, bool) and 1 <= threads <= cores
    return threads if ok else 0


def configure_device(tc: TrainConfig, device: torch.device) -> list[str]:
    """Process-wide settings for training on `device`; returns what was chosen, for the log."""
    import torch

    notes = []
    measured = peak_threads(tc) if device.type == "cpu" and not tc.threads else 0
    threads = (use_threads(measured, "the count train.peak_from's CPU peak was measured with") if measured
               else use_threads(tc.threads))
    if device.type == "cuda" and tc.precision == "fp32" and torch.cuda.get_device_capability(device)[0] >= 8:
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # fp32 matmuls on tensor cores (Ampere+)
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        notes.append("TF32 matmuls")
    if device.type == "cpu":
        notes.append(threads)
    return notes


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto": this rank's CUDA device when CUDA is present, else the CPU."""
    import torch

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
    import torch

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


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can get: free GPU memory, or the kernel's MemAvailable on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def check_fits(need: float, device, what: str, fix: str, headroom: float = 0.9) -> None:
    """Refuse, before allocating, work whose bytes exceed what `device` has free (`headroom` of it: by default
    90%, the allocator and the rest of the process need some): one line saying the bytes needed and
    available, and the fix."""
    import torch

    from minigpt.core.fmt import fmt_bytes

    device = device if isinstance(device, torch.device) else torch.device(device)
    if device.type == "meta":
        return
    have = available_memory_bytes(device)
    if have is not None and need > headroom * have:
        raise UserError(f"{what} needs at least {fmt_bytes(need)}; {device} has {fmt_bytes(have)} available: {fix}")

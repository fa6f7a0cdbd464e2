"""What a training run prints and records: a line per logged step, evaluation lines, metrics.jsonl.

This is the one place the training loop reads device values on the host (`.item()`), and only on
the steps that log: in between, the loss, the gradient norm and the count of skipped updates stay
on the device, so a GPU step never waits for the host. Times are averaged over the steps since
the last log (the `.item()` there waits for them), so they are right without a per-step sync.

Every record in metrics.jsonl has its kind ("step" or "eval") and a wall-clock timestamp
(`time`, seconds since the epoch).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from minigpt.distributed import DistEnv, all_reduce_mean
from minigpt.hardware import Peak
from minigpt.optim import StepResult


def memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB peak alloc"
    try:  # resident set size of this process (Linux), the honest figure available on CPU
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return f"{rss / 2**30:.2f} GiB rss"
    except (OSError, ValueError, IndexError):
        return "mem n/a"


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """Step and evaluation lines with throughput, MFU/HFU against a stated peak, memory and ETA."""

    def __init__(self, path: Path | None, env: DistEnv, say, *, tokens_per_step: int, flops_per_step: float,
                 hw_flops_per_step: float | None, peak: Peak, precision: str, log_every: int, start_step: int,
                 end_step: int) -> None:
        self.env, self.say, self.peak, self.precision = env, say, peak, precision
        self.tokens_per_step, self.flops, self.hw_flops = tokens_per_step, flops_per_step, hw_flops_per_step
        self.log_every, self.end_step = log_every, end_step
        self.file = open(path, "a") if (path is not None and env.is_main) else None
        self.window_ms: list[float] = []  # ms per step of every logged window after the first step
        self.first_ms: float | None = None
        self.skipped = torch.zeros((), dtype=torch.int32, device=env.device)
        self.skipped_logged = 0
        self.first = start_step
        self.restart_clock(start_step)

    def due(self, step: int) -> bool:
        """Steps that log: every log_every, the last, and the first of the run (which shows the
        one-off costs, compilation included, apart from the steady-state windows after it)."""
        return step % self.log_every == 0 or step == self.end_step or step == self.first + 1

    def restart_clock(self, step: int) -> None:
        """Start timing after `step` (after an evaluation, sample or checkpoint, which synced)."""
        self.t_last, self.step_last = time.perf_counter(), step

    def log_step(self, step: int, loss: torch.Tensor, result: StepResult, lr: float) -> dict | None:
        self.skipped += result.skipped
        if not self.due(step):
            return None
        value = all_reduce_mean(loss, self.env).item()  # waits for the step: the times below are real
        norm = result.grad_norm.float().item()
        dt = (time.perf_counter() - self.t_last) / (step - self.step_last)
        first = self.step_last == self.first
        if first:
            self.first_ms = dt * 1e3
        else:
            self.window_ms.append(dt * 1e3)
        tflops = self.flops / dt / self.env.world_size / 1e12  # per device
        record = {"kind": "step", "time": round(time.time(), 3), "step": step, "loss": round(value, 6), "lr": lr,
                  "grad_norm": round(norm, 6), "ms_per_step": round(dt * 1e3, 2),
                  "tokens_per_s": round(self.tokens_per_step / dt, 1), "tflops_per_device": round(tflops, 5)}
        util = "MFU n/a"
        if self.peak.known:
            record["mfu"] = tflops / self.peak.tflops
            util = f"{self.precision} MFU {record['mfu']:.1%}"
            if self.hw_flops:
                record["hfu"] = self.hw_flops / dt / self.env.world_size / 1e12 / self.peak.tflops
                util += f" HFU {record['hfu']:.1%}"
        recent = self.window_ms[-5:] or [dt * 1e3]
        eta = (self.end_step - step) * statistics.mean(recent) / 1e3
        note = " (first step: includes one-off setup and compilation)" if first else ""
        self.say(f"step {step:>6}/{self.end_step} | loss {value:.4f} | lr {lr:.2e} | grad norm {norm:.3f} | "
                 f"{dt * 1e3:7.1f} ms | {self.tokens_per_step / dt:9,.0f} tok/s | {tflops:.3g} TFLOP/s | {util} | "
                 f"{memory_note(self.env.device)} | ETA {format_duration(eta)}{note}")
        self._skipped_line(step)
        self._write(record)
        self.restart_clock(step)
        return record

    def log_eval(self, step: int, train_loss: float, val_loss: float, entropy: float) -> None:
        self.say(f"eval   step {step} | train loss {train_loss:.4f} | val loss {val_loss:.4f} | "
                 f"unigram entropy {entropy:.4f} nats")
        self._write({"kind": "eval", "time": round(time.time(), 3), "step": step, "train_loss": train_loss,
                     "val_loss": val_loss})

    @property
    def skipped_total(self) -> int:
        return int(self.skipped.item())

    @property
    def median_step_s(self) -> float | None:
        """Median over the logged windows after the first step (the first step alone if that is all)."""
        if self.window_ms:
            return statistics.median(self.window_ms) / 1e3
        return self.first_ms / 1e3 if self.first_ms is not None else None

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None

    def _skipped_line(self, step: int) -> None:
        total = self.skipped_total
        if total > self.skipped_logged:
            self.say(f"step {step}: {total - self.skipped_logged} update(s) skipped since the last log: fp16 "
                     f"gradients overflowed and the loss scale backed off ({total} in this run)")
            self.skipped_logged = total

    def _write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

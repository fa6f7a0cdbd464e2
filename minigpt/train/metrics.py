"""What a training run prints and records: a line per logged step, evaluation lines, metrics.jsonl.

This is the one place the training loop reads device values on the host (`.item()`), and only on
the steps that log: in between, the loss, the gradient norm and the count of skipped updates stay
on the device, so a GPU step never waits for the host. Times are averaged over the steps since
the last log (the `.item()` there waits for them), so they are right without a per-step sync.

Every record has its kind ("step" or "eval"), a wall-clock timestamp (`time`, seconds since the
epoch), the step and the tokens seen. It always goes to metrics.jsonl, and to the trackers named in
train.log_to: a CSV with a fixed header, TensorBoard event files (against steps and against tokens
seen), Weights & Biases (offline unless WANDB_MODE or WANDB_API_KEY say otherwise).
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import time
from pathlib import Path

import torch

from minigpt.core.device import memory_bytes, memory_note
from minigpt.core.errors import UserError
from minigpt.core.hardware import Peak, mfu_warning
from minigpt.nn.optim import StepResult
from minigpt.parallel.distributed import DistEnv, all_reduce_mean

# ----------------------------------------------------------------------------------------------
# where records go


CSV_FIELDS = ("kind", "time", "step", "tokens", "loss", "lr", "grad_norm", "ms_per_step", "tokens_per_s",
              "tflops_per_device", "mfu", "hfu", "memory_gib", "train_loss", "val_loss")
SCALARS = ("loss", "lr", "grad_norm", "ms_per_step", "tokens_per_s", "tflops_per_device", "mfu", "hfu", "memory_gib",
           "train_loss", "val_loss")


class JsonlSink:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.file = open(path, "a")
        except OSError as e:
            raise UserError(f"cannot append to {path}: {e.strerror}; free space or fix its permissions, then resume "
                            f"(the last checkpoint is intact)") from None

    def write(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:
            raise UserError(f"cannot append to {self.path}: {e.strerror}; free space, then resume (the last "
                            f"checkpoint is intact)") from None

    def close(self) -> None:
        self.file.close()


class CsvSink:
    """metrics.csv, one row per record, columns CSV_FIELDS (empty where a record has no value)."""

    def __init__(self, path: Path) -> None:
        new = not path.is_file() or path.stat().st_size == 0
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, CSV_FIELDS, extrasaction="ignore", restval="")
        if new:
            self.writer.writeheader()

    def write(self, record: dict) -> None:
        self.writer.writerow(record)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    """Event files in RUN/tensorboard: `{kind}/{name}` against steps, `{kind}_by_tokens/{name}`
    against tokens seen. A resumed run purges the events past its checkpoint."""

    def __init__(self, log_dir: Path, resumed_at: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("train.log_to has 'tensorboard' but the tensorboard package is not installed: "
                            "pip install tensorboard (or minigpt[tb])") from None
        self.writer = SummaryWriter(str(log_dir), purge_step=resumed_at)

    def write(self, record: dict) -> None:
        for name in SCALARS:
            value = record.get(name)
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"{record['kind']}/{name}", value, record["step"], walltime=record["time"])
                self.writer.add_scalar(f"{record['kind']}_by_tokens/{name}", value, record["tokens"],
                                       walltime=record["time"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, run_dir: Path, config: dict) -> None:
        try:
            import wandb
        except ImportError:
            raise UserError("train.log_to has 'wandb' but the wandb package is not installed: pip install wandb") from None
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project="minigpt", dir=str(run_dir), config=config, mode=mode, name=run_dir.name)

    def write(self, record: dict) -> None:
        self.run.log({f"{record['kind']}/{k}": v for k, v in record.items() if k in SCALARS}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def check_sinks(log_to: list[str]) -> None:
    """Fail before a run writes anything when a tracker it asks for is not installed."""
    needs = {"tensorboard": ("tensorboard", "pip install tensorboard (or minigpt[tb])"), "wandb": ("wandb", "pip install wandb")}
    for sink, (module, fix) in needs.items():
        if sink in log_to:
            try:
                __import__(module)
            except ImportError:
                raise UserError(f"train.log_to has {sink!r} but the {module} package is not installed: {fix}") from None


def make_sinks(log_to: list[str], run_dir: Path, resumed_at: int | None, config: dict) -> list:
    """The record sinks of train.log_to (metrics.jsonl always)."""
    sinks = [JsonlSink(run_dir / "metrics.jsonl")]
    if "csv" in log_to:
        sinks.append(CsvSink(run_dir / "metrics.csv"))
    if "tensorboard" in log_to:
        sinks.append(TensorBoardSink(run_dir / "tensorboard", resumed_at))
    if "wandb" in log_to:
        sinks.append(WandbSink(run_dir, config))
    return sinks


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """Step and evaluation lines with throughput, MFU/HFU against a stated peak, memory and ETA."""

    def __init__(self, sinks: list, env: DistEnv, say, *, tokens_per_step: int, flops_per_step: float,
                 hw_flops_per_step: float | None, peak: Peak, precision: str, log_every: int, start_step: int,
                 end_step: int) -> None:
        self.env, self.say, self.peak, self.precision = env, say, peak, precision
        self.tokens_per_step, self.flops, self.hw_flops = tokens_per_step, flops_per_step, hw_flops_per_step
        self.log_every, self.end_step = log_every, end_step
        self.sinks = sinks if env.is_main else []
        self.window_ms: list[float] = []  # ms per step of every logged window after the first step
        self.first_ms: float | None = None
        self.skipped = torch.zeros((), dtype=torch.int32, device=env.device)
        self.skipped_logged = 0
        self.first = start_step
        self.warned_mfu = False  # an MFU over 100% is said once
        self.restart_clock(start_step)

    def due(self, step: int) -> bool:
        """Steps that log: every log_every, the last, and the first of the run (which shows the
        one-off costs, compilation included, apart from the steady-state windows after it)."""
        return step % self.log_every == 0 or step == self.end_step or step == self.first + 1

    def restart_clock(self, step: int) -> None:
        """Start timing after `step` (after an evaluation, sample or checkpoint, which synced)."""
        self.t_last, self.step_last = time.perf_counter(), step

    def log_step(self, step: int, loss: torch.Tensor, result: StepResult, lr: float, routing=None,
                 extra: dict | None = None) -> dict | None:
        """routing: () -> a mixture's routing stats (nn/model.routing_stats) or None, read when the step is logged;
        extra: an objective's figures of the step (post-training: reward, KL, ...), averaged over ranks already."""
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
        mem, _ = memory_bytes(self.env.device)
        record = {"kind": "step", "time": round(time.time(), 3), "step": step, "tokens": step * self.tokens_per_step,
                  "loss": round(value, 6), "lr": lr, "grad_norm": round(norm, 6), "ms_per_step": round(dt * 1e3, 2),
                  "tokens_per_s": round(self.tokens_per_step / dt, 1), "tflops_per_device": round(tflops, 5),
                  "memory_gib": round(mem / 2**30, 4) if mem is not None else None}
        util = "MFU n/a"
        if self.peak.known:
            record["mfu"] = tflops / self.peak.tflops
            util = f"{self.precision} MFU {record['mfu']:.1%}"
            warning = None if first or self.warned_mfu else mfu_warning(record["mfu"], self.peak.source)
            if warning:
                self.warned_mfu = True
                self.say(warning)
            if self.hw_flops:
                record["hfu"] = self.hw_flops / dt / self.env.world_size / 1e12 / self.peak.tflops
                util += f" HFU {record['hfu']:.1%}"
        recent = self.window_ms[-5:] or [dt * 1e3]
        eta = (self.end_step - step) * statistics.mean(recent) / 1e3
        note = " (first step: includes one-off setup and compilation)" if first else ""
        moe = routing() if routing else None
        if moe:
            record["moe"] = moe
            util += (f" | experts busiest/mean {moe['max_over_mean_load']:.2f}, dropped {moe['dropped']:.1%}, "
                     f"router entropy {moe['router_entropy_nats']:.2f} nats")
        if extra:
            record["post"] = {k: round(v, 6) for k, v in extra.items()}
            util += " | " + " ".join(f"{k} {v:.4g}" for k, v in extra.items())
        self.say(f"step {step:>6}/{self.end_step} | loss {value:.4f} | lr {lr:.2e} | grad norm {norm:.3f} | "
                 f"{dt * 1e3:7.1f} ms | {self.tokens_per_step / dt:9,.0f} tok/s | {tflops:.3g} TFLOP/s | {util} | "
                 f"{memory_note(self.env.device)} | ETA {format_duration(eta)}{note}")
        self._skipped_line(step)
        self._write(record)
        self.restart_clock(step)
        return record

    def log_eval(self, step: int, train: tuple, val: tuple, entropy: tuple) -> None:
        """train, val, entropy: (nats per token, bits per byte); bits per byte compare across tokenizers."""
        bpb = lambda x: f" ({x:.4f} bpb)" if x is not None else ""
        self.say(f"eval   step {step} | train loss {train[0]:.4f}{bpb(train[1])} | val loss {val[0]:.4f}{bpb(val[1])} "
                 f"| unigram entropy {entropy[0]:.4f} nats{bpb(entropy[1])}")
        self._write({"kind": "eval", "time": round(time.time(), 3), "step": step, "tokens": step * self.tokens_per_step,
                     "train_loss": train[0], "val_loss": val[0], "train_bpb": train[1], "val_bpb": val[1]})

    def log_task(self, step: int, figures: dict) -> None:
        """A post-training evaluation: held-out task accuracy (greedy answers), held-out pair accuracy."""
        self.say(f"eval   step {step} | " + " | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in figures.items()))
        self._write({"kind": "eval", "time": round(time.time(), 3), "step": step, **figures})

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
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def _skipped_line(self, step: int) -> None:
        total = self.skipped_total
        if total > self.skipped_logged:
            self.say(f"step {step}: {total - self.skipped_logged} update(s) skipped since the last log: fp16 "
                     f"gradients overflowed and the loss scale backed off ({total} in this run)")
            self.skipped_logged = total

    def _write(self, record: dict) -> None:
        for sink in self.sinks:
            sink.write(record)

"""What a training run holds: TrainState (what a checkpoint carries beside weights and optimizer) and Run
(everything one run holds from start to finish), shared by the loop, its run-directory policy and its
opening lines."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from minigpt.core.config import Config
from minigpt.core.plan import BatchLayout, ParallelPlan
from minigpt.data import cache as data
from minigpt.parallel.backend import Backend
from minigpt.parallel.distributed import DistEnv
from minigpt.train.checkpoint import Checkpointer, RunDir, RunLock
from minigpt.train.metrics import MetricsLogger


@dataclass
class TrainState:
    """What a checkpoint carries beside the weights, the optimizer and the RNG."""

    step: int = 0  # optimizer steps done
    skipped_steps: int = 0  # fp16 updates skipped (overflow) so far
    backend: str = "ddp"  # the engine that wrote it (train.backend): a checkpoint resumes under it
    optimizer_name: str = "adamw"  # train.optimizer: a checkpoint's optimizer state resumes under the same one


@dataclass
class Run:
    """Everything one training run holds, from start to finish."""

    cfg: Config
    env: DistEnv
    say: object
    paths: RunDir
    prepared: data.PreparedData
    plan: ParallelPlan
    layout: BatchLayout
    backend: Backend
    checkpointer: Checkpointer
    metrics: MetricsLogger
    state: TrainState
    start_step: int
    end_step: int
    lock: RunLock | None = None
    document_starts: np.ndarray | None = None  # the windows batches may start at (data.align = "document")
    train_loss: float | None = None
    val_loss: float | None = None
    train_bpb: float | None = None
    val_bpb: float | None = None
    stopped: str | None = None  # "SIGTERM", "SIGINT" or "max_minutes" when the run stopped early
    bytes_of: torch.Tensor | None = None  # bytes of text per token id, on the device: bits per byte
    entropy: tuple[float, float | None] = (0.0, None)  # the corpus's unigram entropy: nats/token, bits/byte
    t_start: float = 0.0

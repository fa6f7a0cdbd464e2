"""Training backends: the one seam between the training loop and how a step runs.

The loop (train.py) sees a `Backend` and nothing else: forward + backward of a micro-batch, an
optimizer step returning the gradient norm and a skipped flag as device tensors (no host sync),
the learning rate, its state in and out of a checkpoint, the whole weights, a memory report, a
one-line description. Implementations:

  TorchBackend       one process, or DistributedDataParallel under torchrun: autocast, an fp16
                     grad scaler, gradient clipping, AdamW (fused)
  ShardedBackend     FSDP2 fully_shard and/or DTensor tensor parallelism on a (dp, tp) mesh, in
                     sharding.py
  DeepSpeedBackend   ZeRO stages 0-3 and offload, in zero.py (the only module naming DeepSpeed)

Training techniques are applied to the model from outside, torchtitan-style, before a backend
wraps it: activation checkpointing per block, then torch.compile. The model file knows none of it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from minigpt.analytic.flops import param_counts
from minigpt.analytic.memory import model_state_bytes, training_bytes_estimate
from minigpt.core.config import Config
from minigpt.core.device import available_memory_bytes
from minigpt.core.errors import UserError
from minigpt.core.fmt import fmt_bytes
from minigpt.core.plan import BatchLayout
from minigpt.nn.optim import StepResult, autocast_context, make_optimizer, objective
from minigpt.nn.weights import load_weights, weights_of
from minigpt.parallel.distributed import DistEnv


class Backend(Protocol):
    model: torch.nn.Module  # the unwrapped model (weights, evaluation)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch (gradients averaged over the accumulation);
        returns its cross-entropy, detached. `last`: the step's last micro-batch (reduce now)."""

    def step(self) -> StepResult:
        """Clip, update, zero the gradients."""

    def set_lr(self, lr: float) -> None: ...

    def save_state(self, folder: Path) -> dict:
        """Collective. Write any per-rank shards into `folder`; return what state.pt keeps."""

    def load_state(self, folder: Path, state: dict) -> None:
        """Collective. Restore weights and optimizer from a checkpoint folder and its state.pt."""

    def full_state_dict(self) -> dict | None:
        """Collective. Every weight whole, on CPU, on rank 0 (None elsewhere); tied weights once."""

    def inference_model(self) -> torch.nn.Module | None:
        """Collective. A model to sample from on rank 0 (None elsewhere)."""

    def memory_report(self) -> dict | None:
        """Collective. Per-rank memory beside the formulas, or None when the backend measures none."""

    def run_files(self) -> dict[str, str]:
        """Files (name -> text) to record in the run directory, e.g. a generated DeepSpeed config."""

    def describe(self) -> str: ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------------------------
# choices made for the device


# ----------------------------------------------------------------------------------------------
# techniques applied from outside


# ----------------------------------------------------------------------------------------------
# the torch backend


class TorchBackend:
    """One process, or DDP under torchrun: autocast, fp16 grad scaler, clipping, AdamW."""

    def __init__(self, model: torch.nn.Module, cfg: Config, env: DistEnv, layout: BatchLayout) -> None:
        self.tc, self.env, self.accum = cfg.train, env, layout.accum
        self.model = model.to(env.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(model, self.tc, fused=env.device.type in ("cpu", "cuda"))
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.tc.precision == "fp16")
        self.net = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None) \
            if env.distributed else model

    def forward_backward(self, x, y, last: bool) -> torch.Tensor:
        sync = contextlib.nullcontext() if last or not self.env.distributed else self.net.no_sync()
        with sync:
            with autocast_context(self.env.device, self.tc.precision):
                out = self.net(x, y)
            self.scaler.scale(objective(out, self.tc) / self.accum).backward()
        return out.loss.detach()

    def step(self) -> StepResult:
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None], foreach=True)
        if self.tc.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.tc.grad_clip, norm, foreach=True)
        # the scaler skips the update when a gradient is inf/NaN: exactly when the norm is not finite
        skipped = (~torch.isfinite(norm) & self.scaler.is_enabled()).to(torch.int32)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm, skipped)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def save_state(self, folder: Path) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state(self, folder: Path, state: dict) -> None:
        load_weights(self.model, folder)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

    def full_state_dict(self) -> dict | None:
        return weights_of(self.model) if self.env.is_main else None

    def inference_model(self) -> torch.nn.Module | None:
        return self.model if self.env.is_main else None

    def memory_report(self) -> dict | None:
        return None

    def run_files(self) -> dict[str, str]:
        return {}

    def describe(self) -> str:
        return f"DDP over {self.env.world_size} ranks" if self.env.distributed else "single process"

    def close(self) -> None:
        self.net = None


def check_memory(cfg: Config, env: DistEnv, layout: BatchLayout) -> None:
    """Refuse, before allocating anything, a model that cannot fit this device's free memory.

    The estimate is minigpt's own trainer's floor (memory.training_bytes_estimate: 16 bytes per
    parameter and one micro-batch's activations); under DeepSpeed the ZeRO stage divides the model
    states by the ranks. A process that would be killed for memory gets one line instead.
    """
    c, tc = cfg.model, cfg.train
    have = available_memory_bytes(env.device)
    need = training_bytes_estimate(c, layout.micro_batch_size, c.block_size, tc.precision)
    n = param_counts(c).total
    if tc.backend == "deepspeed" and tc.zero_stage:
        need -= model_state_bytes(n, tc.precision, 0, 1, "amp").total
        need += model_state_bytes(n, tc.precision, tc.zero_stage, env.world_size, "deepspeed").total
    elif tc.backend == "fsdp" or tc.tensor_parallel > 1:  # model states sharded over all ranks (or the tp group)
        states = model_state_bytes(n, tc.precision, 0, 1, "amp").total
        need -= states - states / (env.world_size if tc.backend == "fsdp" else tc.tensor_parallel)
    if have is not None and need > have:
        raise UserError(f"training this model needs at least {fmt_bytes(need)} per process ({param_counts(c).total:,} "
                        f"parameters; weights, gradients, AdamW state and one micro-batch of activations), {env.device} "
                        f"has {fmt_bytes(have)} free: make the model or train.micro_batch_size smaller")


def make_backend(model: torch.nn.Module, cfg: Config, env: DistEnv, layout: BatchLayout) -> Backend:
    if cfg.train.backend == "deepspeed":
        from minigpt.parallel.zero import DeepSpeedBackend

        return DeepSpeedBackend(model, cfg, env, layout)
    tc = cfg.train
    if tc.zero_stage or tc.offload_optimizer or tc.deepspeed_config:
        raise UserError("train.zero_stage / offload_optimizer / deepspeed_config need train.backend = 'deepspeed'")
    if tc.backend == "fsdp" or tc.tensor_parallel > 1:
        from minigpt.parallel.sharding import ShardedBackend

        return ShardedBackend(model, cfg, env, layout)
    if tc.offload_params:
        raise UserError("train.offload_params needs train.backend = 'fsdp' or 'deepspeed'")
    return TorchBackend(model, cfg, env, layout)

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
import functools
from pathlib import Path
from typing import Protocol

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from minigpt import checkpoint as ckpt
from minigpt.config import BatchLayout, Config, TrainConfig
from minigpt.distributed import DistEnv, available_memory_bytes
from minigpt.flops import param_counts
from minigpt.memory import model_state_bytes, training_bytes_estimate
from minigpt.errors import UserError
from minigpt.report import fmt_bytes
from minigpt.optim import StepResult, autocast_context, make_optimizer, objective
from minigpt.torch_private import capture_data_dependent_shapes


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


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": bf16 on a CUDA device that supports it (Ampere and later), else fp32."""
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise UserError("train.precision = 'fp16' needs CUDA (its grad scaler); on CPU use 'bf16' or 'fp32'")
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


# torch.compile on a CPU: measured on the 2-core reference machine (benchmarks/bench_train_tiny_cpu.jsonl,
# README "Speed"), the tiny model's compiled step is 5-10% faster (~20 ms) but the first compilation takes
# ~25-30 s (~3-5 s from inductor's on-disk cache), which a run shorter than ~1,000 steps does not win back.
CPU_COMPILE_MIN_STEPS = 1000


def resolve_compile(tc: TrainConfig, device: torch.device, steps: int) -> tuple[bool, str]:
    """train.compile, and why: unset means on for CUDA, on for a CPU run of CPU_COMPILE_MIN_STEPS
    steps or more, off under DeepSpeed (whose engine wraps the model)."""
    if tc.compile is not None:
        if tc.compile and tc.backend == "deepspeed":
            raise UserError("train.compile = true is not supported with train.backend = 'deepspeed'; set train.compile = false")
        return tc.compile, "train.compile"
    if tc.backend == "deepspeed":
        return False, "default: off under DeepSpeed"
    if device.type == "cuda":
        return True, "default on CUDA"
    if steps >= CPU_COMPILE_MIN_STEPS:
        return True, f"default on CPU for runs of {CPU_COMPILE_MIN_STEPS:,}+ steps"
    return False, (f"default on CPU for runs under {CPU_COMPILE_MIN_STEPS:,} steps: ~30 s of compilation is not won back; "
                   f"train.compile=true turns it on")


def configure_device(tc: TrainConfig, device: torch.device) -> list[str]:
    """Process-wide settings for training on `device`; returns what was chosen, for the log."""
    notes = []
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if device.type == "cuda" and tc.precision == "fp32" and torch.cuda.get_device_capability(device)[0] >= 8:
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # fp32 matmuls on tensor cores (Ampere+)
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        notes.append("TF32 matmuls")
    if device.type == "cpu":
        notes.append(f"{torch.get_num_threads()} threads")
    return notes


# ----------------------------------------------------------------------------------------------
# techniques applied from outside


def apply_activation_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Recompute each transformer block in the backward pass (non-reentrant torch.utils.checkpoint).

    The block's forward is wrapped in place, so parameter names (and checkpoints) are unchanged.
    """
    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return model


def apply_training_techniques(model: torch.nn.Module, tc: TrainConfig) -> torch.nn.Module:
    """Activation checkpointing, then torch.compile when train.compile (resolved) is true: in place,
    so parameter names are unchanged; evaluation and sampling run eager (see `eager`). A mixture
    of experts compiles as one graph: its dispatch (`nonzero`) is traced with data-dependent sizes
    rather than breaking the graph at every MoE layer."""
    if tc.activation_checkpointing:
        apply_activation_checkpointing(model)
    if tc.compile:
        if model.config.is_moe:  # the dispatch's per-expert token counts depend on the routing
            capture_data_dependent_shapes()
        model.compile()
    return model


def eager():
    """Run a compiled model eagerly (evaluation, sampling): no recompilation for other shapes."""
    return torch.compiler.set_stance("force_eager")


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
        ckpt.load_weights(self.model, folder)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

    def full_state_dict(self) -> dict | None:
        return ckpt.weights_of(self.model) if self.env.is_main else None

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
        from minigpt.zero import DeepSpeedBackend

        return DeepSpeedBackend(model, cfg, env, layout)
    tc = cfg.train
    if tc.zero_stage or tc.offload_optimizer or tc.deepspeed_config:
        raise UserError("train.zero_stage / offload_optimizer / deepspeed_config need train.backend = 'deepspeed'")
    if tc.backend == "fsdp" or tc.tensor_parallel > 1:
        from minigpt.sharding import ShardedBackend

        return ShardedBackend(model, cfg, env, layout)
    if tc.offload_params:
        raise UserError("train.offload_params needs train.backend = 'fsdp' or 'deepspeed'")
    return TorchBackend(model, cfg, env, layout)

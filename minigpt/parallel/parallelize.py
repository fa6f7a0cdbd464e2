"""Techniques applied to the model from outside."""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from minigpt.core.config import TrainConfig
from minigpt.core.errors import UserError
from minigpt.nn.torch_private import capture_data_dependent_shapes


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

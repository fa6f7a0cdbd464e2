"""The plan and the training techniques, applied to the model from outside in one documented order."""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from minigpt.core.config import TrainConfig
from minigpt.core.plan import ParallelPlan
from minigpt.nn.model import GPT
from minigpt.nn.ops import compile_ready
from minigpt.nn.torch_private import capture_data_dependent_shapes
from minigpt.parallel.distributed import make_mesh


def apply_activation_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Recompute each transformer block in the backward pass (non-reentrant torch.utils.checkpoint).

    The block's forward is wrapped in place, so parameter names (and checkpoints) are unchanged.
    """
    from minigpt.parallel.sharding import layers

    for block in layers(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return model


def parallelize(model: GPT, plan: ParallelPlan, tc: TrainConfig, device: torch.device) -> torch.nn.Module:
    """Apply the plan and the training techniques to a model, from outside and in one order (torchtitan's
    llama3/parallelize.py):

      1. tensor parallelism (DTensor, per block) - it changes the modules' weights, so it comes first;
      2. activation checkpointing per block - it wraps the (already sharded) blocks' forwards;
      3. torch.compile of the model (resolved train.compile) - it traces the checkpointed, sharded blocks;
         a mixture of experts compiles as one graph, its dispatch (`nonzero`) traced with data-dependent
         sizes rather than breaking the graph at every MoE layer;
      4. FSDP2 fully_shard per block, then the root (ZeRO-3 plans on the torch engine) - last, so its
         hooks gather what the compiled, checkpointed blocks compute with.

    Everything is in place, so parameter names (and checkpoints) are unchanged; evaluation and sampling
    run eager (see `eager`). DDP and DeepSpeed wrap the result in their engines (the backends).

    pp > 1: the model is first cut into this rank's pipeline chunks (parallel/pipeline.py), and the
    four steps apply to each chunk; the result holds them under the model's names (a RankModel)."""
    from minigpt.parallel.pipeline import split_model
    from minigpt.parallel.sharding import shards_parameters

    model = model.to(device)
    if plan.ep > 1:  # the experts split over ep ranks before anything wraps the model (ExpertBackend's rules)
        from minigpt.parallel.expert import apply_expert_parallel, expert_mesh

        model.expert_mesh = expert_mesh(plan, device.type)
        apply_expert_parallel(model, model.expert_mesh["ep"], model.expert_mesh["tp"] if plan.tp > 1 else None)
    mesh = make_mesh(plan, device.type) if plan.tp > 1 or plan.pp > 1 or shards_parameters(plan) else None
    if plan.pp == 1:
        if plan.ep > 1:
            model.mesh = mesh  # with tp, the expert backend averages the dense replicas over its "dp_replicate" groups
        return _apply(model, plan, tc, mesh)
    ranked = split_model(model, plan, mesh["pp"].get_local_rank(), tc.precision, device, tc.moe_aux_loss_coef)
    for stage in ranked.stages:
        _apply(stage, plan, tc, mesh)
    ranked.mesh = mesh
    if plan.ep > 1:
        ranked.expert_mesh = model.expert_mesh
    return ranked


def _apply(model: torch.nn.Module, plan: ParallelPlan, tc: TrainConfig, mesh) -> torch.nn.Module:
    """parallelize()'s four steps on a model or a pipeline chunk."""
    from minigpt.parallel.sharding import apply_fsdp, apply_tensor_parallel, shards_parameters

    if plan.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=plan.sp)
    if tc.activation_checkpointing:
        apply_activation_checkpointing(model)
    if tc.compile:
        if model.config.is_moe:  # the dispatch's per-expert token counts depend on the routing
            capture_data_dependent_shapes()
        compile_ready()  # the CPU head as its own eager region (nn/ops.py)
        model.compile()
    if shards_parameters(plan):
        apply_fsdp(model, mesh["dp_shard"], tc.precision, tc.offload_params)  # ZeRO-3: shards over all of dp
    return model


def eager():
    """Run a compiled model eagerly (evaluation, sampling): no recompilation for other shapes."""
    return torch.compiler.set_stance("force_eager")

"""Which backend runs a plan, and what every backend says before anything is built: the plan resolved
by its engine's rules, the memory a process needs, the run-directory files backends write."""

from __future__ import annotations

import dataclasses

import torch

from minigpt.analytic.flops import param_counts
from minigpt.core.config import Config
from minigpt.core.device import check_fits
from minigpt.core.errors import UserError
from minigpt.core.plan import BatchLayout, ParallelPlan
from minigpt.parallel.backend import Backend
from minigpt.parallel.ddp import TorchBackend
from minigpt.parallel.distributed import DistEnv
from minigpt.parallel.expert import ExpertBackend
from minigpt.parallel.pipeline import PipelineBackend
from minigpt.parallel.sharding import ShardedBackend
from minigpt.parallel.zero import DeepSpeedBackend

BACKENDS = (TorchBackend, ShardedBackend, DeepSpeedBackend)


def default_engine(zero: int) -> str:
    """The engine that runs a ZeRO stage when a plan names none: 0 DDP, 1-2 DeepSpeed, 3 FSDP2."""
    return {0: TorchBackend.name, 1: DeepSpeedBackend.name, 2: DeepSpeedBackend.name, 3: ShardedBackend.name}[zero]


def default_zero(keys: dict, fallback: int) -> int:
    """The ZeRO stage a plan's keys mean when they name none: the engine's own when it has one stage (DDP
    replicates model states: 0), else the command's default (`fallback`)."""
    return keys.get("zero", 0 if keys.get("backend") == TorchBackend.name else fallback)


def backend_class(plan: ParallelPlan) -> type[Backend]:
    """The backend that runs `plan`: its engine (or the default for its stage); pipeline parallelism runs on
    the pipeline backend, tensor parallelism on the sharded one, whatever the engine of the data-parallel part."""
    cls = {b.name: b for b in BACKENDS}[plan.backend or default_engine(plan.zero)]
    if plan.pp > 1:
        return PipelineBackend
    if plan.ep > 1:
        return ExpertBackend
    return ShardedBackend if cls is TorchBackend and plan.tp > 1 else cls


def resolve_plan(plan: ParallelPlan) -> ParallelPlan:
    """The plan with its engine named and that engine's rules applied."""
    named = dataclasses.replace(plan, backend=plan.backend or default_engine(plan.zero))
    return backend_class(named).resolve(named)


def plan_overrides(spelling: str, world: int) -> list[str]:
    """`minigpt train --plan`: the [train] keys that say the plan, its engine named by the rules; its dp
    must match the `world` processes torchrun started."""
    plan = ParallelPlan.parse(spelling, world)
    if plan.cp > 1:
        raise UserError(f"--plan cp={plan.cp}: context parallelism is predicted and costed (minigpt extrapolate, backtest), not trained yet; "
                        f"train with cp=1")
    return resolve_plan(plan).train_overrides()


def run_file_names() -> set[str]:
    """Every run-directory entry any backend writes."""
    return {name for b in BACKENDS for name in b.files}


def check_memory(cfg: Config, env: DistEnv, plan: ParallelPlan, layout: BatchLayout) -> None:
    """Refuse, before allocating anything, a model that cannot fit this device's free memory: the
    backend's own floor (Backend.memory_need), all of what is free. A process that would be killed for
    memory gets one line."""
    check_fits(backend_class(plan).memory_need(cfg, plan, layout), env.device, "training this model",
               f"per process, the weights, gradients and AdamW state of {param_counts(cfg.model).total:,} parameters "
               f"and one micro-batch of activations: make the model or train.micro_batch_size smaller", headroom=1.0)


def make_backend(model: torch.nn.Module, cfg: Config, env: DistEnv, plan: ParallelPlan) -> Backend:
    """The plan's backend around a model that parallelize() has prepared."""
    return backend_class(plan)(model, cfg, env, plan)

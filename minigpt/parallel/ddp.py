"""The torch backend: one process, or DistributedDataParallel under torchrun (a ZeRO-0 plan)."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from minigpt.core.config import Config
from minigpt.core.errors import UserError
from minigpt.core.plan import ParallelPlan
from minigpt.nn.lora import load_adapters
from minigpt.nn.optim import StepResult, autocast_context, make_optimizer
from minigpt.nn.weights import load_weights, read_weights, weights_of
from minigpt.parallel.backend import Backend
from minigpt.parallel.distributed import DistEnv


class TorchBackend(Backend):
    """One process, or DDP under torchrun: autocast, fp16 grad scaler, clipping, AdamW (fused)."""

    name = "ddp"
    runs_muon = True
    runs_lora = True

    @classmethod
    def resolve(cls, plan: ParallelPlan) -> ParallelPlan:
        if plan.zero:
            raise UserError(f"ZeRO-{plan.zero} shards model states: use backend=deepspeed (ZeRO-1/2/3) or backend=fsdp "
                            f"(ZeRO-3); backend=ddp replicates them (zero=0)")
        if plan.offload_optimizer or plan.offload_params:
            raise UserError("offloading needs backend=fsdp (parameters, on CUDA) or backend=deepspeed")
        return dataclasses.replace(plan, backend=cls.name)

    def __init__(self, model: torch.nn.Module, cfg: Config, env: DistEnv, plan: ParallelPlan) -> None:
        self.cfg, self.tc, self.env, self.plan = cfg, cfg.train, env, plan
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel a group; it refuses a group mixing DTensor shards and plain tensors (the expert backend's tp)
        self.optimizer = make_optimizer(model, self.tc, fused=env.device.type in ("cpu", "cuda") and plan.tp == 1)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.tc.precision == "fp16")
        self.net = self.wrap(model)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """What the step runs: DDP under torchrun (it all-reduces the gradients), the model itself alone."""
        return DDP(model, device_ids=[self.env.device.index] if self.env.device.type == "cuda" else None) \
            if self.env.distributed else model

    def forward_backward(self, x, y, accum: int, last: bool) -> torch.Tensor:
        sync = self.net.no_sync() if isinstance(self.net, DDP) and not last else contextlib.nullcontext()
        with sync:
            with autocast_context(self.env.device, self.tc.precision):
                out, loss = self.forward_objective(self.net, x, y)
            self.scaler.scale(loss / accum).backward()
        return out.loss.detach()

    def optimizer_step(self) -> StepResult:
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

    def save_state(self, folder: Path) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state(self, folder: Path, state: dict) -> None:
        if self.tc.lora_rank:  # the checkpoint holds the adapters; the base came from train.init_from
            load_adapters(self.model, read_weights(folder), str(folder))
        else:
            load_weights(self.model, folder)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

    def full_state_dict(self) -> dict | None:
        return weights_of(self.model) if self.env.is_main else None

    def inference_model(self) -> torch.nn.Module | None:
        return self.model if self.env.is_main else None

    def describe(self) -> str:
        return f"DDP over {self.env.world_size} ranks" if self.env.distributed else "single process"

    def close(self) -> None:
        self.net = None

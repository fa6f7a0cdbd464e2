"""Optimizer, learning-rate schedule, mixed precision and the training objective, shared by every
backend and by measurement."""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def lr_at(step: int, cfg) -> float:
    """Linear warmup over warmup_steps, then cosine decay to min_lr at max_steps; or (schedule "wsd",
    warmup-stable-decay: Zhai et al. 2022, Hu et al. 2024) lr held until the last decay_fraction of
    max_steps, then a linear decay to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if getattr(cfg, "schedule", "cosine") == "wsd":
        decay_start = cfg.max_steps * (1 - cfg.decay_fraction)
        if step < decay_start:
            return cfg.lr
        return cfg.lr + (cfg.min_lr - cfg.lr) * min((step - decay_start) / max(cfg.max_steps - decay_start, 1), 1.0)
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


class Optimizers:
    """Several optimizers stepping as one (Muon on the blocks' matrices, AdamW on the rest): their
    param_groups together (the learning-rate schedule sets every group), one state dict holding each's."""

    def __init__(self, **optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers.values() for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers.values():
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: o.state_dict() for name, o in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, o in self.optimizers.items():
            o.load_state_dict(state[name])

    def __iter__(self):
        """The optimizers themselves: torch.distributed.checkpoint's state-dict helpers take an iterable of them."""
        return iter(self.optimizers.values())


class ShardedMuon(torch.optim.Muon):
    """torch.optim.Muon whose matrices may be DTensor shards (FSDP2, tensor parallelism): the momentum stays
    sharded; each step's update is gathered whole (`full_tensor`), orthogonalised on every rank alike, and each
    rank keeps its own shard of the result (gather-orthogonalise-scatter; the scatter is a local slice). On whole
    matrices it computes what torch.optim.Muon computes, op for op (its own Newton-Schulz step and lr rule)."""

    @torch.no_grad()
    def step(self, closure=None):
        from torch.distributed.tensor import DTensor, Replicate

        from minigpt.nn.torch_private import muon_adjusted_lr, muon_orthogonalize

        for group in self.param_groups:
            for p in [q for q in group["params"] if q.grad is not None]:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                sharded = isinstance(update, DTensor)
                whole = update.full_tensor() if sharded else update
                ortho = muon_orthogonalize(whole, group["ns_coefficients"], group["ns_steps"], group["eps"])
                if sharded:
                    mesh = update.device_mesh
                    ortho = DTensor.from_local(ortho, mesh, [Replicate()] * mesh.ndim).redistribute(mesh, update.placements)
                lr = float(group["lr"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(ortho, alpha=-muon_adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return None


def hidden_matrices(model: torch.nn.Module) -> set[int]:
    """ids of the blocks' 2-D weights: the parameters Muon orthogonalises."""
    return {id(p) for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}


def make_optimizer(model: torch.nn.Module, cfg, fused: bool = False):
    """AdamW; weight decay on matrices (linear weights, embeddings) only, not on biases or norms. With
    train.optimizer = "muon": torch.optim.Muon on the blocks' matrices (its update scaled to AdamW's RMS,
    adjust_lr_fn="match_rms_adamw", so the same lr, weight decay and schedule apply), AdamW on the rest.

    fused=True (CPU, CUDA) runs the whole update as one kernel per parameter group and lets an
    fp16 grad scaler skip an overflowed step without a host round trip (on the 2-core reference
    CPU: 0.4 ms against 1.7-2.5 ms per step for the tiny model); otherwise torch's default
    (multi-tensor foreach) implementation.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if getattr(cfg, "optimizer", "adamw") == "muon":
        hidden = hidden_matrices(model)
        muon = ShardedMuon([p for p in params if id(p) in hidden], lr=cfg.lr, weight_decay=cfg.weight_decay,
                           adjust_lr_fn="match_rms_adamw")
        params = [p for p in params if id(p) not in hidden]
        return Optimizers(adamw=_adamw(params, cfg, fused), muon=muon)
    return _adamw(params, cfg, fused)


def _adamw(params: list, cfg, fused: bool) -> torch.optim.AdamW:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused or None)


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


class StepResult(NamedTuple):
    """What an optimizer step reports, as device tensors (read on the host only when logged)."""

    grad_norm: torch.Tensor  # global L2 norm of the gradients before clipping (0-dim)
    skipped: torch.Tensor  # 1 when the update was skipped (fp16 overflow), else 0 (0-dim int)


def objective(out, cfg) -> torch.Tensor:
    """What backward sees: the cross-entropy, plus the MoE load-balancing loss weighted by
    train.moe_aux_loss_coef (the logged loss is the cross-entropy alone)."""
    if out.aux_loss is None:
        return out.loss
    return out.loss + cfg.moe_aux_loss_coef * out.aux_loss

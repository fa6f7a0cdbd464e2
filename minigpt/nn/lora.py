"""LoRA (Hu et al. 2021): a frozen Linear plus a trainable low-rank update, y = x W^T + (alpha / r) x A^T B^T.

Written here rather than through peft: peft's layers wrap the Linear and rename its weight
(`base_layer.weight`), which would change the names every checkpoint reader, the HF export and the
tensor-parallel plans know; `LoRALinear` *is* the Linear (a subclass, same `weight` and `bias`) with
two more parameters, `lora_A` (r x in, Kaiming-uniform as in the paper's code) and `lora_B` (out x r,
zeros: training starts from the base model exactly).

A run with train.lora_rank > 0 trains only the adapters (everything else frozen, `requires_grad` off)
and saves only them; its base is train.init_from, read again whenever the run is read, and the
adapters are merged into the base for generate, eval, serve and convert (`merge_lora`). A post-training
run whose base lacks its chat tokens grows the vocabulary: its token embedding (and an untied head) then train
whole beside the adapters and are saved with them (peft's advice for added tokens, `modules_to_save`; only
the new rows would do, but AdamW's weight decay and a second parameter would have to leave the old ones be).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.core.blocks import inventory
from minigpt.core.config import LORA_TARGETS
from minigpt.core.errors import UserError
from minigpt.nn.weights import VOCAB_ROWS

TARGETS = LORA_TARGETS  # the model's inventory names them (core/blocks.py)


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.weight, self.bias = base.weight, base.bias  # the same tensors: frozen below
        self.rank, self.scale = rank, alpha / rank
        self.enabled = True  # adapters_off: the base alone (a post-training reference without a second copy)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_(self.weight + self.scale * (self.lora_B @ self.lora_A).to(self.weight.dtype))
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out


def _targets(model: nn.Module, targets: list[str] | tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    """The Linears the model's inventory marks as LoRA targets (core/blocks.py) whose own name is in `targets`."""
    inv = inventory(model.config)
    return [(n, m) for n, m in model.named_modules()
            if type(m) is nn.Linear and (part := inv.find(n)) is not None and part.lora and part.leaf in targets]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=TARGETS) -> int:
    """Swap the targeted Linears for LoRALinears and freeze everything else; returns the adapters'
    parameter count."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise UserError(f"train.lora_targets {unknown} are not LoRA targets; choose from {', '.join(TARGETS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    found = _targets(model, targets)
    for name, linear in found:
        _replace(model, name, LoRALinear(linear, rank, alpha))
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Within: every LoRA layer computes its frozen base only (the model before adaptation)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.enabled = True


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its Linear (W + alpha/r B A): a plain GPT again, the same outputs."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _replace(model, name, module.merged())
    return model


EMBEDDINGS = VOCAB_ROWS  # trained whole beside the adapters when the vocabulary grew


def is_adapter(name: str) -> bool:
    return "lora_A" in name or "lora_B" in name


def train_embeddings(model: nn.Module) -> None:
    """The token embedding (and an untied head) trained whole beside the adapters: a LoRA run that grew the
    vocabulary for new tokens, whose rows the base never learned."""
    for name, p in model.named_parameters():
        if name in EMBEDDINGS:
            p.requires_grad_(True)


def lora_saved(model: nn.Module) -> set[str]:
    """The names a LoRA run saves: what it trains (the adapters; the embeddings when train_embeddings)."""
    return {n for n, p in model.named_parameters() if is_adapter(n) or (n in EMBEDDINGS and p.requires_grad)}


def adapter_state(weights: dict[str, torch.Tensor], saved: set[str]) -> dict[str, torch.Tensor]:
    """What a LoRA run saves of a full state dict: the names lora_saved gave (the adapters; the grown embeddings)."""
    return {k: v for k, v in weights.items() if k in saved}


def load_adapters(model: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Copy saved adapters (and embeddings, when the run trained them: train_embeddings first) into a model that
    has them (apply_lora first); every one must be there."""
    expected = lora_saved(model)
    got = set(weights)
    if expected != got:
        raise UserError(f"the adapters in {where} do not fit this model (missing {sorted(expected - got)[:3]}, unexpected "
                        f"{sorted(got - expected)[:3]}): train.lora_rank / lora_targets differ from the run's")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected


def lora_memory(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Trainable parameters and the bytes of model states, measured from the tensors, beside the formulas:
    full fine-tuning with Adam keeps 16 bytes a parameter in fp32 (weight 4, gradient 4, m 4, v 4); LoRA keeps
    the frozen weights (4 bytes each, no gradient, no optimizer state) plus 16 bytes per adapter parameter."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    opt_bytes = 0
    if optimizer is not None:
        opt_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                        if torch.is_tensor(t) and t.dim() > 0)
    return {"params": total, "trainable_params": trainable, "trainable_fraction": trainable / total,
            "measured_bytes": {"weights": weight_bytes, "grads": grad_bytes, "optimizer": opt_bytes,
                               "total": weight_bytes + grad_bytes + opt_bytes},
            "formula_bytes": {"full_finetune": 16 * total, "lora": 4 * (total - trainable) + 16 * trainable},
            "convention": "fp32 training with Adam: full fine-tuning 16 bytes a parameter (4 weight, 4 gradient, 8 Adam); "
                          "LoRA 4 bytes a frozen parameter + 16 an adapter parameter; measured: every parameter, "
                          "gradient and optimizer-state tensor"}

"""Weight-only quantization for inference: int8 per output channel, int4 in groups along the input.

Every Linear of the blocks and the LM head is swapped for a module that keeps its weight quantized and
multiplies with ATen's CPU kernels for it (the ones gpt-fast and torchao call on CPU; behind
nn/torch_private.py): activations go in and out as bfloat16 inside, in the caller's dtype outside.
Written here rather than taken from torchao because torchao's wheel is built against specific torch
releases and this project pins torch 2.13: the swap is 100 lines and its kernels are torch's own.

- int8: w ~ q * s, q in [-127, 127], one scale per output channel (symmetric, absmax).
- int4: per group of `group` input columns, asymmetric: w ~ (q - 8) * s + z with q in [0, 15]
  (gpt-fast's layout), s = (max - min) / 15, z = min + 8 s.
- The embedding stays in full precision (a lookup reads one row per token); a tied LM head gets its own
  quantized copy of the shared matrix, so the model then holds that matrix twice (said in `weight_bytes`).
- The router of a mixture stays in full precision (its choices are discrete: a small error flips them).
Decoding and evaluation only: a quantized model is not trained.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.core.blocks import inventory
from minigpt.core.errors import UserError
from minigpt.nn import torch_private as P

MODES = ("int8", "int4")
INT4_GROUP = 32


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scales = (w.abs().amax(dim=1).float() / 127).clamp(min=1e-8)
    q = torch.round(w.float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(int4 values in int32 (M, K), scales and zeros (K / group, M, 2) bf16)."""
    m, k = w.shape
    g = w.float().reshape(m, k // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scales = ((hi - lo) / 15).clamp(min=1e-8)
    q = torch.round((g - lo) / scales).clamp(0, 15).to(torch.int32).reshape(m, k)
    sz = torch.cat([scales, lo + 8 * scales], -1).reshape(m, k // group, 2).transpose(0, 1).contiguous()
    return q, sz.to(torch.bfloat16)


class QuantizedLinear(nn.Module):
    """A Linear whose weight is int8 or int4; bias (if any) kept as it was."""

    def __init__(self, linear: nn.Linear, mode: str, group: int = INT4_GROUP) -> None:
        super().__init__()
        self.in_features, self.out_features, self.mode, self.group = linear.in_features, linear.out_features, mode, group
        w = linear.weight.detach()
        if mode == "int8":
            q, scales = quantize_int8(w)
            self.register_buffer("weight_q", q)
            self.register_buffer("scales", scales.to(torch.bfloat16))
        else:
            q, sz = quantize_int4(w, group)
            self.register_buffer("weight_q", P.int4_pack(q))
            self.register_buffer("scales", sz)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        scales = self.scales.to(torch.bfloat16)  # a model.to(dtype) casts float buffers; the kernels take bf16
        if self.mode == "int8":
            y = P.int8_weight_mm(flat, self.weight_q, scales)
        else:
            y = P.int4_weight_mm(flat, self.weight_q, self.group, scales)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class QuantizedLMHead(QuantizedLinear):
    """The LM head, quantized: logits without the padding rows, or the cross-entropy given targets."""

    def __init__(self, head: nn.Linear, mode: str, group: int = INT4_GROUP) -> None:
        super().__init__(head, mode, group)
        self.vocab_size = head.vocab_size

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        logits = super().forward(x)[..., : self.vocab_size]
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)


def check_quantizable(model: nn.Module, mode: str, group: int = INT4_GROUP) -> None:
    """Refuse before any work: an unknown mode, a device without the kernels, a shape int4 cannot group."""
    if mode not in MODES:
        raise UserError(f"--quantize {mode!r}: choose from {', '.join(MODES)}")
    if getattr(model, "quantization", None) or any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise UserError(f"this run is quantized already ({getattr(model, 'quantization', '?')}): drop --quantize")
    device = model.wte.weight.device
    if device.type != "cpu":
        raise UserError(f"--quantize {mode} runs on CPU only here (ATen's CPU kernels); this model is on {device}: "
                        f"use --device cpu, or leave out --quantize")
    if mode == "int4":
        for name, module in _targets(model):
            if module.in_features % group or module.in_features % 32 or module.out_features % 8:
                raise UserError(f"--quantize int4 needs every Linear's inputs in whole groups of {group} (and 32) and "
                                f"outputs a multiple of 8; {name} is {module.in_features} -> {module.out_features}: "
                                f"use --quantize int8")


def _targets(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linears the model's inventory marks for quantization (core/blocks.py: never the router)."""
    inv = inventory(model.config)
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and (part := inv.find(n)) is not None and part.quantize]


def quantize_model(model: nn.Module, mode: str, group: int = INT4_GROUP) -> nn.Module:
    """Swap the blocks' Linears and the LM head for quantized ones, in place; the model in eval mode."""
    check_quantizable(model, mode, group)
    for name, module in _targets(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = QuantizedLMHead(module, mode, group) if name == "lm_head" else QuantizedLinear(module, mode, group)
        setattr(parent, child, new)
    model.quantization = mode
    return model.eval()


def weight_bytes(model: nn.Module) -> dict:
    """Bytes of the weights decoding reads: quantized matrices with their scales, the rest as stored."""
    quant = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, QuantizedLinear)
                for b in m.buffers(recurse=False))
    rest = sum(p.numel() * p.element_size() for p in model.parameters())
    tied = model.config.tie_embeddings and isinstance(model.lm_head, QuantizedLinear)
    embedding = model.wte.weight.numel() * model.wte.weight.element_size() if tied else 0
    return {"quantized_bytes": quant, "other_bytes": rest, "total_bytes": quant + rest,
            "read_per_decode_step_bytes": quant + rest - embedding,
            "convention": "quantized Linears (values + scales/zeros) plus every other parameter as stored (embedding, "
                          "norms, biases; a tied head's matrix is held twice); per decode step the tied embedding's "
                          "full-precision copy is not counted (a lookup reads one row), as the unquantized bound counts "
                          "that matrix once"}


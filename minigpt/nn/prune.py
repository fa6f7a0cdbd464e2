"""Structured pruning of a GPT: attention heads, MLP channels and whole layers removed, the model rebuilt with the
smaller shapes (not masks), so every reader loads it as an ordinary model.

Importance, measured on calibration batches, by the activation-based criteria of Minitron (Muralidharan et al.
2024, Sec. 2.2): an MLP channel by the mean magnitude of its activation (the input of the down projection), a head
by the mean L2 norm of its attention output (the input of the output projection); grouped-query heads go with
their key/value group (the group's heads summed), so a pruned model keeps its group size. A layer by ShortGPT's
Block Influence (Men et al. 2024): 1 - the mean cosine similarity of the block's input and output hidden states
(a block that changes its input little matters little). Each layer keeps the same number of heads and channels
(a ModelConfig has one n_head and one ffn_hidden): its own most important ones. A mixture of experts is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from minigpt.core.config import ModelConfig
from minigpt.core.errors import UserError
from minigpt.nn.model import GPT


@dataclasses.dataclass
class Importance:
    groups: list[torch.Tensor]  # per layer: one score per key/value group (its query heads' output norms summed)
    channels: list[torch.Tensor]  # per layer: one score per MLP channel
    layers: torch.Tensor  # per layer: Block Influence


def check_prunable(c: ModelConfig) -> None:
    if c.is_moe:
        raise UserError("pruning removes heads, MLP channels and layers of a dense model; a mixture of experts is not "
                        "pruned here (prune experts by routing load instead)")
    if c.quantization:
        raise UserError(f"this run's weights are {c.quantization}-quantized: prune the run it was quantized from, then "
                        f"quantize the pruned run")


@torch.no_grad()
def importance(model: GPT, batches: Iterable[torch.Tensor]) -> Importance:
    """Scores of every head group, MLP channel and layer over the calibration batches (token ids, (B, T))."""
    c = model.config
    H, G, D = c.n_head, c.n_kv_head, c.head_dim
    heads = [torch.zeros(H) for _ in range(c.n_layer)]
    channels = [torch.zeros(c.ffn_hidden) for _ in range(c.n_layer)]
    influence, counts = torch.zeros(c.n_layer), [0]
    hooks = []
    for i, block in enumerate(model.blocks):
        def head_hook(_, args, i=i):
            y = args[0].float()
            heads[i] += y.view(*y.shape[:-1], H, D).norm(dim=-1).mean(dim=tuple(range(y.dim() - 1)))

        def channel_hook(_, args, i=i):
            channels[i] += args[0].float().abs().mean(dim=tuple(range(args[0].dim() - 1)))

        def block_hook(_, args, out, i=i):
            x_in, x_out = args[0].float(), out[0].float()
            influence[i] += 1 - F.cosine_similarity(x_in, x_out, dim=-1).mean()

        hooks += [block.attn.c_proj.register_forward_pre_hook(head_hook),
                  block.mlp.c_proj.register_forward_pre_hook(channel_hook), block.register_forward_hook(block_hook)]
    try:
        model.eval()
        for idx in batches:
            model(idx)
            counts[0] += 1
    finally:
        for h in hooks:
            h.remove()
    if not counts[0]:
        raise UserError("pruning needs calibration batches: the data gave none")
    groups = [h.view(G, H // G).sum(dim=1) / counts[0] for h in heads]
    return Importance(groups, [ch / counts[0] for ch in channels], influence / counts[0])


def plan_sizes(c: ModelConfig, heads: float, mlp: float, layers: int) -> tuple[int, int, int]:
    """(kv groups kept, MLP channels kept, layers kept) for fractions of heads and channels and a count of layers
    removed; each at least one, channels in multiples of 8 where the width allows."""
    for name, value in (("--heads", heads), ("--mlp", mlp)):
        if not 0 <= value < 1:
            raise UserError(f"{name} {value:g} is the fraction to remove: give a number in [0, 1)")
    if not 0 <= layers < c.n_layer:
        raise UserError(f"--layers {layers} removes whole layers: give 0 to {c.n_layer - 1} (the model has {c.n_layer})")
    groups = max(1, round(c.n_kv_head * (1 - heads)))
    keep = max(1, round(c.ffn_hidden * (1 - mlp)))
    if keep >= 8:
        keep -= keep % 8
    return groups, keep, c.n_layer - layers


def pruned_config(c: ModelConfig, groups: int, channels: int, layers: int) -> ModelConfig:
    per_group = c.n_head // c.n_kv_head
    return dataclasses.replace(c, n_layer=layers, n_head=groups * per_group, n_kv_head=groups, head_dim=c.head_dim,
                               ffn_hidden=channels)


def prune(model: GPT, imp: Importance, groups: int, channels: int, layers: int) -> GPT:
    """A new GPT with the kept layers (highest influence, in order), heads (their groups) and channels."""
    c = model.config
    kept_layers = sorted(torch.topk(imp.layers, layers).indices.tolist())
    new = GPT(pruned_config(c, groups, channels, layers))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")}
    for new_i, old_i in enumerate(kept_layers):
        g = torch.topk(imp.groups[old_i], groups).indices.sort().values
        ch = torch.topk(imp.channels[old_i], channels).indices.sort().values
        for name, t in _sliced_block(model.blocks[old_i], c, g, ch).items():
            state[f"blocks.{new_i}.{name}"] = t
    new.load_state_dict(state, strict=True)
    return new


def _sliced_block(block, c: ModelConfig, groups: torch.Tensor, channels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One block's tensors with the kept groups' heads and the kept channels (fused weights sliced per block)."""
    H, G, D = c.n_head, c.n_kv_head, c.head_dim
    per = H // G
    q_rows = torch.cat([torch.arange(g * per * D, (g + 1) * per * D) for g in groups.tolist()])
    kv_rows = torch.cat([torch.arange(g * D, (g + 1) * D) for g in groups.tolist()])
    qkv = torch.cat([q_rows, H * D + kv_rows, H * D + G * D + kv_rows])
    fc_rows = torch.cat([channels, c.ffn_hidden + channels]) if c.mlp == "swiglu" else channels
    out = {}
    for name, t in block.state_dict().items():
        if name.startswith("attn.c_attn."):
            t = t[qkv]
        elif name == "attn.c_proj.weight":
            t = t[:, q_rows]
        elif name.startswith("mlp.c_fc."):
            t = t[fc_rows]
        elif name == "mlp.c_proj.weight":
            t = t[:, channels]
        out[name] = t.clone()
    return out

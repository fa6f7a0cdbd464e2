"""Expert parallelism: a mixture of experts' experts sharded over an "ep" group, tokens sent to them and
back with all-to-all (GShard, Lepikhin et al. 2020; Switch Transformer, Fedus et al. 2021).

Each of the ep ranks holds n_expert / ep experts (contiguous: rank r holds r*E/ep ...). A rank routes its
own tokens (the router is replicated), sorts its N*k routed slots by expert, and sends each rank the
slots of that rank's experts (one all-to-all of the slot counts, one of the hidden states); the experts
run on what arrived, and a second all-to-all returns the outputs, which are weighted and summed as the
dense MoE does. Backward reverses both all-to-alls. Per MoE layer a rank sends N*k*C values (ep-1)/ep of
them leave the rank under balanced routing: 4 such transfers per step (2 forward, 2 backward).

On fake tensors (minigpt simulate) routing has no data: every expert gets an equal share of the slots,
as the dense MoE assumes, and the count exchange (E integers) is not run.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minigpt.nn.model import MoE, has_no_data
from minigpt.nn.ops import activation_dtype
from minigpt.nn.torch_private import all_to_all_autograd


class ExpertParallelMoE(nn.Module):
    """A MoE whose experts are split over ep_mesh; the same outputs and load-balancing loss."""

    def __init__(self, moe: MoE, ep_mesh) -> None:
        super().__init__()
        self.n_expert, self.k, self.ep = moe.n_expert, moe.k, ep_mesh.size()
        self.local = moe.n_expert // self.ep
        first = ep_mesh.get_local_rank() * self.local
        self.router = moe.router
        self.experts = nn.ModuleList(moe.experts[first:first + self.local])
        self.group = ep_mesh.get_group()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        flat = x.reshape(-1, C)
        N = flat.size(0)
        probs = self.router(flat).float().softmax(dim=-1)  # (N, E)
        weights, chosen = probs.topk(self.k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        slot_expert = chosen.reshape(-1)  # (N*k,)
        order = slot_expert.argsort(stable=True)  # slots grouped by expert, so by the rank that holds it
        counts, received = self._counts(slot_expert, N)
        send = [sum(counts[r * self.local:(r + 1) * self.local]) for r in range(self.ep)]
        recv = [sum(c) for c in received]
        arrived = all_to_all_autograd(flat[order // self.k], recv, send, self.group)
        done = all_to_all_autograd(self._run_experts(arrived, received), send, recv, self.group)
        out = torch.zeros(N, C, device=flat.device, dtype=activation_dtype(flat))
        w = weights.reshape(-1)[order].unsqueeze(-1)
        out.index_add_(0, order // self.k, (done * w.to(done.dtype)).to(out.dtype))
        routed = F.one_hot(chosen, self.n_expert).sum(dim=(0, 1)).float() / (N * self.k)
        aux = self.n_expert * (routed * probs.mean(dim=0)).sum()
        return out.view(B, T, C), aux

    def _counts(self, slot_expert: torch.Tensor, N: int) -> tuple[list[int], list[list[int]]]:
        """This rank's slots per expert (E ints), and the slots each source rank sends this rank's experts
        (ep lists of E/ep ints): exchanged with an all-to-all, or balanced shares on fake tensors."""
        E, L = self.n_expert, self.local
        if has_no_data(slot_expert):
            counts = [N * self.k // E + (1 if e < N * self.k % E else 0) for e in range(E)]
            mine = dist.get_rank(self.group) * L
            return counts, [counts[mine:mine + L] for _ in range(self.ep)]
        counts_t = torch.bincount(slot_expert, minlength=E)
        received = torch.empty_like(counts_t)
        dist.all_to_all_single(received, counts_t, group=self.group)
        return counts_t.tolist(), received.view(self.ep, L).tolist()

    def _run_experts(self, arrived: torch.Tensor, received: list[list[int]]) -> torch.Tensor:
        """The local experts on the rows that arrived (source by source, expert by expert within each),
        their outputs put back in the order the rows came."""
        pieces = list(arrived.split([c for source in received for c in source]))
        L = self.local
        for j, expert in enumerate(self.experts):
            rows = [pieces[s * L + j] for s in range(self.ep)]
            y = expert(torch.cat(rows))
            for s, part in enumerate(y.split([r.size(0) for r in rows])):
                pieces[s * L + j] = part
        return torch.cat(pieces)


def apply_expert_parallel(model: nn.Module, ep_mesh) -> nn.Module:
    """Replace every block's MoE with its expert-parallel form over ep_mesh (in place)."""
    from minigpt.parallel.sharding import layers

    for block in layers(model):
        if isinstance(block.mlp, MoE):
            block.mlp = ExpertParallelMoE(block.mlp, ep_mesh)
    return model

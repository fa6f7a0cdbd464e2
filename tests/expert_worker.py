"""Run under torchrun by tests/test_pipeline.py: expert parallelism on gloo against the dense MoE.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/expert_worker.py OUT

Every rank builds the same MoE (seeded) and routes its own tokens: the expert-parallel layer (its
experts split over the ranks, all-to-all dispatch) must give each rank the dense layer's output and
load-balancing loss, and each rank's experts the gradient the dense layer gives them summed over the
ranks' tokens. Rank 0 writes what it saw to OUT/expert.pt.
"""

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from minigpt.core.config import ModelConfig
from minigpt.nn.model import MoE
from minigpt.parallel.expert import ExpertParallelMoE


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    c = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64, n_expert=4, n_expert_active=2)
    torch.manual_seed(0)
    dense = MoE(c)
    ep = ExpertParallelMoE(copy.deepcopy(dense), init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))["ep"])
    x = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(rank))
    y_dense, aux_dense = dense(x)
    y_ep, aux_ep = ep(x)
    (y_dense.square().sum() + aux_dense).backward()
    (y_ep.square().sum() + aux_ep).backward()
    grads = [p.grad.clone() for p in dense.experts.parameters()]
    for g in grads:
        dist.all_reduce(g)  # the dense experts' gradients over every rank's tokens
    local = c.n_expert // world
    want = [g for g, (name, _) in zip(grads, dense.experts.named_parameters()) if int(name.split(".")[0]) // local == rank]
    got = [p.grad for p in ep.experts.parameters()]
    result = {"output": (y_ep - y_dense).abs().max().item(), "aux": abs(aux_ep.item() - aux_dense.item()),
              "router_grad": (ep.router.weight.grad - dense.router.weight.grad).abs().max().item(),
              "expert_grads": max((a - b).abs().max().item() for a, b in zip(got, want)),
              "local_experts": len(ep.experts)}
    results = [None] * world
    dist.all_gather_object(results, result)
    if rank == 0:
        torch.save(results, Path(sys.argv[1]) / "expert.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Run by tests/test_pipeline.py: N gloo ranks, forked from this process (torch imported once), train a
few steps on each layout given, through the package's own parallelize() and backends, and write rank
0's losses, gradient norms, evaluation losses and final weights (ordinary layout) to OUT/<layout>.pt.

    python tests/pipeline_worker.py N OUT SPEC.json

SPEC.json: {"model": {...ModelConfig keys}, "train": {...TrainConfig keys}, "layouts": {name: plan spelling},
"steps": S, "experts": bool, "resume": [layout names saved and resumed halfway]}. The batches are seeded random tokens, the same on every layout: step s,
global micro-batch g. With "experts", the expert-parallel dispatch is checked too (expert_check).
"""

import copy
import json
import multiprocessing
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from minigpt.core.config import Config, ModelConfig, TrainConfig
from minigpt.core.plan import ParallelPlan
from minigpt.nn.model import GPT, MoE
from minigpt.parallel.distributed import all_reduce_mean, init_distributed
from minigpt.parallel.expert import ExpertParallelMoE
from minigpt.parallel.parallelize import parallelize
from minigpt.parallel.registry import make_backend, resolve_plan
from minigpt.train.checkpoint import Checkpointer, RunDir


def global_batches(c: ModelConfig, tc: TrainConfig, step: int, count: int) -> list:
    """The step's `count` micro-batches, each (x, y) of micro_batch_size x block_size tokens."""
    out = []
    for g in range(count):
        gen = torch.Generator().manual_seed(1000 * step + g)
        t = torch.randint(0, c.vocab_size, (tc.micro_batch_size, c.block_size + 1), generator=gen)
        out.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
    return out


def resumed(backend, cfg, plan, env, root: Path, step: int):
    """The backend saved by the package's checkpointer after `step` steps and restored into a fresh model and
    backend (initialised from another seed, so only the checkpoint can make it equal)."""
    ckpt = Checkpointer(RunDir(root), env, every=1)
    root.mkdir(exist_ok=True)
    ckpt.save(step, backend, {"step": step})
    torch.manual_seed(cfg.train.seed + 1)
    fresh = make_backend(parallelize(GPT(cfg.model), plan, cfg.train, env.device), cfg, env, plan)
    ckpt.load(fresh, ckpt.latest_state())
    return fresh


def run_layout(cfg, spelling: str, env, steps: int, resume_dir: Path | None = None) -> dict:
    """Train `steps` steps on the layout (with resume_dir: saved and resumed into a fresh backend halfway)."""
    plan = resolve_plan(ParallelPlan.parse(spelling, env.world_size))
    count = cfg.train.batch_size_tokens // (cfg.train.micro_batch_size * cfg.model.block_size)
    torch.manual_seed(cfg.train.seed)
    backend = make_backend(parallelize(GPT(cfg.model), plan, cfg.train, env.device), cfg, env, plan)
    per_dp = count // plan.dp
    mine = slice(plan.dp_rank(env.rank) * per_dp, (plan.dp_rank(env.rank) + 1) * per_dp)
    losses, norms = [], []
    for step in range(steps):
        if resume_dir is not None and step == steps // 2:
            backend = resumed(backend, cfg, plan, env, resume_dir, step)
        backend.set_lr(cfg.train.lr)
        loss, result = backend.step(global_batches(cfg.model, cfg.train, step, count)[mine])
        losses.append(all_reduce_mean(loss, env).item())  # as the metrics log it: the mean over data-parallel ranks
        norms.append(result.grad_norm.item())
    backend.model.eval()
    with torch.no_grad():
        evals = backend.eval_losses(global_batches(cfg.model, cfg.train, 99, 3)).tolist()
    weights = backend.full_state_dict()
    return {"loss": losses, "grad_norm": norms, "eval": evals, "weights": weights, "describe": backend.describe()}


def config(spec: dict) -> Config:
    return Config(model=ModelConfig(**spec["model"]), train=TrainConfig(**spec["train"]))


def expert_check(out: Path) -> None:
    """Expert parallelism on gloo against the dense MoE: every rank builds the same MoE (seeded) and routes
    its own tokens; the expert-parallel layer (experts split over the ranks, all-to-all dispatch) must give
    each rank the dense layer's output and load-balancing loss, and each rank's experts the gradient the
    dense layer gives them summed over the ranks' tokens. Rank 0 writes what every rank saw to OUT/expert.pt."""
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
        torch.save(results, out / "expert.pt")



def rank_main(rank: int, world: int, port: int, out: Path, spec: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    cfg = config(spec)
    for name, spelling in spec["layouts"].items():
        resume = out / f"{name}-checkpoints" if name in spec.get("resume", ()) else None
        result = run_layout(cfg, spelling, env, spec["steps"], resume)
        if env.is_main:
            torch.save(result, out / f"{name}.pt")
    if spec.get("experts"):
        expert_check(out)
    dist.destroy_process_group()


def main() -> None:
    world, out, spec = int(sys.argv[1]), Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")  # nothing has run yet: no threads to fork
    procs = [ctx.Process(target=rank_main, args=(r, world, port, out, spec)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    sys.exit(max(abs(p.exitcode) for p in procs))


if __name__ == "__main__":
    main()

"""Run under torchrun by tests/test_pipeline.py: train a few steps on each layout given, through the
package's own parallelize() and backends, and write rank 0's losses, gradient norms, evaluation
losses and final weights (ordinary layout) to OUT/<layout>.pt.

    python -m torch.distributed.run --standalone --nproc_per_node N tests/pipeline_worker.py OUT SPEC.json

SPEC.json: {"model": {...ModelConfig keys}, "train": {...TrainConfig keys}, "layouts": {name: plan spelling},
"steps": S}. The batches are seeded random tokens, the same on every layout: step s, global micro-batch g.
"""

import json
import sys
from pathlib import Path

import torch

from minigpt.core.config import Config, ModelConfig, TrainConfig
from minigpt.core.plan import ParallelPlan
from minigpt.nn.model import GPT
from minigpt.parallel.backends import make_backend, resolve_plan
from minigpt.parallel.distributed import all_reduce_mean, init_distributed
from minigpt.parallel.parallelize import parallelize


def global_batches(c: ModelConfig, tc: TrainConfig, step: int, count: int) -> list:
    """The step's `count` micro-batches, each (x, y) of micro_batch_size x block_size tokens."""
    out = []
    for g in range(count):
        gen = torch.Generator().manual_seed(1000 * step + g)
        t = torch.randint(0, c.vocab_size, (tc.micro_batch_size, c.block_size + 1), generator=gen)
        out.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
    return out


def run_layout(cfg, spelling: str, env, steps: int) -> dict:
    plan = resolve_plan(ParallelPlan.parse(spelling, env.world_size))
    count = cfg.train.batch_size_tokens // (cfg.train.micro_batch_size * cfg.model.block_size)
    torch.manual_seed(cfg.train.seed)
    backend = make_backend(parallelize(GPT(cfg.model), plan, cfg.train, env.device), cfg, env, plan)
    per_dp = count // plan.dp
    mine = slice(plan.dp_rank(env.rank) * per_dp, (plan.dp_rank(env.rank) + 1) * per_dp)
    losses, norms = [], []
    for step in range(steps):
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


def main() -> None:
    out, spec = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    env = init_distributed("cpu")
    cfg = config(spec)
    for name, spelling in spec["layouts"].items():
        result = run_layout(cfg, spelling, env, spec["steps"])
        if env.is_main:
            torch.save(result, out / f"{name}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

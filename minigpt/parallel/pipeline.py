"""Pipeline parallelism through torch.distributed.pipelining (GPipe, 1F1B, interleaved 1F1B, ZB-V).

    stages       the model's layers split into pp x stages_per_rank chunks, as evenly as the layers
                 allow (earlier stages take the extra layer: the last one also runs the head); the
                 token embedding sits on the first, the final norm, LM head and loss on the last
    ranks        a looped schedule puts chunks r, r+p, r+2p, ... on pipeline rank r (interleaved
                 1F1B, Narayanan et al. 2021); ZB-V (Qi et al. 2024) puts chunks r and 2p-1-r
    mesh         the plan's (pp, dp_replicate, dp_shard, tp) mesh: each chunk is tensor-parallel over
                 "tp" and FSDP2-sharded over "dp_shard" or replicated over "dp_replicate" (engine ddp:
                 gradients all-reduced after the schedule), applied
                 chunk by chunk in parallelize()'s order (TP -> AC -> compile -> FSDP)
    tied head    a tied LM head is a separate copy on the last stage: the two copies' gradients are
                 summed over the pipeline group after every step (Megatron-LM's embedding group), so
                 they stay equal; checkpoints keep the embedding once, as any run does

The schedule runs every micro-batch of a step (`step`); its gradients are scaled by 1/m, the mean
over micro-batches that gradient accumulation takes. Between stages each rank sends its activation
(B, T, C) forward and its gradient back, once per micro-batch; with sequence parallelism a rank's
sequence shard (B, T/tp, C), so a boundary carries s*b*h elements per micro-batch in each direction
whatever tp is (Megatron-LM's scatter-gather does the same without SP; here it is not done).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minigpt.core.config import Config, ModelConfig
from minigpt.core.errors import UserError
from minigpt.core.plan import BatchLayout, ParallelPlan
from minigpt.nn.model import GPT, AuxLossCarrier, embed_tokens, rope_rows
from minigpt.nn.optim import DTYPES, StepResult, autocast_context
from minigpt.nn.weights import read_weights
from minigpt.parallel.backend import Backend, states_saved_by_sharding
from minigpt.parallel.distributed import DistEnv, all_reduce_mean_flat
from minigpt.parallel.expert import ExpertGroups, check_expert_settings
from minigpt.parallel.sharding import (
    ShardedBackend,
    from_tp_layout,
    grad_norm,
    map_optimizer_state,
    shards_parameters,
    to_tp_layout,
)


def schedule_class(name: str):
    """The torch.distributed.pipelining schedule (imported here: it loads torch's compiler stack, ~1.4 s)."""
    from torch.distributed import pipelining

    return {"gpipe": pipelining.ScheduleGPipe, "1f1b": pipelining.Schedule1F1B,
            "interleaved-1f1b": pipelining.ScheduleInterleaved1F1B, "zbv": pipelining.ScheduleZBVZeroBubble}[name]


def stage_layers(n_layer: int, stages: int) -> list[range]:
    """The layers of each stage: n_layer split as evenly as it goes, earlier stages one more."""
    base, extra = divmod(n_layer, stages)
    sizes = [base + (1 if i < extra else 0) for i in range(stages)]
    starts = [sum(sizes[:i]) for i in range(stages)]
    return [range(s, s + n) for s, n in zip(starts, sizes)]


def rank_stages(plan: ParallelPlan, pp_rank: int) -> list[int]:
    """The stage indices pipeline rank `pp_rank` runs, in the schedule's placement."""
    p = plan.pp
    if plan.schedule == "zbv":
        return [pp_rank, 2 * p - 1 - pp_rank]
    return [pp_rank + i * p for i in range(plan.stages_per_rank)]


class Stage(nn.Module):
    """A chunk of a GPT's layers, holding the GPT's own modules under the GPT's names, so parameter
    names (and so checkpoints) are the model's: first stage ids -> hidden, middle hidden -> hidden,
    last hidden -> logits (fp32; the loss is the schedule's loss_fn). `seq_shards` > 1: hidden states
    travel as the rank's sequence shard (sequence parallelism). The boundary's dtype is the residual
    stream's (`boundary_dtype`)."""

    def __init__(self, model: GPT, layers: range, first: bool, last: bool, precision: str, device: torch.device,
                 aux_coef: float = 0.0) -> None:
        super().__init__()
        self.config, self.precision, self.device_type = model.config, precision, device
        self.aux_coef = aux_coef  # a mixture's load-balancing loss weight (train.moe_aux_loss_coef)
        self.first, self.last, self.seq_shards = first, last, 1
        self.wte, self.wpe = (model.wte, model.wpe) if first else (None, None)
        self.drop = model.drop
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        self.ln_f, self.lm_head = (model.ln_f, model.lm_head) if last else (None, None)
        if model.config.pos_emb == "rope":
            self.register_buffer("rope_cos", model.rope_cos, persistent=False)
            self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_context(self.device_type, self.precision):
            T = x.size(1) * (1 if self.first else self.seq_shards)
            positions = torch.arange(T, device=x.device).unsqueeze(0)
            if self.first:
                x = embed_tokens(self.wte, self.wpe, self.drop, x, positions)
            rope = rope_rows(self, positions)
            for block in self.blocks.values():
                x, aux = block(x, rope, None, None, None)
                if aux is not None and self.aux_coef and torch.is_grad_enabled():  # its gradient rides on x's
                    x = AuxLossCarrier.apply(x, aux, self.aux_coef)
            if self.last:
                return self.lm_head(self.ln_f(x), None).float()
        return x  # the residual stream as it is: fp32, or 16-bit when FSDP computes in 16-bit parameters


class RankModel(nn.Module):
    """This rank's stages under the GPT's names: what state dicts, the optimizer and evaluation see."""

    def __init__(self, stages: list[Stage]) -> None:
        super().__init__()
        self.config = stages[0].config
        self.blocks = nn.ModuleDict({k: v for s in stages for k, v in s.blocks.items()})
        for s in stages:
            for name in ("wte", "wpe", "ln_f", "lm_head"):
                if getattr(s, name) is not None:
                    setattr(self, name, getattr(s, name))
        self.stages = stages  # a plain list: the chunks are not registered twice


def split_model(model: GPT, plan: ParallelPlan, pp_rank: int, precision: str, device: torch.device,
                aux_coef: float = 0.0) -> RankModel:
    """This pipeline rank's chunks of `model` (built whole, equal on every rank, then cut). A mixture's
    load-balancing loss (weight aux_coef) reaches each stage's routers through AuxLossCarrier."""
    c = model.config
    layers = stage_layers(c.n_layer, plan.stages)
    if c.tie_embeddings:  # the last stage's head becomes a copy; its gradient is summed with the embedding's
        model.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())
    stages = [Stage(model, layers[i], i == 0, i == plan.stages - 1, precision, device, aux_coef)
              for i in rank_stages(plan, pp_rank)]
    return RankModel(stages).to(device)


def boundary_dtype(plan: ParallelPlan, precision: str) -> torch.dtype:
    """The residual stream's dtype, which stages send: fp32 parameters keep it fp32 under autocast; FSDP2
    gathering 16-bit parameters makes it 16-bit."""
    return DTYPES[precision] if shards_parameters(plan) and precision != "fp32" else torch.float32


def schedule_problem(plan: ParallelPlan, m: int) -> str | None:
    """Why the plan's schedule cannot run m micro-batches per step, or None (torch 2.13's rules)."""
    if plan.schedule == "1f1b" and m < plan.pp:
        return f"the 1f1b schedule needs at least pp = {plan.pp} micro-batches per step, not {m}"
    if plan.schedule in ("interleaved-1f1b", "zbv") and m % plan.pp:
        return f"the {plan.schedule} schedule needs the micro-batches per step ({m}) to be a multiple of pp = {plan.pp}"
    return None


def describe_split(c: ModelConfig, plan: ParallelPlan) -> str:
    sizes = [len(r) for r in stage_layers(c.n_layer, plan.stages)]
    uneven = "" if len(set(sizes)) == 1 else " (uneven: the layers do not divide by the stages)"
    return f"{plan.stages} pipeline stages of {'+'.join(map(str, sizes))} layers{uneven}"


# ----------------------------------------------------------------------------------------------
# the backend


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The last stage's loss: mean cross-entropy (nats) over the micro-batch's targets (-1 ignored)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class PipelineBackend(ShardedBackend):
    """pp > 1: a torch.distributed.pipelining schedule over this rank's chunks, each tensor-parallel
    and FSDP2-sharded (engine fsdp) or replicated (engine ddp) as the plan says."""

    runs_muon = False  # not tried with a pipeline's stages

    @classmethod
    def resolve(cls, plan: ParallelPlan) -> ParallelPlan:
        if plan.ep > 1 and (plan.tp > 1 or plan.zero or plan.backend == "fsdp"):
            raise UserError(f"expert parallelism with pipeline stages runs on the pipeline's replicas (backend=ddp, "
                            f"zero=0, no tp) here; this plan is {plan.describe()}")
        if plan.backend == "deepspeed":
            raise UserError(f"pipeline parallelism (pp={plan.pp}) runs on the torch engines: use backend=ddp (zero=0) "
                            f"or backend=fsdp (zero=3) for its data-parallel part")
        if plan.backend == "ddp" and plan.tp > 1 and plan.dp > 1:
            raise UserError(f"pp={plan.pp} x tp={plan.tp} x dp={plan.dp} shards the data-parallel part with FSDP2: use "
                            f"backend=fsdp (zero=3)")
        if plan.backend == "ddp" and plan.zero:
            raise UserError(f"backend=ddp replicates the model states (zero=0); zero={plan.zero} with pipeline "
                            f"parallelism needs backend=fsdp (zero=3)")
        return dataclasses.replace(ShardedBackend.resolve(dataclasses.replace(plan, dp=1)), dp=plan.dp)

    @classmethod
    def check(cls, cfg: Config, plan: ParallelPlan, device: torch.device) -> None:
        super().check(cfg, plan, device)
        plan.check_model(cfg.model, world_known=False)
        if plan.ep > 1:
            check_expert_settings(cfg)

    @classmethod
    def check_layout(cls, plan: ParallelPlan, layout: BatchLayout) -> None:
        problem = schedule_problem(plan, layout.accum)
        if problem:
            raise UserError(f"{problem}: raise train.batch_size_tokens or lower train.micro_batch_size")
        if plan.sp and layout.block_size % plan.tp:
            raise UserError(f"sequence parallelism splits block_size = {layout.block_size} over tp = {plan.tp}: choose "
                            f"a block_size that divides by it")

    @classmethod
    def memory_need(cls, cfg: Config, plan: ParallelPlan, layout: BatchLayout) -> float:
        """Model states of this rank's 1/pp of the layers, divided over dp x tp (FSDP) or tp."""
        shards = plan.pp * (plan.dp * plan.tp if shards_parameters(plan) else plan.tp)
        return Backend.memory_need(cfg, plan, layout) - states_saved_by_sharding(cfg, shards)

    def __init__(self, model: RankModel, cfg: Config, env: DistEnv, plan: ParallelPlan) -> None:
        super().__init__(model, cfg, env, plan)
        mesh = model.mesh
        self.pp_group, self.pp_rank = mesh["pp"].get_group(), mesh["pp"].get_local_rank()
        self.micro_batches = plan.batch_layout(cfg.train, cfg.model.block_size).accum
        ids = rank_stages(plan, self.pp_rank)
        self.first, self.last = 0 in ids, plan.stages - 1 in ids
        self.dp_group = mesh["dp_replicate"].get_group() if plan.dp > 1 and not self.fsdp else None
        from torch.distributed.pipelining import PipelineStage

        stages = [PipelineStage(s, i, plan.stages, env.device, group=self.pp_group)
                  for i, s in zip(ids, model.stages)]
        schedule = schedule_class(plan.schedule)
        self.schedule = schedule(stages if plan.stages_per_rank > 1 else stages[0], n_microbatches=self.micro_batches,
                                 loss_fn=_cross_entropy)
        self.tied_group = self._tied_group() if cfg.model.tie_embeddings else None
        self.experts = ExpertGroups(model, plan) if plan.ep > 1 else None  # each stage's experts over ep replicas

    def _all_reduce_replicas(self) -> None:
        """Engine ddp, dp > 1: the replicas' gradients averaged in one flat bucket after the schedule (DDP's
        reducer does not accept a schedule's interleaved backwards in torch 2.13; no overlap with them)."""
        experts = self.experts.names if self.experts else set()
        grads = [p.grad for n, p in self.model.named_parameters() if p.grad is not None and n not in experts]
        if self.experts:
            self.experts.reduce_grads()
        all_reduce_mean_flat(grads, self.dp_group, self.plan.dp)

    def _tied_group(self):
        """The group of the first and the last stage's ranks of this rank's (dp, tp) column; every rank
        creates every column's group (new_group is collective), and keeps its own. None: one rank holds
        both (ZB-V), or this rank holds neither."""
        p, column, mine = self.plan.pp, self.env.rank % (self.plan.dp * self.plan.tp), None
        last_rank = 0 if self.plan.schedule == "zbv" else p - 1
        for col in range(self.plan.dp * self.plan.tp):
            if last_rank == 0:
                break
            group = dist.new_group([col, last_rank * self.plan.dp * self.plan.tp + col])
            if col == column and self.pp_rank in (0, last_rank):
                mine = group
        return mine

    def _sum_tied_grads(self) -> None:
        """The embedding's and the head copy's gradients summed where they live (Megatron's embedding
        group): both then hold the gradient of the one tied matrix."""
        held = [getattr(self.model, n).weight for n in ("wte", "lm_head") if getattr(self.model, n, None) is not None]
        if not self.cfg.model.tie_embeddings or not held:
            return
        total = sum(_local(p.grad) for p in held)
        if self.tied_group is not None:
            dist.all_reduce(total, group=self.tied_group)
        for p in held:
            _local(p.grad).copy_(total)

    # the step ----------------------------------------------------------------------------------

    def run_schedule(self, micro_batches: list) -> list:
        """The schedule's forward and backward of every micro-batch (gradients scaled by 1/m); the last
        stage's per-micro-batch losses (empty elsewhere). The optimizer's work is not in it."""
        x, y = (torch.cat(t) for t in zip(*micro_batches))
        losses: list = []
        self.schedule.step(*((x,) if self.first else ()), target=y if self.last else None, losses=losses,
                           return_outputs=False)
        return losses

    def step(self, micro_batches: list) -> tuple[torch.Tensor, StepResult]:
        """The schedule over every micro-batch of the step; the loss (the last stage's) shared with the
        pipeline group."""
        losses = self.run_schedule(micro_batches)
        if self.dp_group is not None:
            self._all_reduce_replicas()
        self._sum_tied_grads()
        device = micro_batches[0][0].device
        loss = torch.stack(losses).detach().mean() if self.last else torch.zeros((), device=device)
        dist.all_reduce(loss, group=self.pp_group)
        return loss, self.optimizer_step()

    def grad_norm(self) -> torch.Tensor:
        """The norm of every stage's gradients, the tied head's copy counted once (clipped by, as
        ShardedBackend.optimizer_step does)."""
        head = getattr(self.model, "lm_head", None) if self.cfg.model.tie_embeddings else None
        experts = set(map(id, self.experts.params)) if self.experts else set()
        counted = [p for p in self.params if (head is None or p is not head.weight) and id(p) not in experts]
        square = grad_norm(counted) ** 2 + (self.experts.square() if self.experts else 0)
        dist.all_reduce(square, group=self.pp_group)
        return square.sqrt()

    def eval_losses(self, batches: list) -> torch.Tensor:
        """The mean loss of each micro-batch, on every rank: a forward pass stage by stage, activations
        sent point to point (torch 2.13's ZB-V schedule cannot run forward only, so no schedule is used)."""
        p, S = self.plan.pp, self.plan.stages
        owner = {s: r for r in range(p) for s in rank_stages(self.plan, r)}
        mine = dict(zip(rank_stages(self.plan, self.pp_rank), self.model.stages))
        out = []
        for x, y in batches:
            h = x
            for s in sorted(mine):
                if s > 0 and owner[s - 1] != self.pp_rank:
                    h = torch.empty(x.size(0), x.size(1) // mine[s].seq_shards, self.cfg.model.n_embd, device=x.device,
                                    dtype=boundary_dtype(self.plan, self.tc.precision))
                    dist.recv(h, group=self.pp_group, group_src=owner[s - 1])
                h = mine[s](h)
                if s == S - 1:
                    out.append(_cross_entropy(h, y))
                elif owner[s + 1] != self.pp_rank:
                    dist.send(h.contiguous(), group=self.pp_group, group_dst=owner[s + 1])
            if not self.last:
                out.append(torch.zeros((), device=x.device))
        losses = torch.stack(out).float()
        dist.all_reduce(losses, group=self.pp_group)
        return losses

    # state: the ordinary layout, gathered from every stage --------------------------------------

    def _gather(self, obj) -> list | None:
        """Collective. Each stage's `obj` (from its dp 0, tp 0 rank) on rank 0, in stage order."""
        if self.env.rank % (self.plan.dp * self.plan.tp):
            return None
        out = [None] * self.plan.pp if self.env.is_main else None
        dist.gather_object(obj, out, group=self.pp_group, group_dst=0)
        return out

    def _untie(self, names) -> set:
        return {n for n in names if not (self.cfg.model.tie_embeddings and n == "lm_head.weight")}

    def full_state_dict(self) -> dict | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))  # collective in dp, tp
        sd = from_tp_layout({k: v.detach().cpu() for k, v in sd.items() if k in self._untie(sd)}, self.cfg.model, self.tp)
        if self.experts:  # every expert of the stage, on its ep group's first rank
            sd = self.experts.gather(sd)
        parts = self._gather(sd)
        return None if parts is None or not self.env.is_main else {k: v for part in parts for k, v in part.items()}

    def save_state(self, folder: Path) -> dict:
        """The optimizer state whole, in the ordinary layout (names and row order of a one-process run)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(full_state_dict=True))
        keep = self._untie(osd["state"])
        osd = {"state": {k: {n: v.cpu() if torch.is_tensor(v) else v for n, v in s.items()}
                         for k, s in osd["state"].items() if k in keep},
               "param_groups": [{**g, "params": [p for p in g["params"] if p in keep]} for g in osd["param_groups"]]}
        if self.experts:  # every expert's state, in the ordinary layout, on the ep group's first rank
            state = self.experts.gather(osd["state"])
            names = [self.experts.gather(dict.fromkeys(g["params"])) for g in osd["param_groups"]]
            osd = state and {"state": state, "param_groups": [{**g, "params": list(n)}
                                                              for g, n in zip(osd["param_groups"], names)]}
        mapped = osd and map_optimizer_state(osd, lambda sd: from_tp_layout(sd, self.cfg.model, self.tp))
        parts = self._gather(mapped)  # None but on each stage's first rank (with ep: its ep group's first)
        if parts is None or not self.env.is_main:
            return {}
        groups = [{**g, "params": [p for part in parts for p in part["param_groups"][i]["params"]]}
                  for i, g in enumerate(parts[0]["param_groups"])]
        return {"optimizer": {"state": {k: v for part in parts for k, v in part["state"].items()}, "param_groups": groups},
                "pipeline_parallel": self.plan.pp, "expert_parallel": self.plan.ep}

    def load_state(self, folder: Path, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        c, tied = self.cfg.model, self.cfg.model.tie_embeddings
        mine = set(self.model.state_dict())
        weights = read_weights(folder)
        if tied:
            weights.setdefault("lm_head.weight", weights["wte.weight"])
        if self.experts:  # this rank's experts, renumbered from 0
            weights = self.experts.local(weights)
        weights = {k: v for k, v in weights.items() if k in mine}
        set_model_state_dict(self.model, to_tp_layout(weights, c, self.tp), options=StateDictOptions(full_state_dict=True))
        osd = state["optimizer"]
        osd_state = dict(self.experts.local(osd["state"]) if self.experts else osd["state"])
        groups = [dict(g, params=self.experts.local_names(g["params"]) if self.experts else list(g["params"]))
                  for g in osd["param_groups"]]
        if tied and "lm_head.weight" in mine:
            osd_state["lm_head.weight"] = osd_state.get("wte.weight", {})
            next(g for g in groups if "wte.weight" in g["params"])["params"].append("lm_head.weight")
        osd = {"state": {k: v for k, v in osd_state.items() if k in mine},
               "param_groups": [{**g, "params": [p for p in g["params"] if p in mine]} for g in groups]}
        osd = map_optimizer_state(osd, lambda sd: to_tp_layout(sd, c, self.tp))
        set_optimizer_state_dict(self.model, self.optimizer, osd, options=StateDictOptions(full_state_dict=True))

    def describe(self) -> str:
        dp = ""
        if self.plan.dp > 1:
            dp = f", FSDP2 over {self.plan.dp} rank(s)" if self.fsdp else f", replicas over {self.plan.dp} rank(s) (gradients all-reduced)"
        tp = f", tensor parallel {self.tp}" + (" + sequence parallel" if self.plan.sp else "") if self.tp > 1 else ""
        tp += f", {self.cfg.model.n_expert} experts over ep {self.plan.ep}" if self.experts else ""
        return (f"pipeline {self.plan.pp} ({self.plan.schedule}, {describe_split(self.cfg.model, self.plan)}, "
                f"{self.micro_batches} micro-batches per step){dp}{tp}")

"""Expert parallelism: a mixture of experts' experts sharded over an "ep" group, tokens sent to them and
back with all-to-all (GShard, Lepikhin et al. 2020; Switch Transformer, Fedus et al. 2021).

Each of the ep ranks holds n_expert / ep experts (contiguous: rank r holds r*E/ep ...). A rank routes its
own tokens (the router is replicated), sorts its N*k routed slots by expert, and sends each rank the
slots of that rank's experts (one all-to-all of the slot counts, one of the hidden states); the experts
run on what arrived, and a second all-to-all returns the outputs, which are weighted and summed as the
dense MoE does. Backward reverses both all-to-alls. Per MoE layer a rank sends N*k*C values (ep-1)/ep of
them leave the rank under balanced routing: 4 such transfers per step (2 forward, 2 backward). With tensor
parallelism the tp ranks route the same tokens and each sends 1/tp of the slots (_dispatch_tp_share), as
Megatron-Core's dispatch sends each tp rank's sequence-parallel share.

On fake tensors (minigpt simulate) routing has no data: every expert gets an equal share of the slots,
as the dense MoE assumes, and the count exchange (E integers) is not run.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minigpt.core.errors import UserError
from minigpt.core.plan import ParallelPlan, check_tensor_parallel
from minigpt.nn.model import MoE, count_step_load, grouped_experts_ok, grouped_mlp, has_no_data
from minigpt.nn.ops import activation_dtype
from minigpt.nn.optim import Optimizers, StepResult
from minigpt.nn.torch_private import all_to_all_autograd, ddp_ignore
from minigpt.nn.weights import assign_weights, read_weights, weights_of
from minigpt.parallel.backend import Backend
from minigpt.parallel.ddp import TorchBackend
from minigpt.parallel.distributed import all_reduce_mean_flat
from minigpt.parallel.sharding import from_tp_layout, grad_norm, load_whole_weights


class ExpertParallelMoE(nn.Module):
    """A MoE whose experts are split over ep_mesh; the same outputs, load-balancing loss and routing options (the
    capacity factor, dropping past-capacity slots on the sending rank; the auxiliary-loss-free bias; grouped
    matrix multiplies for the local experts)."""

    def __init__(self, moe: MoE, ep_mesh, tp_mesh=None) -> None:
        super().__init__()
        self.n_expert, self.k, self.ep = moe.n_expert, moe.k, ep_mesh.size()
        self.capacity_factor, self.bias_rate, self.grouped = moe.capacity_factor, moe.bias_rate, moe.grouped
        self.local = moe.n_expert // self.ep
        first = ep_mesh.get_local_rank() * self.local
        self.router = moe.router
        self.experts = nn.ModuleList(moe.experts[first:first + self.local])
        if self.bias_rate:  # replicated, as the router: every rank moves it alike (nn/model.update_router_bias)
            self.register_buffer("router_bias", moe.router_bias.clone())
        self.group = ep_mesh.get_group()
        # with tp > 1 each tp rank dispatches a share of the (replicated) routed slots: see _tp_share
        self.tp = tp_mesh.size() if tp_mesh is not None else 1
        self.tp_group, self.tp_rank = (tp_mesh.get_group(), tp_mesh.get_local_rank()) if self.tp > 1 else (None, 0)
        self.stats: dict[str, torch.Tensor] = {}

    # eager under torch.compile (a graph break at each MoE layer; the rest of the block compiles): the exchanged slot
    # counts become Python ints that size the all-to-alls, which dynamo cannot trace (a data-dependent error)
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        flat = x.reshape(-1, C)
        N = flat.size(0)
        probs, weights, chosen = self._route(flat)
        slot_expert = chosen.reshape(-1)  # (N*k,)
        order, kept = self._kept(slot_expert, N)  # slots grouped by expert, so by the rank that holds it
        counts, received = self._counts(kept, N)
        rows = flat[order // self.k]
        if self.tp > 1:
            done, send, recv = self._dispatch_tp_share(rows, counts, received)
        else:
            send = [sum(counts[r * self.local:(r + 1) * self.local]) for r in range(self.ep)]
            recv = [sum(c) for c in received]
            arrived = all_to_all_autograd(rows, recv, send, self.group)
            done = all_to_all_autograd(self._run_experts(arrived, received), send, recv, self.group)
        out = torch.zeros(N, C, device=flat.device, dtype=activation_dtype(flat))
        w = weights.reshape(-1)[order].unsqueeze(-1)
        out.index_add_(0, order // self.k, (done * w.to(done.dtype)).to(out.dtype))
        routed = F.one_hot(chosen, self.n_expert).sum(dim=(0, 1)).float() / (N * self.k)
        aux = self.n_expert * (routed * probs.mean(dim=0)).sum()
        if self.training and not has_no_data(flat):  # this rank's tokens, as the dense MoE's (nn/model.routing_stats)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean()
            self.stats = {"load": routed.detach(), "dropped": torch.tensor(1 - sum(counts) / (N * self.k)),
                          "entropy": entropy.detach(), **self._traffic(send, recv, N, C * flat.element_size())}
            count_step_load(self, routed)
        return out.view(B, T, C), aux

    def _route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router probabilities, each token's k normalised weights, its k experts), as the dense MoE routes."""
        probs = self.router(flat).float().softmax(dim=-1)  # (N, E)
        if self.bias_rate:  # the bias picks the experts; the weights stay the router's (DeepSeek-V3)
            chosen = (probs + self.router_bias).topk(self.k, dim=-1).indices
            weights = probs.gather(1, chosen)
        else:
            weights, chosen = probs.topk(self.k, dim=-1)
        return probs, weights / weights.sum(dim=-1, keepdim=True), chosen

    def _kept(self, slot_expert: torch.Tensor, N: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The slots sorted by expert (stable: token order within one) with past-capacity ones dropped (each expert
        keeps its first ceil(factor N k / E) slots of this rank's tokens, as the dense MoE does per forward), and the
        slots kept per expert (None on fake tensors: simulate's balanced shares)."""
        order = slot_expert.argsort(stable=True)
        if has_no_data(slot_expert):
            return order, None
        counts = torch.bincount(slot_expert, minlength=self.n_expert)
        if self.capacity_factor:
            capacity = math.ceil(self.capacity_factor * N * self.k / self.n_expert)
            first = torch.cumsum(counts, 0) - counts  # each expert's first position in `order`
            rank = torch.arange(order.numel(), device=order.device) - first[slot_expert[order]]
            order, counts = order[rank < capacity], counts.clamp(max=capacity)
        return order, counts

    def _traffic(self, send: list[int], recv: list[int], N: int, row: int) -> dict[str, torch.Tensor]:
        """Bytes this rank's all-to-alls sent to other ranks in this forward and its backward (the rows that left
        for other ranks' experts and the outputs returned to theirs, both again transposed in the backward),
        beside the formula for balanced routing: 4 N k C (ep - 1) / ep (N tokens, C wide), over tp (_tp_share)."""
        me = dist.get_rank(self.group)
        sent = (sum(send) - send[me] + sum(recv) - recv[me]) * row * 2
        formula = 4 * N * self.k * row * (self.ep - 1) / self.ep / self.tp
        return {"all_to_all_bytes": torch.tensor(float(sent)), "all_to_all_bytes_formula": torch.tensor(formula)}

    def _counts(self, counts_t: torch.Tensor | None, N: int) -> tuple[list[int], list[list[int]]]:
        """This rank's slots per expert (E ints), and the slots each source rank sends this rank's experts
        (ep lists of E/ep ints): exchanged with an all-to-all, or balanced shares on fake tensors (None)."""
        E, L = self.n_expert, self.local
        if counts_t is None:
            counts = [N * self.k // E + (1 if e < N * self.k % E else 0) for e in range(E)]
            mine = dist.get_rank(self.group) * L
            return counts, [counts[mine:mine + L] for _ in range(self.ep)]
        received = torch.empty_like(counts_t)
        dist.all_to_all_single(received, counts_t, group=self.group)
        return counts_t.tolist(), received.view(self.ep, L).tolist()

    def _dispatch_tp_share(self, rows: torch.Tensor, counts: list[int], received: list[list[int]]):
        """Expert parallelism with tensor parallelism: the tp ranks route the same tokens (replicated, so routing,
        capacity, the auxiliary loss and the router's gradient are one process's), and each dispatches only its
        share of every expert's slots (_tp_share), so the all-to-alls carry each slot once, not tp times. The
        shares that arrive are gathered over tp for the tensor-parallel experts, each tp rank returns its share of
        their outputs, and the returned shares are gathered back: Megatron's gather / scatter over the tensor-
        parallel region, whose backward is the other (_GatherRows, _SplitRows). -> (outputs in `rows`' order,
        rows sent to each ep rank, rows received from each)."""
        t, me = self.tp, self.tp_rank
        perm, shares = _tp_share(counts, t)
        perm = perm.to(rows.device)
        mine = _SplitRows.apply(rows[perm], shares, me, self.tp_group)  # this rank's share, in expert order
        counts_me = [_share(c, t, me) for c in counts]
        send = [sum(counts_me[r * self.local:(r + 1) * self.local]) for r in range(self.ep)]
        recv = [sum(_share(c, t, me) for c in source) for source in received]
        arrived = all_to_all_autograd(mine, recv, send, self.group)
        sources = [[_share(c, t, r) for c in source] for r in range(t) for source in received]
        sizes = [sum(_share(c, t, r) for source in received for c in source) for r in range(t)]
        ys = self._run_experts(_GatherRows.apply(arrived, sizes, me, self.tp_group), sources)
        done = all_to_all_autograd(_SplitRows.apply(ys, sizes, me, self.tp_group), send, recv, self.group)
        return _GatherRows.apply(done, shares, me, self.tp_group)[perm.argsort()], send, recv

    def _run_experts(self, arrived: torch.Tensor, received: list[list[int]]) -> torch.Tensor:
        """The local experts on the rows that arrived (source by source, expert by expert within each),
        their outputs put back in the order the rows came: one expert at a time, or (model.moe_grouped_mm, where
        torch can) every local expert in two grouped matrix multiplies over the rows regrouped by expert."""
        pieces = list(arrived.split([c for source in received for c in source]))
        L = self.local
        by_expert = [[pieces[s * L + j] for s in range(len(received))] for j in range(L)]
        if self.grouped and grouped_experts_ok(self.experts) and (
                arrived.device.type != "cuda" or activation_dtype(arrived) == torch.bfloat16):
            counts = torch.tensor([sum(r.size(0) for r in rows) for rows in by_expert], device=arrived.device)
            ys = grouped_mlp(self.experts, torch.cat([r for rows in by_expert for r in rows]), counts)
            ys = list(ys.split(counts.tolist()))
        else:
            ys = [expert(torch.cat(rows)) for expert, rows in zip(self.experts, by_expert)]
        for j, (y, rows) in enumerate(zip(ys, by_expert)):
            for s, part in enumerate(y.split([r.size(0) for r in rows])):
                pieces[s * L + j] = part
        return torch.cat(pieces)


def _share(count: int, t: int, r: int) -> int:
    """Tensor-parallel rank r's share of `count` slots: the first count % t ranks take one more."""
    return count // t + (1 if r < count % t else 0)


def _share_start(count: int, t: int, r: int) -> int:
    """Where rank r's share of `count` consecutive slots starts (the shares of ranks 0..r-1 before it)."""
    return r * (count // t) + min(r, count % t)


def _tp_share(counts: list[int], t: int) -> tuple[torch.Tensor, list[int]]:
    """The slots sorted by expert (counts[e] of expert e, contiguous), cut per expert into t consecutive shares:
    (the permutation putting tp rank 0's shares first, then rank 1's, ...; the number of slots of each rank)."""
    starts = [sum(counts[:e]) for e in range(len(counts))]
    index = [torch.arange(s + _share_start(c, t, r), s + _share_start(c, t, r) + _share(c, t, r))
             for r in range(t) for s, c in zip(starts, counts)]
    return torch.cat(index), [sum(_share(c, t, r) for c in counts) for r in range(t)]


def _all_gather_rows(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Every rank's rows (sizes[r] of them on rank r) in rank order, on every rank: padded to the largest share,
    as an all-gather needs, and cut back."""
    most = max(sizes)
    padded = torch.cat([x, x.new_zeros((most - x.size(0), *x.shape[1:]))]) if x.size(0) < most else x.contiguous()
    parts = [x.new_empty((most, *x.shape[1:])) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    """Forward: each tp rank's rows gathered on every rank; backward: this rank's rows of the gradient (every tp
    rank computes the same loss from the gathered rows)."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.span = (sum(sizes[:rank]), sizes[rank])
        return _all_gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        start, n = ctx.span
        return grad[start:start + n], None, None, None


class _SplitRows(torch.autograd.Function):
    """Forward: this tp rank's block of rows every rank holds alike; backward: every block's gradient gathered."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.group = sizes, group
        start = sum(sizes[:rank])
        return x[start:start + sizes[rank]].clone()

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_rows(grad.contiguous(), ctx.sizes, ctx.group), None, None, None


def apply_expert_parallel(model: nn.Module, ep_mesh, tp_mesh=None) -> nn.Module:
    """Replace every block's MoE with its expert-parallel form over ep_mesh (in place); with a tp_mesh of more than
    one rank, each tp rank dispatches its share of the slots (ExpertParallelMoE._dispatch_tp_share)."""
    from minigpt.parallel.sharding import layers

    for block in layers(model):
        if isinstance(block.mlp, MoE):
            block.mlp = ExpertParallelMoE(block.mlp, ep_mesh, tp_mesh)
    return model


# training ------------------------------------------------------------------------------------------------------


def expert_mesh(plan, device_type: str):
    """(pipeline stages, ranks holding the same experts, the ep ranks splitting them, a tensor-parallel group):
    ep innermost after tp (the plan's rank order: rank = (pp_i * dp + dp_i) * tp + tp_i with dp_i = edp_i * ep +
    ep_i), so ranks a tp group apart (a node's neighbours) exchange tokens, as Megatron-Core and torchtitan place
    them; each tp index has its own ep groups."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (plan.pp, plan.dp // plan.ep, plan.ep, plan.tp),
                            mesh_dim_names=("stage", "edp", "ep", "tp"))


def check_expert_settings(cfg) -> None:
    """What expert parallelism runs here, said before anything is built."""
    tc = cfg.train
    if tc.precision == "fp16":
        raise UserError("expert parallelism runs in fp32 or bf16 here: set train.precision to one of them")
    if tc.objective != "lm" or tc.distill_from or tc.lora_rank:
        raise UserError("expert parallelism pre-trains (train.objective = 'lm', no distillation or LoRA) here")


EXPERT = re.compile(r"^(blocks\.\d+\.mlp\.experts\.)(\d+)(\..*)$")


def renumber(weights: dict, offset: int) -> dict:
    """Expert names shifted by `offset` (a rank's local expert j is the model's expert offset + j)."""
    out = {}
    for name, t in weights.items():
        m = EXPERT.match(name)
        out[f"{m[1]}{int(m[2]) + offset}{m[3]}" if m else name] = t
    return out


def local_experts(weights: dict, first: int, count: int) -> dict:
    """The ordinary layout's weights with only experts first..first+count-1, renumbered from 0."""
    out = {}
    for name, t in weights.items():
        m = EXPERT.match(name)
        if m is None:
            out[name] = t
        elif first <= int(m[2]) < first + count:
            out[f"{m[1]}{int(m[2]) - first}{m[3]}"] = t
    return out


class ExpertGroups:
    """A rank's expert-parallel groups and the gradient, norm and state rules every backend with ep > 1 applies:
    an expert's gradient (already summed over the ep ranks by the all-to-all's backward) summed over the ranks
    holding the same expert and divided by dp; squares summed over the ep group so every expert counts once;
    state dicts gathered over the ep group into the ordinary layout (every expert under its index in the model)."""

    def __init__(self, model: nn.Module, plan: ParallelPlan) -> None:
        self.mesh, self.dp = model.expert_mesh, plan.dp
        self.count = model.config.n_expert // plan.ep
        self.first = self.mesh["ep"].get_local_rank() * self.count
        self.names = {n for n, _ in model.named_parameters() if EXPERT.match(n)}
        self.params = [p for n, p in model.named_parameters() if n in self.names]

    def reduce_grads(self) -> None:
        from torch.distributed.tensor import DTensor

        edp = self.mesh["edp"]
        for p in self.params:
            if p.grad is not None:
                g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad  # a tensor-parallel slice
                if edp.size() > 1:
                    dist.all_reduce(g, group=edp.get_group())
                g.div_(self.dp)

    def square(self) -> torch.Tensor:
        """The square of this ep group's expert gradient norm (tensor-parallel slices counted whole)."""
        mine = grad_norm(self.params).float().pow(2)
        dist.all_reduce(mine, group=self.mesh["ep"].get_group())
        return mine

    def gather(self, named: dict) -> dict | None:
        """Collective over the ep group: a name-keyed dict of this rank's (local expert names) merged with the
        other ep ranks' in the ordinary layout, on the group's first rank (None elsewhere)."""
        parts = [None] * self.mesh["ep"].size() if self.mesh["ep"].get_local_rank() == 0 else None
        dist.gather_object(renumber(named, self.first), parts, group=self.mesh["ep"].get_group(), group_dst=0)
        if parts is None:
            return None
        return dict(sorted({k: v for part in parts for k, v in part.items()}.items()))

    def local(self, named: dict) -> dict:
        return local_experts(named, self.first, self.count)

    def local_names(self, names: list[str]) -> list[str]:
        return list(self.local(dict.fromkeys(names)))


class ExpertBackend(TorchBackend):
    """A mixture's experts split over ep ranks (train.expert_parallel, --plan ep=E), the dense part replicated
    over the dp ranks: DDP for it, or with tensor parallelism (tp > 1) its shards' gradients averaged over the
    replicas in one flat bucket after the step's backwards (DDP does not take DTensor parameters).

    Each rank holds n_expert / ep experts and trains on its own micro-batches; tokens reach the experts and come
    back by all-to-all (ExpertParallelMoE). The dense gradients are the mean over the dp ranks; the experts follow
    ExpertGroups' rules: the gradient of the mean loss over all dp micro-batches, as one process accumulating
    them computes. With tp > 1 each expert's MLP is also split over the tensor-parallel group as the dense MLP is
    (expert tensor parallelism = tp, Megatron-Core's default): the group's ranks hold the same tokens (no sequence
    parallelism with experts here) and route them alike; each sends its share of the slots to the ep ranks of its
    own tp index, the shares are gathered over tp so that each computes its slice of every expert on all of them.
    Checkpoints hold the ordinary layout (every expert, gathered on rank 0) and each rank's optimizer state; a run
    resumes under the same ep, tp and world."""

    runs_muon = True  # each rank's experts are whole matrices (with tp, DTensor slices ShardedMuon gathers)
    runs_lora = False

    @classmethod
    def resolve(cls, plan: ParallelPlan) -> ParallelPlan:
        if plan.zero or plan.offload_optimizer or plan.offload_params:
            raise UserError(f"expert parallelism trains with the dense part replicated over dp here (zero=0, no "
                            f"offload; with tp, tensor parallel; with pp, the pipeline's replicas); this plan is "
                            f"{plan.describe()}")
        return super().resolve(plan)

    @classmethod
    def check(cls, cfg, plan: ParallelPlan, device) -> None:
        super().check(cfg, plan, device)
        check_expert_settings(cfg)
        check_tensor_parallel(cfg.model, plan.tp)

    def __init__(self, model: torch.nn.Module, cfg, env, plan: ParallelPlan) -> None:
        self.groups = ExpertGroups(model, plan)
        if env.distributed and plan.tp == 1:
            ddp_ignore(model, sorted(self.groups.names))
        super().__init__(model, cfg, env, plan)
        self.dense = [p for n, p in model.named_parameters() if n not in self.groups.names]
        self.dp_group = model.mesh["dp_replicate"].get_group() if plan.tp > 1 else None

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model if self.plan.tp > 1 else super().wrap(model)

    def optimizer_step(self) -> StepResult:
        from torch.distributed.tensor.experimental import implicit_replication

        self.groups.reduce_grads()
        if self.dp_group is not None:
            all_reduce_mean_flat([p.grad for p in self.dense if p.grad is not None], self.dp_group, self.plan.dp)
        norm = (grad_norm(self.dense).float().pow(2) + self.groups.square()).sqrt()
        if self.tc.grad_clip > 0:  # the plain norm scales DTensor gradients as a replicated scalar
            with implicit_replication():
                torch.nn.utils.clip_grads_with_norm_(self.params, self.tc.grad_clip, norm, foreach=self.plan.tp == 1)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm, torch.zeros((), dtype=torch.int32))

    def full_state_dict(self) -> dict | None:
        """Collective: every expert, gathered on rank 0 under its index in the model, tensor-parallel shards whole."""
        named = {k: whole(v) for k, v in weights_of(self.model).items()}
        merged = self.groups.gather(from_tp_layout(named, self.cfg.model, self.plan.tp))
        return merged if self.env.is_main else None

    def inference_model(self) -> torch.nn.Module | None:
        return Backend.inference_model(self)

    def save_state(self, folder: Path) -> dict:
        states = [None] * self.env.world_size if self.env.is_main else None
        dist.gather_object(local_state(self.optimizer.state_dict()), states, dst=0)
        return {"optimizer_by_rank": states, "expert_parallel": self.plan.ep} if self.env.is_main else {}

    def load_state(self, folder: Path, state: dict) -> None:
        if state.get("world_size") != self.env.world_size:
            raise UserError(f"{folder} was written by {state.get('world_size')} expert-parallel ranks; resume on as many")
        weights = self.groups.local(read_weights(folder))
        if self.plan.tp == 1:
            assign_weights(self.model, weights, str(folder))
        else:
            load_whole_weights(self.model, weights, self.cfg.model, self.plan.tp)
        self.optimizer.load_state_dict(state["optimizer_by_rank"][self.env.rank])
        reshard_state(self.optimizer)

    def describe(self) -> str:
        experts = f"{self.cfg.model.n_expert} experts over ep {self.plan.ep}"
        if self.plan.tp == 1:
            return f"DDP over {self.env.world_size} ranks, {experts}"
        return f"tensor parallel {self.plan.tp} x {self.plan.dp} replicas, {experts}"


# tensor-parallel shards in the expert backend's files --------------------------------------------------------


def whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (collective over its mesh); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local_state(osd: dict) -> dict:
    """An optimizer state dict (or nn/optim.Optimizers' dict of them) with each DTensor replaced by this rank's
    shard (picklable, as each rank's file)."""
    from torch.distributed.tensor import DTensor

    if "state" not in osd:
        return {name: local_state(o) for name, o in osd.items()}
    state = {k: {n: v.to_local() if isinstance(v, DTensor) else v for n, v in s.items()} for k, s in osd["state"].items()}
    return {**osd, "state": state}


def reshard_state(optimizer) -> None:
    """After load_state_dict of local_state's shards: each state tensor of a DTensor parameter made a DTensor
    again, laid out as the parameter is."""
    from torch.distributed.tensor import DTensor

    for p, s in (kv for o in (optimizer if isinstance(optimizer, Optimizers) else [optimizer]) for kv in o.state.items()):
        if isinstance(p, DTensor):
            for n, v in s.items():
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.to_local().shape:
                    s[n] = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                              stride=p.stride())

"""One training step on N simulated ranks: memory and communication counted from the real parallel code.

The model is built on fake tensors (shapes, no storage) and parallelised by the same functions
training uses (minigpt/parallel/sharding.py: DTensor tensor parallelism, FSDP2 fully_shard) over a fake
process group of N ranks, of which this process is rank 0. One forward, backward and AdamW step
runs; torch's FSDPMemTracker measures memory by category, and a dispatch mode records every
collective (kind, group, bytes). Both sit beside the formulas the extrapolation uses.

The layout is a ParallelPlan (`--plan tp=8,pp=4,dp=32,zero=1`, the spelling train and extrapolate take).
Data parallelism runs through FSDP2 on a (dp_replicate, dp_shard, tp) mesh, by ZeRO stage:
  zero=0   replicate = dp, shard = 1: whole parameters, one all-reduce of the gradients (DDP's traffic;
           DDP proper buckets the same bytes)
  zero=1,2 shard = dp, parameters kept gathered from forward to backward (FSDP's SHARD_GRAD_OP): one
           all-gather, one reduce-scatter per step (ZeRO-1 sends what ZeRO-2 does; its gradients are
           simulated sharded too, said in the output)
  zero=3   shard = dp, parameters resharded after forward (FULL_SHARD): two all-gathers, one reduce-scatter
With pp > 1 one pipeline stage is simulated (its ceil(L / pp) layers on tp x dp ranks); a 1F1B first stage
holds pp micro-batches of activations, added to the memory per GPU. Pipeline point-to-point traffic is
not counted yet.
Bytes per rank are what a ring sends: (n-1)/n of an all-gather's output or a reduce-scatter's
input, 2(n-1)/n of an all-reduce's buffer, on a group of n ranks.

Deep models: layers are identical, so a model of more than `FULL_LAYERS` layers is measured with
1 and 2 layers and extended linearly to n_layer (exact for identical layers; said in the output).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import time
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import init_device_mesh

from minigpt.analytic import flops as F, memory as M, steptime as T
from minigpt.analytic.layout import per_gpu_bytes
from minigpt.analytic.memory import PRECISION_BYTES
from minigpt.core.blocks import inventory
from minigpt.core.config import ModelConfig, TrainConfig
from minigpt.core.errors import UserError
from minigpt.core.hardware import GPUS_PER_NODE, GPUSpec, collective_link_gbs, group_ranks_per_node
from minigpt.core.plan import ParallelPlan
from minigpt.nn.model import GPT
from minigpt.nn.optim import autocast_context, make_optimizer
from minigpt.nn.torch_private import (
    collective_counter,
    fake_mode,
    fake_process_group,
    flatten_mesh,
    fsdp_memory_tracker,
)
from minigpt.parallel.expert import apply_expert_parallel
from minigpt.parallel.parallelize import apply_activation_checkpointing
from minigpt.parallel.pipeline import Stage, rank_stages, stage_layers
from minigpt.parallel.sharding import apply_fsdp, apply_tensor_parallel

FULL_LAYERS = 2
MEMORY_KEYS = ("params", "grads", "optimizer", "gathered_params", "activations_peak", "total")
MAX_SIM_RANKS = 1 << 16  # ranks of one simulated stage: 65,536 (building the fake groups grows with them)


@dataclass
class SimSpec:
    plan: ParallelPlan
    precision: str = "bf16"  # parameters gathered and computed in; also the activations
    reduce_precision: str = ""  # gradients reduced in; "" = precision (the ZeRO paper's 16-bit gradients)
    micro_batch: int = 1
    seq_len: int = 0  # 0: block_size
    recompute: bool = False
    micro_batches: int = 0  # pipeline micro-batches per step (m); 0: 4 x pp, an assumption said in the output
    micro_batches_source: str = ""  # where a given m comes from ("": --micro-batches)

    @property
    def m(self) -> int:
        return self.micro_batches or 4 * self.plan.pp

    def validate(self, c: ModelConfig) -> None:
        if self.micro_batch < 1 or self.micro_batch > 1 << 16:
            raise UserError(f"--micro-batch {self.micro_batch} must be between 1 and 65,536")
        if self.seq_len > c.block_size or self.seq_len < 0:
            raise UserError(f"--seq-len {self.seq_len} must be between 1 and block_size = {c.block_size}")
        if self.plan.cp > 1:
            raise UserError(f"--plan cp={self.plan.cp}: context parallelism is predicted by the step-time model "
                            f"(minigpt extrapolate, backtest), not simulated yet; use cp=1")
        if self.plan.ep > 1 and self.plan.tp > 1 and self.plan.dp_replicate > 1:
            raise UserError(f"--plan ep={self.plan.ep} with tp={self.plan.tp} and zero=0 (replicated dp): experts split over "
                            f"tp and ep are simulated with sharded data parallelism; use zero=1 or more")
        if self.stage_world > MAX_SIM_RANKS:
            raise UserError(f"--plan {self.plan.spelling()} puts {self.stage_world:,} ranks in one pipeline stage; "
                            f"simulate at most {MAX_SIM_RANKS:,} (tp x dp)")
        self.plan.check_model(c)

    @property
    def stage_world(self) -> int:
        return self.plan.tp * self.plan.dp

    def seq(self, c: ModelConfig) -> int:
        """The sequence length simulated: seq_len, or the model's block_size when it is 0."""
        return self.seq_len or c.block_size


def stage_model(c: ModelConfig, plan: ParallelPlan) -> ModelConfig:
    """The model of pipeline rank 0's layers (all of its chunks: the first stage's, and with a looped
    schedule its later ones), as many as the real split gives it."""
    if plan.pp == 1:
        return c
    layers = stage_layers(c.n_layer, plan.stages)
    return dataclasses.replace(c, n_layer=sum(len(layers[i]) for i in rank_stages(plan, 0)))


# ----------------------------------------------------------------------------------------------
# one measured step


def _step(c: ModelConfig, spec: SimSpec) -> tuple[dict, list]:
    """Build, parallelise and train one step on fake tensors: (memory by category, collectives)."""
    plan = spec.plan
    with fake_process_group(spec.stage_world):
        tp_mesh, dp_mesh, ep_mesh, experts = _meshes(plan)
        fake = fake_mode()
        with fake:
            model = GPT(c)
            if plan.pp > 1:  # pipeline rank 0: the embedding and its layers; the head only when ZB-V puts it there
                model = Stage(model, range(c.n_layer), True, plan.schedule == "zbv", spec.precision, torch.device("cpu"))
        # parallelised outside fake mode (the mesh's own small tensors are real); fake weights stay fake
        if spec.recompute:
            apply_activation_checkpointing(model)
        if plan.tp > 1:
            apply_tensor_parallel(model, tp_mesh, reorder=False, sequence_parallel=plan.sp)
        if plan.ep > 1:
            apply_expert_parallel(model, ep_mesh, tp_mesh if plan.tp > 1 else None)
        apply_fsdp(model, dp_mesh, spec.precision, reshard_after_forward=plan.zero == 3,
                   reduce_precision=spec.reduce_precision or spec.precision, expert_mesh=experts)
        with fake:
            optimizer = make_optimizer(model, TrainConfig())
            seq = spec.seq(c)
            x = torch.zeros(spec.micro_batch, seq, dtype=torch.long)
            tracker, counter = fsdp_memory_tracker(model, optimizer), collective_counter()
            tracker.track_inputs((x,))
            with tracker:
                for it in range(2):  # the first step creates the optimizer state; the second is measured
                    if it:
                        tracker.reset_mod_stats()
                        counter.records.clear()
                    with counter:
                        forward, backward, after, boundary = _one_step(model, optimizer, x, spec.precision, tracker)
            peak = _categories(tracker.get_tracker_snapshot("peak"))
    memory = {
        "params": after.get("sharded_param", 0),
        "grads": backward.get("sharded_grad", 0) + backward.get("unsharded_grad", 0),
        "optimizer": after.get("opt", 0),
        "gathered_params": peak.get("unsharded_param", 0) + peak.get("all_gather", 0),
        "activations_peak": forward.get("act", 0),
        "total": peak.get("total", 0),
    }
    return memory, counter.records + boundary


def _meshes(plan: ParallelPlan) -> tuple:
    """(the tensor-parallel mesh, the dense part's data-parallel mesh, the expert-parallel mesh, the experts' own
    data-parallel mesh); None where the plan has no such split. Experts split over tp and ep come from one root
    mesh (dp_shard / ep, ep, tp: ep innermost after tp, as training's expert_mesh places them), the dense part's dp
    flattened from its dp_shard / ep and ep dimensions: FSDP2 over tensor-parallel weights needs that one root."""
    if plan.ep > 1 and plan.tp > 1:
        root = init_device_mesh("cpu", (*plan.expert_mesh_shape, plan.tp),
                                mesh_dim_names=("dp_replicate", "dp_shard", "ep", "tp"))
        return root["tp"], flatten_mesh(root, ("dp_shard", "ep"), "dp_shard_ep"), root["ep"], root["dp_replicate", "dp_shard"]
    mesh = init_device_mesh("cpu", plan.mesh_shape[1:], mesh_dim_names=plan.mesh_names[1:])
    if plan.ep == 1:
        return mesh["tp"], mesh["dp_replicate", "dp_shard"], None, None
    ep_mesh = init_device_mesh("cpu", plan.expert_mesh_shape, mesh_dim_names=("dp_replicate", "dp_shard", "ep"))
    return mesh["tp"], mesh["dp_replicate", "dp_shard"], ep_mesh["ep"], ep_mesh["dp_replicate", "dp_shard"]


def _one_step(model, optimizer, x, precision: str, tracker) -> tuple[dict, dict, dict, list]:
    """Forward, backward, AdamW step: the memory by category after each, and a pipeline stage's
    point-to-point records: the activation it sends the next stage and the gradient it receives, as
    the tensors its forward returned (shape x dtype: the bytes a schedule sends per micro-batch)."""
    boundary = []
    with autocast_context(torch.device("cpu"), precision):
        out = model(x) if isinstance(model, Stage) else model(x, x)
    forward = _categories(tracker.get_tracker_snapshot("current"))
    if isinstance(model, Stage) and not model.last:
        sent = out.numel() * out.element_size()
        boundary = [("p2p_send_activation", 2, "pp", sent), ("p2p_recv_gradient", 2, "pp", sent)]
        out.backward(torch.ones_like(out))  # the gradient the next stage would send back
    else:
        (out if isinstance(model, Stage) else out.loss).mean().backward()
    del out
    backward = _categories(tracker.get_tracker_snapshot("current"))
    optimizer.step()
    after = _categories(tracker.get_tracker_snapshot("current"))
    optimizer.zero_grad(set_to_none=True)
    return forward, backward, after, boundary


def _categories(snapshot: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for per_device in snapshot.values():
        for key, value in per_device.items():
            name = str(getattr(key, "name", key)).lower()
            out[name] = out.get(name, 0) + int(value)
    return out


def _collectives(records: list, spec: SimSpec) -> list[dict]:
    """Collectives grouped by (op, group, group size): count, whole bytes, ring bytes sent per rank (groups of one
    size told apart by name: the experts' dp / ep group and tp can both have 2 ranks)."""
    groups: dict = {}
    for kind, n, desc, whole in records:
        if n == 1:
            continue  # a group of one moves nothing
        name = _group_name(n, desc, spec, kind)
        row = groups.setdefault((kind, name, n), {"op": kind, "group": name, "group_size": n,
                                                  "count": 0, "bytes": 0, "bytes_per_rank": 0.0})
        row["count"] += 1
        row["bytes"] += whole
        ring = 1.0 if kind.startswith("p2p") else (2 if kind == "all_reduce" else 1) * (n - 1) / n  # p2p: all of it
        # all-to-all: the (n-1)/n of its input that leaves the rank (balanced routing)
        row["bytes_per_rank"] += ring * whole
    return sorted(groups.values(), key=lambda r: (r["group"], r["op"]))


def _group_name(n: int, desc: str, spec: SimSpec, kind: str = "") -> str:
    if kind == "all_to_all":
        return "ep"  # only expert parallelism's dispatch runs all-to-all
    for dim in ("pp", "tp", "dp_replicate", "dp_shard"):
        if dim in desc:
            return dim if dim in ("pp", "tp") else "dp"
    return "tp" if n == spec.plan.tp and spec.plan.tp != spec.plan.dp else "dp"


def _fresh_steps(configs: list[ModelConfig], spec: SimSpec) -> list[tuple[dict, list]]:
    """Each step in a process of its own, side by side: torch's FSDPMemTracker reports a second
    measurement in one process differently from the first (seen with torch 2.13), and a fake
    process group is one per process. The processes fork from a server that has imported this
    module and computed nothing (fast, and safe for OpenMP)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    with concurrent.futures.ProcessPoolExecutor(max_workers=len(configs), mp_context=ctx) as pool:
        return list(pool.map(_step, configs, [spec] * len(configs)))


def measure(c: ModelConfig, spec: SimSpec) -> tuple[dict, list[dict], str]:
    """Memory and collectives of one step; deep models from 1 and 2 layers, extended linearly."""
    if c.n_layer <= FULL_LAYERS:
        [(memory, records)] = _fresh_steps([c], spec)
        return memory, _collectives(records, spec), f"all {c.n_layer} layers run"
    (m1, r1), (m2, r2) = _fresh_steps([dataclasses.replace(c, n_layer=n) for n in (1, 2)], spec)
    L = c.n_layer
    memory = {k: m1[k] + (L - 1) * (m2[k] - m1[k]) for k in m1}
    if spec.plan.zero == 3:  # gathered a block or two at a time: does not grow with depth
        g1, g2 = m1["gathered_params"], m2["gathered_params"]
        memory["gathered_params"] = g2
        memory["total"] = m2["total"] + (L - 2) * (m2["total"] - m1["total"] - (g2 - g1))
    one = {(r["op"], r["group"], r["group_size"]): r for r in _collectives(r1, spec)}
    rows = []
    for r in _collectives(r2, spec):
        a = one.get((r["op"], r["group"], r["group_size"]), {"count": 0, "bytes": 0, "bytes_per_rank": 0.0})
        rows.append({**r, **{k: a[k] + (L - 1) * (r[k] - a[k]) for k in ("count", "bytes", "bytes_per_rank")}})
    return memory, rows, f"measured with 1 and 2 layers, extended linearly to {L} (identical layers)"


# ----------------------------------------------------------------------------------------------
# beside the formulas


@dataclass(frozen=True)
class RankParams:
    """Parameters one tensor-parallel (and expert-parallel) rank holds before data-parallel sharding."""

    total: float  # all of them
    block: float  # in one block
    root: float  # in the root unit: embeddings (and, when the stage has it, the final norm and head)
    experts: float  # of the total, the experts' (already divided by ep)


def params_per_rank(c: ModelConfig, tp: int, ep: int = 1, head: bool = True) -> RankParams:
    """What each part of the model's inventory leaves on one rank (Part.params_per_rank: column-parallel
    weights and biases and row-parallel weights split tp ways, row-parallel biases, norms and the router
    replicated, experts split ep ways). head=False: a pipeline stage without the final norm and LM head."""
    inv = inventory(c)
    block = sum(p.params_per_rank(tp, ep) for p in inv.layer)
    experts = sum(p.params_per_rank(tp, ep) for p in inv.layer if p.ep)
    root = sum(p.params for p in inv.root if head or p.name not in ("ln_f", "lm_head"))
    return RankParams(c.n_layer * block + root, block, root, c.n_layer * experts)


def predicted_memory(c: ModelConfig, spec: SimSpec, per_rank: RankParams, head: bool = True) -> dict:
    """Per-rank bytes by category: ZeRO's partitioning of torch's fp32 master params, grads and
    Adam m, v (4 + 4 + 8 bytes per parameter); gathered 16-bit copies (zero2: all, kept until
    backward; zero3: the root unit and one block); Korthikanti et al. 2022's activations with
    tensor parallelism, s b h (10 + 24/t) per layer (fused attention: no 5 a s^2 b / t term;
    recompute: 2 s b h; a mixture's MLP share from the model's inventory), plus minigpt's LM-head/loss term (memory.activation_bytes) when the stage
    has the head. Experts (split over ep) are sharded over the dp/ep ranks that hold them."""
    plan = spec.plan
    n, n_e = plan.dp_shard, max(1, plan.dp_shard // plan.ep)
    states = (per_rank.total - per_rank.experts) / n + per_rank.experts / n_e
    half = PRECISION_BYTES[spec.precision]
    gathered = {0: 0.0, 1: half * per_rank.total, 2: half * per_rank.total}.get(plan.zero,
                                                                                half * (per_rank.root + per_rank.block))
    if plan.zero >= 3 and n == 1:  # nothing is sharded over one rank, so nothing is gathered (measured: 0)
        gathered = 0.0
    s, b = spec.seq(c), spec.micro_batch
    per_layer = M.korthikanti_activation_bytes_per_layer(c, b, s, flash=True, recompute=spec.recompute, tp=plan.tp,
                                                         sequence_parallel=plan.sp)  # a mixture's MLP from the inventory
    loss = M.activation_bytes(c, b, s, spec.precision)["head_and_loss"] if head else 0
    out = {"params": 4 * states, "grads": 4 * states, "optimizer": 8 * states, "gathered_params": gathered,
           "activations_peak": c.n_layer * per_layer + loss}
    out["total"] = sum(out.values())
    return out


def predicted_comm(c: ModelConfig, spec: SimSpec, per_rank: RankParams, head: bool = True) -> dict:
    """Bytes per rank per step: the extrapolation's data-parallel volumes (DDP all-reduce 2 Psi bytes x
    (n-1)/n; ZeRO-2 the same as a reduce-scatter + all-gather; ZeRO-3 / FSDP 1.5x: two all-gathers and a
    reduce-scatter; experts over the dp/ep ranks that hold them), Megatron's tensor-parallel all-reduces
    of b s h (2 forward, 2 backward per layer; recompute repeats the forward's 2), each 2 (t-1)/t; a
    mixture of experts with each expert split over tp all-reduces its MLP's output once per active
    expert (k b s h); with sequence parallelism each becomes an all-gather and a reduce-scatter, the same
    bytes, plus one all-gather of b s h at each end of the sequence-parallel region (the embedding's
    backward, the head's forward, when the stage has them). Expert parallelism: 4 all-to-alls of the k b s routed slots (h values each) per MoE layer (2
    forward, 2 backward), (ep-1)/ep of them leaving the rank under balanced routing; with tp each tp rank
    dispatches 1/tp of the slots, and the shares are all-gathered over tp, 4 times a layer ((tp-1)/tp of k b s h)."""
    p_b = PRECISION_BYTES[spec.precision]
    g_b = PRECISION_BYTES[spec.reduce_precision or spec.precision]
    plan = spec.plan
    dp, t, ep = plan.dp, plan.tp, plan.ep
    ring = (dp - 1) / dp * (per_rank.total - per_rank.experts) + (dp // ep - 1) / (dp // ep) * per_rank.experts
    dp_bytes = {0: 2 * ring * g_b, 1: ring * (p_b + g_b), 2: ring * (p_b + g_b)}.get(plan.zero, ring * (2 * p_b + g_b))
    s, b = spec.seq(c), spec.micro_batch
    k = c.n_expert_active if c.is_moe else 1
    all_reduces = 2 * inventory(c).row_parallel_outputs()  # forward and backward: dense 4, a mixture 2 + 2k
    per_layer = (1.5 if spec.recompute else 1) * all_reduces * 2 * (t - 1) / t * b * s * c.n_embd * p_b
    ends = (1 + head) * (t - 1) / t * b * s * c.n_embd * p_b if plan.sp else 0.0
    routed = (6 if spec.recompute else 4) * k * b * s * c.n_embd * p_b  # dispatch and combine, forward and backward
    a2a = (ep - 1) / ep * routed / t  # each tp rank dispatches its share of the slots
    if ep > 1 and c.is_moe:  # the shares gathered over tp around the experts and back (and in the backward)
        per_layer += (t - 1) / t * routed
    return {"dp": dp_bytes, "tp": c.n_layer * per_layer + ends if t > 1 else 0.0, "ep": c.n_layer * a2a if ep > 1 else 0.0}


def predicted_compute_s(c: ModelConfig, spec: SimSpec, gpu: GPUSpec, dtype: str) -> float:
    """One micro-batch's compute on a rank of the stage (forward + backward: matmul, attention and the
    memory-bound passes) by the step-time model (analytic/steptime.py) on the GPU's cited rates."""
    plan = dataclasses.replace(spec.plan, pp=1, dp=1, schedule="1f1b", stages_per_rank=1)  # one stage, one rank's work
    setup = T.Setup(seq_len=spec.seq(c), micro_batch=spec.micro_batch, global_batch=spec.micro_batch,
                    recompute="full" if spec.recompute else "none", act_bytes=4 if dtype == "fp32" else 2)
    parts = T.micro_batch_seconds(c, plan, setup, T.gpu_rates(gpu, dtype))["parts"]
    return parts["matmul"] + parts["attention"] + parts["memory"]


def step_times(c: ModelConfig, spec: SimSpec, comm: dict, gpu: GPUSpec, mfu: float | None,
               collectives: list[dict] | None = None) -> dict:
    """Seconds the counted bytes take on the GPU's links, beside the step's compute (one micro-batch's): predicted
    by the step-time model, or at a given `mfu`. Each data-parallel collective on its own group's link (a
    mixture's expert replicas reduce over dp / ep ranks, ep x tp ranks apart); the all-to-all on each rank's own
    share: NVLink to the ep ranks in its node, its own NIC to the others, at once."""
    nvlink = gpu.nvlink_gbs * 1e9
    dp_gbs, dp_name = collective_link_gbs(gpu, spec.plan.dp, group_ranks_per_node(spec.plan.tp, spec.plan.dp))
    seq = spec.seq(c)
    convention = "exact_recompute" if spec.recompute else "exact"
    flops = F.train_flops_per_token(c, seq, convention) * spec.micro_batch * seq / spec.plan.tp
    dtype = spec.precision if spec.precision in gpu.tflops else "bf16"
    if mfu is None:
        compute_s = predicted_compute_s(c, spec, gpu, dtype)
        mfu, how = flops / (gpu.tflops[dtype] * 1e12 * compute_s), "predicted by the step-time model"
    else:
        compute_s, how = flops / (gpu.tflops[dtype] * 1e12 * mfu), "given (--mfu)"
    how = f"{convention} FLOPs at {mfu:.0%} MFU of {gpu.name} dense {dtype}, {how}"
    tp_s, dp_s = comm["tp"] / nvlink, _dp_seconds(spec, gpu, comm, collectives)
    ep_s = _all_to_all_seconds(spec, gpu, comm.get("ep", 0.0))
    return {"gpu": gpu.name, "mfu": mfu, "compute_flops_per_rank": flops, "compute_s": compute_s,
            "tp_comm_s": tp_s, "dp_comm_s": dp_s, "ep_comm_s": ep_s,
            "tp_link": f"NVLink {gpu.nvlink_gbs:g} GB/s per direction", "dp_link": dp_name,
            "ep_link": "each rank's own share: NVLink to the ep ranks in its node, its own NIC beyond",
            "comm_share": (tp_s + dp_s + ep_s) / (tp_s + dp_s + ep_s + compute_s),
            "convention": f"time of one micro-batch: {how}; communication not overlapped with compute (an upper bound "
                          f"on its share); bandwidth term only"}


def _dp_seconds(spec: SimSpec, gpu: GPUSpec, comm: dict, collectives: list[dict] | None) -> float:
    """The data-parallel bytes on their groups' links: the whole dp group's, or a mixture's expert replicas
    (dp / ep ranks, ep x tp ranks apart) on theirs."""
    plan = spec.plan
    rows = [r for r in collectives or [] if r["group"] == "dp"]
    if not rows:
        return comm["dp"] / (collective_link_gbs(gpu, plan.dp, group_ranks_per_node(plan.tp, plan.dp))[0] * 1e9)
    total = 0.0
    for r in rows:
        n = r["group_size"]
        stride = plan.tp if n == plan.dp else plan.tp * plan.ep
        total += r["bytes_per_rank"] / (collective_link_gbs(gpu, n, group_ranks_per_node(stride, n))[0] * 1e9)
    return total


def _all_to_all_seconds(spec: SimSpec, gpu: GPUSpec, sent: float) -> float:
    """Bytes a rank sends in all-to-alls, split between the ep ranks in its node (NVLink) and the others (its NIC)."""
    ep = spec.plan.ep
    if ep == 1 or not sent:
        return 0.0
    in_node = max(1, min(ep, GPUS_PER_NODE // spec.plan.tp))
    near, far = sent * (in_node - 1) / (ep - 1), sent * (ep - in_node) / (ep - 1)
    return max(near / (gpu.nvlink_gbs * 1e9), far / (gpu.internode_gbs * 1e9))


def simulate(c: ModelConfig, spec: SimSpec, gpu: GPUSpec, mfu: float | None = None) -> dict:
    """The whole report: measured memory and collectives of one (first) pipeline stage beside the
    formulas, the memory per GPU beside what extrapolate predicts for the same plan, and their time."""
    spec.validate(c)
    start = time.perf_counter()
    plan, stage = spec.plan, stage_model(c, spec.plan)
    memory, collectives, how = measure(stage, spec)
    head = plan.pp == 1 or plan.schedule == "zbv"
    per_rank = params_per_rank(stage, plan.tp, plan.ep, head)
    predicted = predicted_memory(stage, spec, per_rank, head)
    counted = {g: sum(r["bytes_per_rank"] for r in collectives if r["group"] == g) for g in ("dp", "tp", "ep")}
    formula = predicted_comm(stage, spec, per_rank, head)
    return {
        "plan": plan.spelling(), "plan_description": plan.describe(), "world": plan.world, "dp": plan.dp,
        "tp": plan.tp, "pp": plan.pp, "zero": plan.zero, "stage_layers": stage.n_layer, "precision": spec.precision,
        "reduce_precision": spec.reduce_precision or spec.precision, "micro_batch": spec.micro_batch,
        "seq_len": spec.seq(c), "recompute": spec.recompute,
        "params_total": F.param_counts(c).total, "params_per_tp_rank": per_rank.total,
        "memory_per_rank": memory, "predicted_memory_per_rank": predicted,
        "memory_ratio": {k: _ratio(memory[k], predicted[k]) for k in MEMORY_KEYS},
        "memory_per_gpu": _memory_per_gpu(c, spec, memory, gpu),
        "collectives": collectives,
        "comm_bytes_per_rank": sum(counted.values()), "comm_bytes_per_rank_by_group": counted,
        "predicted_comm_bytes_per_rank": sum(formula.values()), "predicted_comm_bytes_per_rank_by_group": formula,
        "comm_ratio": _ratio(sum(counted.values()), sum(formula.values())),
        "time_per_step": step_times(stage, spec, counted, gpu, mfu, collectives),
        "pipeline": pipeline_report(c, spec, collectives, memory, gpu) if plan.pp > 1 else None,
        "notes": _notes(plan),
        "method": f"fake process group of {spec.stage_world} ranks (one pipeline stage, {stage.n_layer} layers), fake "
                  f"tensors, FSDP2 + DTensor code; {how}; memory by torch's FSDPMemTracker (bytes per rank); collectives "
                  f"counted from the dispatched ops, ring bytes sent per rank",
        "elapsed_s": round(time.perf_counter() - start, 2),
    }


def pipeline_report(c: ModelConfig, spec: SimSpec, collectives: list[dict], memory: dict, gpu: GPUSpec) -> dict:
    """Point-to-point traffic of pipeline rank 0 beside the formula, the bubble, the in-flight activations.

    Counted: the activation the simulated stage's forward returned (what the schedule sends the next
    stage, per micro-batch) and a gradient of its size received back. Formula (Narayanan et al. 2021):
    b*s*h elements each way per boundary and micro-batch, in the residual stream's dtype, divided by tp
    with sequence parallelism (each rank sends its T/tp positions). Per step, x m micro-batches x v
    chunks per rank (the interleaved schedule's v-fold traffic)."""
    plan, m = spec.plan, spec.m
    counted = next((r["bytes"] for r in collectives if r["op"] == "p2p_send_activation"), 0)
    formula = spec.micro_batch * spec.seq(c) * c.n_embd * PRECISION_BYTES[spec.precision] / (plan.tp if plan.sp else 1)
    per_step = 2 * counted * m * plan.stages_per_rank
    link = gpu.internode_gbs * 1e9  # tp x dp ranks fill the nodes first: neighbouring stages sit on different nodes
    return {
        "schedule": plan.schedule, "stages": plan.stages, "stages_per_rank": plan.stages_per_rank,
        "micro_batches": m, "micro_batches_source": (spec.micro_batches_source or "given (--micro-batches)")
        if spec.micro_batches else "assumption: 4 x pp (give --micro-batches)",
        "p2p_activation_bytes_per_boundary_per_micro_batch": counted,
        "p2p_formula_bytes_per_boundary_per_micro_batch": formula, "p2p_ratio": _ratio(counted, formula),
        "p2p_bytes_per_rank_per_step": per_step, "p2p_s_per_step": per_step / link,
        "p2p_link": f"inter-node {gpu.internode_gbs:g} GB/s per GPU (assumption: DGX NICs)",
        "bubble_formula": plan.bubble_formula(m),
        "bubble_convention": "(p-1)/(v*m+p-1): GPipe, 1F1B (v=1) and interleaved 1F1B (Narayanan et al. 2021); "
                             "none for ZB-V" if plan.schedule == "zbv" else
                             "(p-1)/(v*m+p-1): GPipe, 1F1B (v=1) and interleaved 1F1B (Narayanan et al. 2021)",
        "in_flight_micro_batches": min(plan.pp, m),
        "first_stage_activations_bytes": min(plan.pp, m) * memory["activations_peak"],
        "convention": "counted: the simulated stage's output tensor (shape x dtype) per micro-batch, sent forward, "
                      "and a gradient of its size received; formula: b*s*h per boundary per micro-batch"
                      + (" / tp (sequence parallel)" if plan.sp else "") + f" in {spec.precision}",
    }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _memory_per_gpu(c: ModelConfig, spec: SimSpec, memory: dict, gpu: GPUSpec) -> dict:
    """The simulated stage's memory with the activations a 1F1B first stage keeps in flight (pp
    micro-batches), beside extrapolate's per-GPU estimate for the same model and plan."""
    pp = spec.plan.pp
    simulated = memory["total"] + (pp - 1) * memory["activations_peak"]
    predicted = per_gpu_bytes(c, spec.plan, spec.seq(c), spec.micro_batch, recompute=spec.recompute)
    return {"simulated_bytes": simulated, "extrapolate_bytes": predicted["total"],
            "gpu": gpu.name, "gpu_memory_bytes": gpu.memory_gb * 1e9, "fits": simulated <= gpu.memory_gb * 1e9,
            "extrapolate_model_states_bytes": predicted["model_states"],
            "extrapolate_activations_bytes": predicted["activations"],
            "simulated_over_extrapolate": _ratio(simulated, predicted["total"]),
            "convention": f"simulated: the stage's peak + {pp - 1} more micro-batches of activations (1F1B); "
                          f"extrapolate: {predicted['convention']}"}


def _notes(plan: ParallelPlan) -> list[str]:
    notes = []
    if plan.zero == 1:
        notes.append("zero=1 is simulated as ZeRO-2 (FSDP2 shards gradients too): the same traffic, less gradient memory")
    if plan.pp > 1:
        head = "its chunks and the LM head (ZB-V)" if plan.schedule == "zbv" else "the embedding and its layers"
        notes.append(f"pp={plan.pp}: pipeline rank 0 is simulated ({head}, as one pipeline stage module); the "
                     f"{plan.pp - 1} more micro-batches a 1F1B first stage holds are counted at its activation peak "
                     f"(an upper bound)")
    return notes


# ----------------------------------------------------------------------------------------------
# for the extrapolation (--comm counted)


def layout_simulator(gpu: GPUSpec, micro_batch: int, notes: list[str]):
    """A function (model, plan) -> the simulated step of the plan's first pipeline stage, with full recompute and
    (tensor parallel, dense) sequence parallelism as the extrapolation assumes (a mixture's tp ranks hold the same
    tokens: no sequence parallelism with experts here); None (and a note) when the plan cannot be simulated."""

    def simulate_layout(c: ModelConfig, plan: ParallelPlan) -> dict | None:
        if plan.tp > 1 and not c.is_moe:  # the extrapolation's activations assume sequence parallelism
            plan = dataclasses.replace(plan, sp=True)
        try:
            r = simulate(c, SimSpec(plan, micro_batch=micro_batch, recompute=True), gpu)
        except UserError as e:
            notes.append(f"--comm counted: {plan.spelling()} not simulated ({e}); formulas used")
            return None
        return {"memory_per_gpu_bytes": r["memory_per_gpu"]["simulated_bytes"],
                "dp_bytes": r["comm_bytes_per_rank_by_group"]["dp"], "tp_bytes": r["comm_bytes_per_rank_by_group"]["tp"],
                "ep_bytes": r["comm_bytes_per_rank_by_group"]["ep"],
                "pp_bytes_per_micro_batch": (r["pipeline"] or {}).get("p2p_activation_bytes_per_boundary_per_micro_batch", 0),
                "stages_per_rank": plan.stages_per_rank,
                "plan": plan.spelling(), "elapsed_s": r["elapsed_s"],
                "method": f"minigpt simulate --plan {plan.spelling()} --recompute (one pipeline stage, {r['stage_layers']} "
                          f"layers), {r['method']}"}

    return simulate_layout

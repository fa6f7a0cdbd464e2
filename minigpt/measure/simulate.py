"""One training step on N simulated ranks: memory and communication counted from the real parallel code.

The model is built on fake tensors (shapes, no storage) and parallelised by the same functions
training uses (minigpt/sharding.py: DTensor tensor parallelism, FSDP2 fully_shard) over a fake
process group of N ranks, of which this process is rank 0. One forward, backward and AdamW step
runs; torch's FSDPMemTracker measures memory by category, and a dispatch mode records every
collective (kind, group, bytes). Both sit beside the formulas the extrapolation uses.

Data-parallel layouts, all through FSDP2 on a (replicate, shard, tp) mesh:
  ddp    replicate = dp, shard = 1: whole parameters, one all-reduce of the gradients (DDP's traffic;
         DDP proper buckets the same bytes)
  zero2  shard = dp, parameters kept gathered from forward to backward (FSDP's SHARD_GRAD_OP):
         one all-gather, one reduce-scatter per step
  zero3  shard = dp, parameters resharded after forward (FULL_SHARD; `fsdp` is the same): two
         all-gathers, one reduce-scatter
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

from minigpt.analytic import flops as F, memory as M
from minigpt.analytic.extrapolate import REFERENCE_MFU
from minigpt.analytic.memory import PRECISION_BYTES
from minigpt.core.config import ModelConfig, TrainConfig
from minigpt.core.errors import UserError
from minigpt.core.hardware import GPUS_PER_NODE, GPUSpec
from minigpt.core.plan import check_tensor_parallel
from minigpt.nn.model import GPT
from minigpt.nn.optim import autocast_context, make_optimizer
from minigpt.nn.torch_private import (
    collective_counter,
    fake_mode,
    fake_process_group,
    fsdp_memory_tracker,
)
from minigpt.parallel.parallelize import apply_activation_checkpointing
from minigpt.parallel.sharding import apply_fsdp, apply_tensor_parallel

BACKENDS = ("ddp", "zero2", "zero3", "fsdp")
ZERO_STAGE = {"ddp": 0, "zero2": 2, "zero3": 3, "fsdp": 3}
FULL_LAYERS = 2
MEMORY_KEYS = ("params", "grads", "optimizer", "gathered_params", "activations_peak", "total")


@dataclass


class SimSpec:
    world: int
    tp: int = 1
    backend: str = "zero3"
    precision: str = "bf16"  # parameters gathered and computed in; also the activations
    reduce_precision: str = ""  # gradients reduced in; "" = precision (the ZeRO paper's 16-bit gradients)
    micro_batch: int = 1
    seq_len: int = 0  # 0: block_size
    recompute: bool = False

    def validate(self, c: ModelConfig) -> None:
        if self.backend not in BACKENDS:
            raise UserError(f"--backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.world < 1 or self.micro_batch < 1:
            raise UserError(f"--world {self.world} and --micro-batch {self.micro_batch} must be positive")
        if self.seq_len > c.block_size or self.seq_len < 0:
            raise UserError(f"--seq-len {self.seq_len} must be between 1 and block_size = {c.block_size}")
        check_tensor_parallel(c, self.tp, self.world)

    @property
    def dp(self) -> int:
        return self.world // self.tp

    def seq(self, c: ModelConfig) -> int:
        """The sequence length simulated: seq_len, or the model's block_size when it is 0."""
        return self.seq_len or c.block_size


# ----------------------------------------------------------------------------------------------
# one measured step


def _step(c: ModelConfig, spec: SimSpec) -> tuple[dict, list]:
    """Build, parallelise and train one step on fake tensors: (memory by category, collectives)."""
    shard = 1 if spec.backend == "ddp" else spec.dp
    with fake_process_group(spec.world):
        mesh = init_device_mesh("cpu", (spec.dp // shard, shard, spec.tp), mesh_dim_names=("replicate", "shard", "tp"))
        fake = fake_mode()
        with fake:
            model = GPT(c)
        # parallelised outside fake mode (the mesh's own small tensors are real); fake weights stay fake
        if spec.recompute:
            apply_activation_checkpointing(model)
        if spec.tp > 1:
            apply_tensor_parallel(model, mesh["tp"], reorder=False)
        apply_fsdp(model, mesh["replicate", "shard"], spec.precision, reshard_after_forward=spec.backend in ("zero3", "fsdp"),
                   reduce_precision=spec.reduce_precision or spec.precision)
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
                        forward, backward, after = _one_step(model, optimizer, x, spec.precision, tracker)
            peak = _categories(tracker.get_tracker_snapshot("peak"))
    memory = {
        "params": after.get("sharded_param", 0),
        "grads": backward.get("sharded_grad", 0) + backward.get("unsharded_grad", 0),
        "optimizer": after.get("opt", 0),
        "gathered_params": peak.get("unsharded_param", 0) + peak.get("all_gather", 0),
        "activations_peak": forward.get("act", 0),
        "total": peak.get("total", 0),
    }
    return memory, counter.records


def _one_step(model, optimizer, x, precision: str, tracker) -> tuple[dict, dict, dict]:
    """Forward, backward, AdamW step: the memory by category after each."""
    with autocast_context(torch.device("cpu"), precision):
        loss = model(x, x).loss
    forward = _categories(tracker.get_tracker_snapshot("current"))
    loss.backward()
    del loss
    backward = _categories(tracker.get_tracker_snapshot("current"))
    optimizer.step()
    after = _categories(tracker.get_tracker_snapshot("current"))
    optimizer.zero_grad(set_to_none=True)
    return forward, backward, after


def _categories(snapshot: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for per_device in snapshot.values():
        for key, value in per_device.items():
            name = str(getattr(key, "name", key)).lower()
            out[name] = out.get(name, 0) + int(value)
    return out


def _collectives(records: list, spec: SimSpec) -> list[dict]:
    """Collectives grouped by (op, group size): count, whole bytes, ring bytes sent per rank."""
    groups: dict = {}
    for kind, n, desc, whole in records:
        if n == 1:
            continue  # a group of one moves nothing
        row = groups.setdefault((kind, n), {"op": kind, "group": _group_name(n, desc, spec), "group_size": n,
                                            "count": 0, "bytes": 0, "bytes_per_rank": 0.0})
        row["count"] += 1
        row["bytes"] += whole
        row["bytes_per_rank"] += (2 if kind == "all_reduce" else 1) * (n - 1) / n * whole
    return sorted(groups.values(), key=lambda r: (r["group"], r["op"]))


def _group_name(n: int, desc: str, spec: SimSpec) -> str:
    for dim in ("tp", "replicate", "shard"):
        if dim in desc:
            return "tp" if dim == "tp" else "dp"
    return "tp" if n == spec.tp and spec.tp != spec.dp else "dp"


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
    if spec.backend in ("zero3", "fsdp"):  # gathered a block or two at a time: does not grow with depth
        g1, g2 = m1["gathered_params"], m2["gathered_params"]
        memory["gathered_params"] = g2
        memory["total"] = m2["total"] + (L - 2) * (m2["total"] - m1["total"] - (g2 - g1))
    one = {(r["op"], r["group_size"]): r for r in _collectives(r1, spec)}
    rows = []
    for r in _collectives(r2, spec):
        a = one.get((r["op"], r["group_size"]), {"count": 0, "bytes": 0, "bytes_per_rank": 0.0})
        rows.append({**r, **{k: a[k] + (L - 1) * (r[k] - a[k]) for k in ("count", "bytes", "bytes_per_rank")}})
    return memory, rows, f"measured with 1 and 2 layers, extended linearly to {L} (identical layers)"


# ----------------------------------------------------------------------------------------------
# beside the formulas


def params_per_rank(c: ModelConfig, tp: int) -> tuple[float, float, float]:
    """(parameters one tensor-parallel rank holds before data-parallel sharding, of them in one
    block, in the root unit: embeddings, final norm, head). Column-parallel weights and biases and
    row-parallel weights are split tp ways; row-parallel biases and everything else are replicated."""
    with torch.device("meta"):
        model = GPT(dataclasses.replace(c, n_layer=1))
    split = 0
    for name, p in model.blocks[0].named_parameters():
        whole_bias = name.endswith("c_proj.bias")
        split += p.numel() / tp if not whole_bias else p.numel()
    root = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("blocks."))
    return c.n_layer * split + root, split, root


def predicted_memory(c: ModelConfig, spec: SimSpec, per_rank: tuple[float, float, float]) -> dict:
    """Per-rank bytes by category: ZeRO's partitioning of torch's fp32 master params, grads and
    Adam m, v (4 + 4 + 8 bytes per parameter); gathered 16-bit copies (zero2: all, kept until
    backward; zero3: the root unit and one block); Korthikanti et al. 2022's activations with
    tensor parallelism, s b h (10 + 24/t) per layer (fused attention: no 5 a s^2 b / t term;
    recompute: 2 s b h), plus minigpt's LM-head/loss term (memory.activation_bytes). per_rank:
    params_per_rank(c, spec.tp)."""
    psi, block, root = per_rank
    n = 1 if spec.backend == "ddp" else spec.dp
    half = PRECISION_BYTES[spec.precision]
    gathered = {"ddp": 0.0, "zero2": half * psi}.get(spec.backend, half * (root + block))
    s, b, h = spec.seq(c), spec.micro_batch, c.n_embd
    per_layer = 2 * s * b * h if spec.recompute else s * b * h * (10 + 24 / spec.tp)
    head = M.activation_bytes(c, b, s, spec.precision)["head_and_loss"]
    out = {"params": 4 * psi / n, "grads": 4 * psi / n, "optimizer": 8 * psi / n, "gathered_params": gathered,
           "activations_peak": c.n_layer * per_layer + head}
    out["total"] = sum(out.values())
    return out


def predicted_comm(c: ModelConfig, spec: SimSpec, psi: float) -> dict:
    """Ring bytes per rank per step: the extrapolation's data-parallel volumes (DDP all-reduce
    2 Psi bytes x (n-1)/n; ZeRO-2 the same as a reduce-scatter + all-gather; ZeRO-3 / FSDP 1.5x:
    two all-gathers and a reduce-scatter) and Megatron's tensor-parallel all-reduces of b s h
    (2 forward, 2 backward per layer; recompute repeats the forward's 2), each 2 (t-1)/t. psi: the
    parameters of one tensor-parallel rank (params_per_rank)."""
    p_b = PRECISION_BYTES[spec.precision]
    g_b = PRECISION_BYTES[spec.reduce_precision or spec.precision]
    dp, t = spec.dp, spec.tp
    ring = (dp - 1) / dp * psi
    dp_bytes = {"ddp": 2 * ring * g_b, "zero2": ring * (p_b + g_b)}.get(spec.backend, ring * (2 * p_b + g_b))
    s, b = spec.seq(c), spec.micro_batch
    per_layer = (6 if spec.recompute else 4) * 2 * (t - 1) / t * b * s * c.n_embd * p_b
    return {"dp": dp_bytes, "tp": c.n_layer * per_layer if t > 1 else 0.0}


def step_times(c: ModelConfig, spec: SimSpec, comm: dict, gpu: GPUSpec, mfu: float) -> dict:
    """Seconds the counted bytes take on the GPU's links, beside the step's compute at `mfu`."""
    nvlink, inter = gpu.nvlink_gbs * 1e9, gpu.internode_gbs * 1e9
    dp_link = nvlink if spec.world <= GPUS_PER_NODE else inter  # tp innermost: dp groups span nodes beyond 8
    seq = spec.seq(c)
    convention = "exact_recompute" if spec.recompute else "exact"
    flops = F.train_flops_per_token(c, seq, convention) * spec.micro_batch * seq / spec.tp
    dtype = spec.precision if spec.precision in gpu.tflops else "bf16"
    compute_s = flops / (gpu.tflops[dtype] * 1e12 * mfu)
    tp_s, dp_s = comm["tp"] / nvlink, comm["dp"] / dp_link
    return {"gpu": gpu.name, "mfu": mfu, "compute_flops_per_rank": flops, "compute_s": compute_s,
            "tp_comm_s": tp_s, "dp_comm_s": dp_s, "tp_link": f"NVLink {gpu.nvlink_gbs:g} GB/s",
            "dp_link": (f"NVLink {gpu.nvlink_gbs:g} GB/s" if dp_link == nvlink else
                        f"inter-node {gpu.internode_gbs:g} GB/s per GPU (assumption: DGX NICs)"),
            "comm_share": (tp_s + dp_s) / (tp_s + dp_s + compute_s),
            "convention": f"{convention} FLOPs at {mfu:.0%} MFU of {gpu.name} dense {dtype}; communication not "
                          "overlapped with compute (an upper bound on its share); bandwidth term only"}


def simulate(c: ModelConfig, spec: SimSpec, gpu: GPUSpec, mfu: float | None = None) -> dict:
    """The whole report: measured memory and collectives beside the formulas, and their time."""
    spec.validate(c)
    start = time.perf_counter()
    memory, collectives, how = measure(c, spec)
    per_rank = params_per_rank(c, spec.tp)
    predicted = predicted_memory(c, spec, per_rank)
    counted = {g: sum(r["bytes_per_rank"] for r in collectives if r["group"] == g) for g in ("dp", "tp")}
    formula = predicted_comm(c, spec, per_rank[0])
    mfu = mfu if mfu is not None else REFERENCE_MFU[gpu.name][0]
    ratio = lambda a, b: a / b if b else None  # noqa: E731
    return {
        "world": spec.world, "tp": spec.tp, "dp": spec.dp, "backend": spec.backend, "precision": spec.precision,
        "reduce_precision": spec.reduce_precision or spec.precision, "micro_batch": spec.micro_batch,
        "seq_len": spec.seq(c), "recompute": spec.recompute,
        "params_total": F.param_counts(c).total, "params_per_tp_rank": per_rank[0],
        "memory_per_rank": memory, "predicted_memory_per_rank": predicted,
        "memory_ratio": {k: ratio(memory[k], predicted[k]) for k in MEMORY_KEYS},
        "collectives": collectives,
        "comm_bytes_per_rank": counted["dp"] + counted["tp"], "comm_bytes_per_rank_by_group": counted,
        "predicted_comm_bytes_per_rank": formula["dp"] + formula["tp"], "predicted_comm_bytes_per_rank_by_group": formula,
        "comm_ratio": ratio(counted["dp"] + counted["tp"], formula["dp"] + formula["tp"]),
        "time_per_step": step_times(c, spec, counted, gpu, mfu),
        "method": f"fake process group of {spec.world} ranks, fake tensors, FSDP2 + DTensor code; {how}; memory by "
                  "torch's FSDPMemTracker (bytes per rank); collectives counted from the dispatched ops, ring bytes "
                  "sent per rank",
        "elapsed_s": round(time.perf_counter() - start, 2),
    }


# ----------------------------------------------------------------------------------------------
# for the extrapolation (--comm counted)


def layout_simulator(gpu: GPUSpec, zero_stage: int, micro_batch: int, notes: list[str]):
    """A function (model, tp, pp, dp) -> the simulated step of one pipeline stage of that layout:
    L/pp layers on tp x dp ranks, ZeRO-0 as DDP, ZeRO-1/2 as zero2 (the same traffic), ZeRO-3 as
    FSDP, full recompute as the extrapolation assumes. Per-GPU memory adds the activations of the
    pp - 1 further micro-batches a 1F1B first stage holds. None (and a note) when the layout
    cannot be simulated (e.g. a mixture of experts with tensor parallelism)."""
    backend = {0: "ddp", 1: "zero2", 2: "zero2", 3: "zero3"}[zero_stage]

    def simulate_layout(c: ModelConfig, tp: int, pp: int, dp: int) -> dict | None:
        stage = dataclasses.replace(c, n_layer=max(1, c.n_layer // pp))
        spec = SimSpec(world=tp * dp, tp=tp, backend=backend, micro_batch=micro_batch, recompute=True)
        try:
            r = simulate(stage, spec, gpu)
        except UserError as e:
            notes.append(f"--comm counted: tp={tp} pp={pp} dp={dp} not simulated ({e}); formulas used")
            return None
        m = r["memory_per_rank"]
        return {"memory_per_gpu_bytes": m["total"] + (pp - 1) * m["activations_peak"],
                "dp_bytes": r["comm_bytes_per_rank_by_group"]["dp"], "tp_bytes": r["comm_bytes_per_rank_by_group"]["tp"],
                "backend": backend, "elapsed_s": r["elapsed_s"],
                "method": f"minigpt simulate of one pipeline stage ({stage.n_layer} layers, {backend}, tp {tp} x dp {dp}, "
                          f"recompute), {r['method']}"}

    return simulate_layout

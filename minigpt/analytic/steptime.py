"""Predicted step time of a model x plan x GPU, decomposed: the efficiency is predicted, not assumed.

Torch-free. A training step is the sum of parts, each from counted work over an achievable rate:

  matmul       every GEMM of a micro-batch (per tensor-parallel rank, forward, two backward GEMMs per
               forward one, the recomputed forward under full recompute, the recomputed attention core under
               selective recompute (Korthikanti et al. 2022), every second GEMM of a layer under torchtitan's
               op-level selective checkpointing ("op")), each at the roofline
               max(FLOPs / (achievable matmul rate x wave efficiency), bytes / HBM rate). Wave
               quantization: a GEMM runs as ceil(M/256) x ceil(N/128) output tiles spread over the SMs
               in whole waves (NVIDIA, "Matrix Multiplication Background User's Guide"); the best
               tile orientation is taken.
  attention    materialized (scores written to HBM: two batched GEMMs over the full square plus the softmax
               and dropout passes over b x a x s x s elements) or flash: a causal flash kernel skips the
               blocks above the diagonal, so it computes half the square, at a cited kernel rate (kernel
               benchmarks quote causal rates per computed FLOP, i.e. the square halved); its backward (two
               forwards of FLOPs) at the kernel's cited backward rate where there is one (H100: Shah et al.
               2024, Fig. 7), else at the forward's.
  memory       norms, activation, dropout and residual passes, RoPE, cross-entropy over the logits (the
               bytes its implementation moves, counted from its code: LOSS_BYTES), embedding: counted bytes
               over the achievable HBM rate; the backward moves twice the forward's bytes. Where the rates time the norm and activation passes at their shape
               (a CPU, whose GELU is bound by its arithmetic, not its memory), each at the larger of the two.
  tp_comm      tensor-parallel all-reduces (all-gather + reduce-scatter with sequence parallelism, the
               same bytes) of b s h 16-bit values, 2 per layer forward, 2 backward, 2 in a recomputed
               forward, ring bytes 2 (t-1)/t over NVLink (inter-node beyond 8 GPUs); with sequence
               parallelism the backward gathers each column-parallel GEMM's input again (Megatron keeps
               only the shard: Korthikanti et al. 2022, Sec. 4.2.2), one all-reduce's bytes a layer more.
               Exposed unless the backend overlaps them with GEMMs (Megatron-Core's tp-comm-overlap).
  cp_comm      context parallelism (plan cp > 1: each sequence split over cp ranks in 2 cp chunks, two per rank,
               so causal attention's work is even; Megatron-Core / Transformer Engine): every token-linear part
               above runs on s / cp tokens, attention on 1/cp of the causal square; keys and values go round the
               cp ranks in a ring (Liu et al. 2023, Ring Attention): (cp-1) times a rank's b s/cp (2 kv heads x
               head dim)/t 16-bit values per layer forward, and in the backward the keys and values again and
               their gradients back, 3 (cp-1) in all (4 with full recompute), each exposed beyond the attention
               kernels it passes under. The gradients are then reduced over dp x cp ranks.
  bubble       the schedule's idle fraction (plan.bubble_formula) on the busiest stage's micro-batch
               time (the last stage also holds the LM head and loss).
  pp_comm      activations / gradients between stages, b s h / t 16-bit values per micro-batch each way
               per chunk (scatter/gather over the tp ranks), exposed unless overlapped.
  dp_comm      the data-parallel gradient reduction (all-reduce, or ZeRO reduce-scatter + all-gather: the
               same bytes; ZeRO-3/FSDP gathers parameters again for the backward: 1.5x), exposed beyond
               what the backend hides behind the backward (FSDP prefetch, DDP buckets, Megatron-Core's
               overlap-grad-reduce; Megatron-LM 2021 hid none). Between nodes a group with g ranks in a
               node crosses on g NICs at once (one NIC per GPU, rail-optimized as in DGX SuperPOD; NCCL
               spreads its rings' channels over them), capped by NVLink: core.hardware.collective_link_gbs.
               Each micro-batch also adds its weight gradients into an fp32 buffer: 8 bytes a parameter.
  optimizer    the Adam update over the rank's parameter shard, 30 bytes per parameter over HBM.

The achievable rates (`Rates`, analytic/rates.py) are cited microbenchmarks of each GPU (`gpu_rates`), or measured on
the device by `minigpt bench hardware --sweep / --collectives` (`measured_rates`). One constant is fitted:
SUSTAINED, the share of the matmul and attention rates a training step sustains, chosen on the backtest's
development runs alone and reported on held-out runs committed before it (analytic/published.py, backtest).
  ep_comm      a mixture's expert-parallel all-to-alls: dispatch and combine per MoE layer, forward and backward,
               each rank's tokens x k x h, (ep-1)/ep of them to other ranks, on NVLink within a node and the
               rank's own NIC beyond (all_to_all_bytes), exposed; capacity factor and imbalance scale them.
  latency      (Setup.latency = "nccl"; off by default) each NCCL collective's latency as NCCL's own model sizes it
               (rates.collective_latency_s): the tensor-parallel ones, and the data-parallel ones a layer (FSDP) or a
               bucket (DDP_BUCKET_PARAMS), added to their transfers before any overlap. Off by default because the
               development runs say so: counted, their median |error| is 5.5% at the best share (3.1% without).
Not modelled term by term (the fitted share stands for them): kernel launch and host overhead, data loading,
stragglers, power capping, collective latency (bandwidth terms only, unless latency = "nccl"), the latency of
pipeline, context-parallel and expert-parallel transfers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from minigpt.analytic import eager, flops as F
from minigpt.analytic.rates import (  # noqa: F401  (re-exported: the rates are read as steptime.X too)
    FLASH,
    FLASH2_H100,
    HBM_EFFICIENCY,
    LINK_EFFICIENCY,
    MAMF,
    MAMF_SOURCE,
    SAME_COMPUTE,
    SMS,
    SUSTAINED,
    TILE,
    AttentionTable,
    GemmTable,
    PassTable,
    Rates,
    collective_latency_s,
    gpu_rates,
    hardware_gpu,
    measured_on,
    measured_rates,
    stands_for,
)
from minigpt.core.blocks import inventory
from minigpt.core.config import ModelConfig
from minigpt.core.errors import UserError
from minigpt.core.hardware import GPUS_PER_NODE, group_ranks_per_node, ring_link_rate
from minigpt.core.plan import ParallelPlan

OPTIMIZER_BYTES_PER_PARAM = 30  # Adam: read+write fp32 master, m, v (24), read fp32 grad (4), write 16-bit param (2)
GRAD_ACCUM_BYTES_PER_PARAM = 8  # per micro-batch: read and write an fp32 gradient buffer (Megatron's main_grad, .grad)
DDP_BUCKET_PARAMS = 40_000_000  # Megatron-Core's DDP bucket: max(40M, 1M x dp) parameters (distributed_data_parallel.py)
OVERLAPS = ("none", "backward", "prefetch", "full")  # what the backend hides (see dp_seconds)
RECOMPUTE = ("none", "selective", "op", "full")
ATTENTION = ("flash", "materialized")
LATENCY = ("none", "nccl")  # collective latency: bandwidth terms only, or NCCL's latency model added (rates.py)
KERNELS = ("fused", "eager")  # how the memory-bound passes run: see layer_memory_passes
# Bytes the cross-entropy moves per logit element (vocabulary-parallel: T x V / t elements per rank), forward and
# backward, beyond the LM head GEMM's own, counted from each implementation's code:
#   fused     one kernel each way over fp32 logits: read, write the softmax; backward read, write (16)
#   megatron  Megatron's vocab_parallel_cross_entropy (megatron/core/tensor_parallel/cross_entropy.py, unfused, the
#             default: cross_entropy_loss_fusion off): .float() (read 2, write 4), max (4), subtract in place (8),
#             exp in place (8), sum (4), divide in place (8); backward: multiply by the output gradient in place (8),
#             the gradient cast back to 16 bits (read 4, write 2): 52
#   torch     F.cross_entropy(logits.float()) in eager PyTorch: the cast (6), log_softmax over a row too long for
#             shared memory (three reads, one write: 16); backward: nll_loss's zeroed gradient (4), log_softmax's
#             backward (two reads of the gradient, one of the output, one write: 16), the cast back (6): 48
LOSS_BYTES = {"fused": 16, "megatron": 52, "torch": 48}

@dataclass(frozen=True)
class Setup:
    """How the step runs, beyond the plan: batch, recompute, attention kernel, overlap of the backend."""
    seq_len: int
    micro_batch: int = 1
    global_batch: int = 1  # sequences per optimizer step, all data-parallel ranks together
    recompute: str = "none"  # none | selective | op | full: see `recomputed_gemms` (full: one more forward)
    attention: str = "flash"  # flash | materialized
    overlap: str = "none"  # none (Megatron-LM 2021) | backward (DDP buckets) | prefetch (FSDP) | full (Megatron-Core)
    kernels: str = "fused"  # fused (torch.compile, Megatron's fused kernels) | eager (one kernel per PyTorch op)
    loss: str = "fused"  # how the cross-entropy runs: fused | megatron | torch (LOSS_BYTES)
    latency: str = "none"  # none | nccl: each NCCL collective's latency as NCCL's own model sizes it (rates.py)
    act_bytes: int = 2  # bytes per activation element (16-bit)
    grad_bytes: int = 2  # bytes per gradient element in the data-parallel reduction (4: fp32 reduce)
    param_bytes: int = 2  # bytes per parameter element FSDP / ZeRO-3 gathers
    first_stage_layers: int = 0  # layers on the first / last pipeline stage (Megatron's --decoder-first/last-
    last_stage_layers: int = 0  # pipeline-num-layers); 0: the rest spread evenly (see stage_layers)
    capacity_factor: float = 0.0  # a mixture's expert capacity over its even share (Fedus et al. 2021); 0: dropless
    expert_imbalance: float = 1.0  # dropless: the busiest expert-parallel rank's tokens over the mean

    def __post_init__(self):
        choices = (("recompute", RECOMPUTE), ("attention", ATTENTION), ("overlap", OVERLAPS), ("kernels", KERNELS),
                   ("loss", tuple(LOSS_BYTES)), ("latency", LATENCY))
        for key, allowed in choices:
            if getattr(self, key) not in allowed:
                raise UserError(f"{key} = {getattr(self, key)!r:.40} is not one of {', '.join(allowed)}: use one of them")
        for key in ("seq_len", "micro_batch", "global_batch", "act_bytes", "grad_bytes", "param_bytes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{key} = {value!r:.40} must be a positive whole number")
        for key in ("first_stage_layers", "last_stage_layers"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"{key} = {value!r:.40} must be a whole number >= 0 (0: an even split)")
        if not (self.capacity_factor == 0 or 1 <= self.capacity_factor <= 64):
            raise UserError(f"capacity_factor = {self.capacity_factor!r:.20} must be 0 (dropless) or between 1 and 64")
        if not 1 <= self.expert_imbalance <= 64:
            raise UserError(f"expert_imbalance = {self.expert_imbalance!r:.20} must be between 1 (even) and 64")

    @property
    def expert_load(self) -> float:
        """Tokens the busiest expert-parallel rank computes over its even share: the capacity when one is set
        (tokens padded to it, the rest dropped), else the imbalance."""
        return self.capacity_factor or self.expert_imbalance

    @property
    def micro_batches(self) -> int:
        return self.global_batch // self.micro_batch


@dataclass(frozen=True)
class Gemm:
    name: str
    m: int
    n: int
    k: int
    batch: int = 1  # a batched GEMM (attention scores)

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k * self.batch

    def bytes(self, el: int) -> float:
        return (self.m * self.k + self.k * self.n + self.m * self.n) * self.batch * el


def layer_gemms(c: ModelConfig, plan: ParallelPlan, b: int, s: int, attention: str, load: float = 1.0) -> list[Gemm]:
    """One layer's forward GEMMs on one tensor-parallel rank for a micro-batch of b sequences of s tokens: one
    per matmul part of the model's inventory (core/blocks.py), split by its `tp` (column: outputs / t; row:
    inputs / t) as training and simulate split it. A mixture routes each token to k experts: each expert's
    GEMMs see T k / E tokens (Megatron's expert tensor parallelism splits every expert like the dense MLP);
    over ep expert-parallel ranks a rank runs E / ep experts on the tokens of all ep ranks, T k ep / E each,
    times `load` (Setup.expert_load: the busiest rank's tokens over its even share)."""
    out = [_split_gemm(part, plan.tp, b * s, part.shape[0], plan.ep, load)
           for part in inventory(c).layer if part.is_matmul]
    if attention == "materialized":  # the score GEMMs of the attention core, after the attention projections
        heads, d = b * c.n_head // plan.tp, c.head_dim
        at = sum(1 for g in out if g.name.startswith("attn."))
        out[at:at] = [Gemm("scores", s, s, d, heads), Gemm("scores_x_v", s, d, s, heads)]
    return out


def _split_gemm(part, t: int, T: int, n_out: int, ep: int = 1, load: float = 1.0) -> Gemm:
    """The forward GEMM of a matmul part (or of n_out of its output rows) on one tensor-parallel rank."""
    n_in = part.shape[1]
    n_out, n_in = (n_out // t, n_in) if part.tp == "column" else (n_out, n_in // t) if part.tp == "row" else (n_out, n_in)
    if part.copies == 1:
        return Gemm(part.name, T, n_out, n_in)
    split = ep if part.ep else 1
    rows = max(1, round(T * split * part.active * load / part.copies))
    return Gemm(part.name, rows, n_out, n_in, part.copies // split)


def gemm_seconds(g: Gemm, r: Rates, el: int) -> float:
    """Forward + backward (dX and dW GEMMs) of one GEMM: each at its roofline with wave quantization."""
    return sum(_seconds(m, n, k, g.batch, r, el) for m, n, k in ((g.m, g.n, g.k), (g.m, g.k, g.n), (g.k, g.n, g.m)))


def forward_seconds(g: Gemm, r: Rates, el: int) -> float:
    return _seconds(g.m, g.n, g.k, g.batch, r, el)


def _seconds(m: int, n: int, k: int, batch: int, r: Rates, el: int) -> float:
    """One (batched) m x k @ k x n product: measured for this shape when the rates carry timings, else its roofline;
    over the share of it a training step sustains (Rates.sustained)."""
    return r.gemm_time(m, n, k, batch) / r.sustained if r.gemm_time is not None else _roofline(m, n, k, batch, r, el)


def _roofline(m: int, n: int, k: int, batch: int, r: Rates, el: int) -> float:
    flops = 2.0 * m * n * k * batch
    moved = (m * k + k * n + m * n) * batch * el
    return max(flops / (r.matmul_flops * r.sustained * wave_efficiency(m, n, batch, r.sms)), moved / r.hbm_bytes_per_s)


def wave_efficiency(m: int, n: int, batch: int, sms: int) -> float:
    """Share of the last wave's SMs that have a tile, best tile orientation (1 on a CPU: no SMs)."""
    if sms <= 0:
        return 1.0
    best = 0.0
    for tm, tn in (TILE, TILE[::-1]):
        tiles = math.ceil(m / tm) * math.ceil(n / tn) * batch
        best = max(best, tiles / (math.ceil(tiles / sms) * sms))
    return best


# ----------------------------------------------------------------------------------------------
# one micro-batch on one rank


def layer_memory_bytes(c: ModelConfig, plan: ParallelPlan, b: int, s: int, setup: Setup) -> float:
    """Bytes the memory-bound passes of one layer move, forward only (fused kernels: one read and one
    write per pass). Norm and residual regions are T x h per rank, or T x h / t with sequence
    parallelism (replicated over the tp ranks without it, as in Megatron-LM 2021)."""
    t, T, h = plan.tp, b * s, c.n_embd
    region = T * h / (t if plan.sp else 1)
    drop = 0.5 if c.dropout > 0 else 0.0  # a one-byte mask per element, in 16-bit element units
    elements = 2 * region * 2  # two norms: read x, write y
    elements += 2 * region * (3 + drop)  # two bias/dropout/residual adds: read y and x, write
    f = c.ffn_hidden
    elements += T * f / t * (3 if c.mlp == "swiglu" else 2)  # the activation: read (gate, up), write
    if c.pos_emb == "rope":
        elements += 2 * T * (c.n_head + c.n_kv_head) * c.head_dim / t  # rotate q and k
    if setup.attention == "materialized":
        elements += score_pass_elements(c, plan, b, s)
    return elements * setup.act_bytes


def layer_memory_passes(c: ModelConfig, plan: ParallelPlan, b: int, s: int, setup: Setup) -> tuple[float, float]:
    """(forward, backward) bytes of one layer's memory-bound passes. Fused kernels: the backward moves twice
    the forward's bytes (it reads the forward's inputs and the output gradient, writes the input gradient).
    Eager: every op of the PyTorch code on its own, counted op by op (analytic/eager.py)."""
    if setup.kernels == "fused":
        fwd = layer_memory_bytes(c, plan, b, s, setup)
        return fwd, 2 * fwd
    fwd, bwd = eager.layer_bytes(c, plan.tp, plan.sp, b, s, setup.act_bytes)
    scores = score_pass_elements(c, plan, b, s) * setup.act_bytes if setup.attention == "materialized" else 0.0
    return fwd + scores, bwd + 2 * scores


def score_pass_elements(c: ModelConfig, plan: ParallelPlan, b: int, s: int) -> float:
    """Elements the softmax (read, write) and dropout (read, write, one-byte mask) of materialized attention
    move over the b x a/t x s x s scores, in 16-bit element units."""
    drop = 2.5 if c.dropout > 0 else 0.0
    return b * c.n_head / plan.tp * s * s * (2 + drop)


def head_memory_bytes(c: ModelConfig, plan: ParallelPlan, b: int, s: int, loss: str = "fused") -> float:
    """The cross-entropy over the vocabulary-parallel logits as `loss` runs it (LOSS_BYTES), forward and backward
    together; the embedding gather and its gradient scatter-add."""
    T = b * s
    return T * c.padded_vocab_size / plan.tp * LOSS_BYTES[loss] + 3 * T * c.n_embd * 2


def attention_flops(c: ModelConfig, plan: ParallelPlan, b: int, s: int) -> float:
    """Forward FLOPs of the attention core on one rank: scores and scores x values, the full square."""
    return 4.0 * b * s * s * c.n_head * c.head_dim / plan.tp


def flash_attention_flops(c: ModelConfig, plan: ParallelPlan, b: int, s: int) -> float:
    """Forward FLOPs a causal flash kernel computes: the blocks above the diagonal are skipped, half the square."""
    return attention_flops(c, plan, b, s) / 2


def tp_bytes_per_layer(c: ModelConfig, plan: ParallelPlan, b: int, s: int, setup: Setup) -> float:
    """Ring bytes one rank sends for one layer's tensor-parallel collectives: each row-parallel part of the
    inventory all-reduces its output in the forward (a mixture: each of the k experts a token visits, over
    that expert's tokens), its column-parallel partner the input gradient in the backward, and a recomputed
    forward repeats the forward's; each all-reduce of b s h values sends 2 (t-1)/t of them. Dense: 2 + 2 (+ 2),
    a mixture 2 + 2k, as simulate counts. Sequence parallelism adds the backward's re-gathers of each
    column-parallel GEMM's input (each half an all-reduce's bytes)."""
    if plan.tp == 1:
        return 0.0
    per_pass = inventory(c).row_parallel_outputs()  # dense 2, a mixture 1 + k
    passes = per_pass * (3 if setup.recompute == "full" else 2) + (per_pass / 2 if plan.sp else 0)
    return passes * 2 * (plan.tp - 1) / plan.tp * b * s * c.n_embd * setup.act_bytes


def tp_latency_per_layer(c: ModelConfig, plan: ParallelPlan, setup: Setup, r: Rates) -> float:
    """NCCL's latency (rates.collective_latency_s) of one layer's tensor-parallel collectives, counted as
    tp_bytes_per_layer counts them: an all-reduce each, or with sequence parallelism an all-gather and a
    reduce-scatter each, and the backward's re-gathers."""
    host = nccl_host(setup, r)
    if plan.tp == 1 or not host:
        return 0.0
    per_pass = inventory(c).row_parallel_outputs()
    reduces = per_pass * (3 if setup.recompute == "full" else 2)
    per_node = min(plan.tp, GPUS_PER_NODE)
    if not plan.sp:
        return reduces * collective_latency_s("all_reduce", plan.tp, per_node, host)
    return (2 * reduces + per_pass / 2) * collective_latency_s("all_gather", plan.tp, per_node, host)


def nccl_host(setup: Setup, r: Rates) -> str:
    """The host NCCL's latency model reads when the setup counts latency, else "" (no latency)."""
    return r.nccl_host if setup.latency == "nccl" else ""


def unfused_gemms(c: ModelConfig, plan: ParallelPlan, b: int, s: int) -> list[Gemm]:
    """One layer's projections one by one, in the order a PyTorch Llama/GPT block calls them (wq, wk, wv,
    wo, then w1, w3, w2 for SwiGLU or up, down for GELU): the inventory's Linears with each fused weight cut
    into its blocks. What torchtitan's op-level checkpointing counts."""
    out = []
    for part in inventory(c).layer:
        if part.kind == "linear":
            blocks = part.fused or part.shape[:1]
            for j, rows in enumerate(blocks):  # named part[j] for the j-th block of a fused weight
                g = _split_gemm(part, plan.tp, b * s, rows)
                out.append(dataclasses.replace(g, name=f"{part.name}[{j}]" if len(blocks) > 1 else part.name))
    return out


def recomputed_gemms(c: ModelConfig, plan: ParallelPlan, b: int, s: int, setup: Setup) -> list[Gemm]:
    """The GEMM forwards a layer runs again in its backward, by recompute policy:
    full: the whole forward. selective (Korthikanti et al. 2022): the attention core, i.e. the two score
    GEMMs of materialized attention (a flash kernel's backward recomputes its scores itself, counted in
    its backward). op (torchtitan's op-level selective checkpointing): every second projection of the layer
    (it saves the output of every other matmul and of attention)."""
    if setup.recompute == "full":
        return layer_gemms(c, plan, b, s, setup.attention)
    if setup.recompute == "selective":
        return [g for g in layer_gemms(c, plan, b, s, setup.attention) if g.name.startswith("scores")]
    if setup.recompute == "op":
        return unfused_gemms(c, plan, b, s)[1::2]
    return []


def _timed_pass_extra(r: Rates, kind: str, name: str, rows: int, width: int, moved: int, el: int) -> float:
    """A norm or activation pass's (`name`: its type) measured forward + backward beyond its bytes over HBM (`moved`
    elements read and written per output element in the forward, twice that in the backward); 0 when the rates do
    not time it (`Rates.pass_time`): the pass counts at max(bytes / HBM, measured), as a roofline."""
    if r.pass_time is None:
        return 0.0
    return max(0.0, r.pass_time(kind, rows, width, name) - 3 * rows * width * moved * el / r.hbm_bytes_per_s)


def measured_pass_seconds(c: ModelConfig, plan: ParallelPlan, b: int, s: int, setup: Setup, r: Rates) -> float:
    """Seconds a layer's two norms and its activation take beyond their bytes over HBM, forward + backward."""
    act = _timed_pass_extra(r, "activation", c.mlp, b * s, c.ffn_hidden // plan.tp, 3 if c.mlp == "swiglu" else 2,
                            setup.act_bytes)  # read (gate, up), write
    return 2 * norm_pass_extra(c, plan, b, s, setup, r) + act


def norm_pass_extra(c: ModelConfig, plan: ParallelPlan, b: int, s: int, setup: Setup, r: Rates) -> float:
    """One norm's measured forward + backward beyond its bytes over HBM: read x, write y."""
    rows = b * s // (plan.tp if plan.sp else 1)
    return _timed_pass_extra(r, "norm", c.norm, rows, c.n_embd, 2, setup.act_bytes)


def recomputed_memory_bytes(c: ModelConfig, plan: ParallelPlan, b: int, s: int, setup: Setup) -> float:
    """Forward bytes of the memory-bound passes run again: all of them under full and op recompute; the
    softmax and dropout over the scores under selective recompute of materialized attention."""
    if setup.recompute in ("full", "op"):
        return layer_memory_passes(c, plan, b, s, setup)[0]
    if setup.recompute == "selective" and setup.attention == "materialized":
        return score_pass_elements(c, plan, b, s) * setup.act_bytes
    return 0.0


def stage_layers(n_layer: int, pp: int, first: int = 0, last: int = 0) -> list[int]:
    """Layers per pipeline stage: `first` and `last` where given (Megatron's --decoder-first/last-pipeline-num-
    layers; Llama 3 puts one layer fewer on each: Dubey et al. 2024, Sec. 3.3.2), the rest spread evenly over the
    other stages, one more on the earliest of them when they do not divide (torchtitan's split)."""
    if pp == 1:
        return [n_layer]
    fixed = {0: first, pp - 1: last}
    free = [i for i in range(pp) if not fixed.get(i)]
    rest = n_layer - sum(fixed.values())
    if (free and rest < len(free)) or (not free and rest != 0) or rest < 0:
        raise UserError(f"first_stage_layers = {first} and last_stage_layers = {last} leave {rest} of the {n_layer} layers "
                        f"for {len(free)} other stage(s) of pp = {pp}: each stage needs at least one layer and the "
                        f"stages must hold every layer; change them (0: an even split)")
    per, extra = divmod(rest, len(free)) if free else (0, 0)
    return [fixed[i] if fixed.get(i) else per + (1 if free.index(i) < extra else 0) for i in range(pp)]


def micro_batch_seconds(c: ModelConfig, plan: ParallelPlan, setup: Setup, r: Rates) -> dict:
    """The busiest pipeline stage's time for one micro-batch, forward + backward, by part: the stage whose layers
    (and, on the last, the LM head and loss) take longest (uneven stages: stage_layers). Under context
    parallelism a rank holds s / cp of each sequence's tokens."""
    b, s, el = setup.micro_batch, setup.seq_len // plan.cp, setup.act_bytes
    layer = _layer_seconds(c, plan, setup, r)
    head_gemm = Gemm("lm_head", b * s, c.padded_vocab_size // plan.tp, c.n_embd)
    head = {"matmul": gemm_seconds(head_gemm, r, el),
            "memory": head_memory_bytes(c, plan, b, s, setup.loss) / r.hbm_bytes_per_s + norm_pass_extra(c, plan, b, s, setup, r)}
    per_layer = sum(layer["parts"].values())
    counts = stage_layers(c.n_layer, plan.pp, setup.first_stage_layers, setup.last_stage_layers)
    last = len(counts) - 1
    busiest = max(range(len(counts)), key=lambda i: (counts[i] * per_layer + (sum(head.values()) if i == last else 0), i))
    layers = counts[busiest]
    parts = {k: layers * v + (head.get(k, 0.0) if busiest == last else 0.0) for k, v in layer["parts"].items()}
    return {"parts": parts, "total": sum(parts.values()), "stage_layers": counts, "busiest_stage": busiest,
            **{k: layers * v for k, v in layer["traffic_s"].items()}, "recomputed_flops": layers * layer["recomputed_flops"],
            "backward_share": 2 / (3 + (1 if setup.recompute == "full" else 0))}


def attention_rates(r: Rates, s: int, head_dim: int) -> tuple[float, float]:
    """(forward, backward) FLOP/s of the flash kernel over `s` tokens a sequence (a rank's share under cp): measured
    at the nearest swept shape where the rates have an attention sweep, else cited (the backward at the forward's
    rate where no backward rate is cited)."""
    if r.attention_time is not None:
        return r.attention_time(s, head_dim)
    return r.attention_flops, r.attention_bwd_flops or r.attention_flops


def _layer_seconds(c: ModelConfig, plan: ParallelPlan, setup: Setup, r: Rates) -> dict:
    """One layer's forward + backward on one rank, by part, with its transfers before any overlap."""
    b, s, el = setup.micro_batch, setup.seq_len // plan.cp, setup.act_bytes
    gemms = layer_gemms(c, plan, b, s, setup.attention, setup.expert_load)
    again = recomputed_gemms(c, plan, b, s, setup)
    matmul = sum(gemm_seconds(g, r, el) for g in gemms) + sum(forward_seconds(g, r, el) for g in again)
    attn = 0.0
    if setup.attention == "flash":  # the backward: 2 forwards of FLOPs, at the kernel's backward rate
        forwards = 1 + (1 if setup.recompute == "full" else 0)
        per = flash_attention_flops(c, plan, b, setup.seq_len) / plan.cp / r.sustained
        fwd, bwd = attention_rates(r, s, c.head_dim)
        attn = per * (forwards / fwd + 2 / bwd)
    moved = sum(layer_memory_passes(c, plan, b, s, setup)) + recomputed_memory_bytes(c, plan, b, s, setup)
    memory = moved / r.hbm_bytes_per_s + measured_pass_seconds(c, plan, b, s, setup, r)
    tp_link = r.nvlink_bytes_per_s if plan.tp <= GPUS_PER_NODE else r.internode_bytes_per_s
    tp = tp_bytes_per_layer(c, plan, b, s, setup) / tp_link + tp_latency_per_layer(c, plan, setup, r)
    tp_exposed = max(0.0, tp - matmul) if setup.overlap == "full" else tp
    # a cp ring's neighbours are tp ranks apart: NVLink within a node, else each rank's own NIC
    cp_link = r.nvlink_bytes_per_s if plan.tp * plan.cp <= GPUS_PER_NODE else r.internode_bytes_per_s
    cp = cp_bytes_per_layer(c, plan, b, s, setup) / cp_link
    ep = all_to_all_seconds(c, plan, setup, r)
    ep_bytes = sum(all_to_all_bytes(c, plan, setup))
    parts = {"matmul": matmul, "attention": attn, "memory": memory, "tp_comm": tp_exposed,
             "cp_comm": max(0.0, cp - attn), "ep_comm": ep}
    return {"parts": parts, "traffic_s": {"tp_traffic_s": tp, "cp_traffic_s": cp, "ep_traffic_s": ep, "ep_bytes": ep_bytes},
            "recomputed_flops": sum(g.flops for g in again)}


A2A_PER_LAYER = (4, ("dispatch and combine in the forward, their transposes in the backward (6 with a recomputed "
                     "forward); exposed: Megatron-Core 2024 does not overlap them (DeepSeek-V3's DualPipe does)"))


def all_to_all_bytes(c: ModelConfig, plan: ParallelPlan, setup: Setup) -> tuple[float, float]:
    """(bytes one rank sends to ranks of its own node, bytes it sends to other nodes) in one MoE layer's
    expert-parallel all-to-alls, forward + backward: each of its tokens (b s / cp, / tp with sequence
    parallelism) goes to k experts, (ep - 1) / ep of them on other ranks, padded to the capacity or, dropless,
    as loaded as the busiest rank (Setup.expert_load). The ep ranks are tp x cp ranks apart (the experts'
    mesh puts ep innermost of dp): those within a node on NVLink, the rest through the rank's own NIC."""
    if plan.ep == 1 or not c.is_moe:
        return 0.0, 0.0
    tokens = setup.micro_batch * setup.seq_len / plan.cp / (plan.tp if plan.sp else 1)
    per = tokens * c.n_expert_active * c.n_embd * setup.act_bytes * setup.expert_load
    count = A2A_PER_LAYER[0] + (2 if setup.recompute == "full" else 0)
    in_node = max(1, min(plan.ep, GPUS_PER_NODE // (plan.tp * plan.cp)))
    return count * per * (in_node - 1) / plan.ep, count * per * (plan.ep - in_node) / plan.ep


def all_to_all_seconds(c: ModelConfig, plan: ParallelPlan, setup: Setup, r: Rates) -> float:
    """One MoE layer's all-to-alls: the in-node and the cross-node shares go at once, each on its link."""
    near, far = all_to_all_bytes(c, plan, setup)
    return max(near / r.nvlink_bytes_per_s, far / r.internode_bytes_per_s)


def cp_bytes_per_layer(c: ModelConfig, plan: ParallelPlan, b: int, s_local: int, setup: Setup) -> float:
    """Bytes one rank receives round the context-parallel ring for one layer: its neighbours' keys and values
    (cp - 1 chunks of b s/cp tokens x 2 kv heads' widths / t) in the forward, the same again and their gradients
    in the backward, once more in a recomputed forward."""
    if plan.cp == 1:
        return 0.0
    passes = 3 + (1 if setup.recompute == "full" else 0)
    return passes * (plan.cp - 1) * b * s_local * 2 * c.n_kv_head * c.head_dim / plan.tp * setup.act_bytes


# ----------------------------------------------------------------------------------------------
# the step


def expert_params(c: ModelConfig) -> int:
    """Parameters of the experts of every layer (the parts expert parallelism splits)."""
    return c.n_layer * sum(p.params * p.copies for p in inventory(c).layer if p.ep) if c.is_moe else 0


def _grad_groups(c: ModelConfig, plan: ParallelPlan) -> list[tuple[float, int, int]]:
    """(parameters one rank holds, ranks that reduce their gradients together, the rank stride between them): the
    non-expert weights over the data-parallel (x cp) ranks, tp apart; a mixture's experts, split over ep, over the
    grad_ranks / ep ranks that hold the same experts, tp x ep apart (the experts' mesh puts ep innermost of dp)."""
    experts = expert_params(c)
    shard = plan.tp * plan.pp
    groups = [((F.param_counts(c).total - experts) / shard, plan.grad_ranks, plan.tp)]
    if experts:
        groups.append((experts / (shard * plan.ep), plan.grad_ranks // plan.ep, plan.tp * plan.ep))
    return groups


def _local_params(c: ModelConfig, plan: ParallelPlan) -> float:
    return sum(n for n, _, _ in _grad_groups(c, plan))


def dp_seconds(c: ModelConfig, plan: ParallelPlan, setup: Setup, r: Rates, mb: dict, m: int) -> tuple[float, float]:
    """(time of the data-parallel traffic, the part of it not hidden behind compute).

    ZeRO 0: an all-reduce of the gradients. ZeRO 1/2: a reduce-scatter of the gradients and an all-gather
    of the updated parameters (at the parameters' width). ZeRO-3 / FSDP: parameters gathered for the
    forward and again for the backward of every micro-batch, gradients reduce-scattered; FSDP's
    SHARD_GRAD_OP (zero=2 with overlap "prefetch") gathers once a micro-batch and keeps them through its
    backward (PyTorch's FSDP docs). A mixture's experts reduce over their own (smaller) group (_grad_groups). With
    Setup.latency = "nccl", each collective's latency too: one a layer under FSDP, one a DDP_BUCKET_PARAMS bucket else."""
    sharded = plan.zero == 3 or setup.overlap == "prefetch"
    gathers = (m if plan.zero == 2 else 2 * m) if sharded else (1 if plan.zero >= 1 else 0)
    host, reduce, gather, total = nccl_host(setup, r), 0.0, 0.0, 0.0
    for local, n, stride in _grad_groups(c, plan):
        if n == 1:
            continue
        ring, per_node = (n - 1) / n, group_ranks_per_node(stride, n)
        link = ring_link_rate(r.nvlink_bytes_per_s, r.internode_bytes_per_s, n, per_node)
        red = ring * local * setup.grad_bytes * (1 if plan.zero >= 1 or sharded else 2) / link
        gat = ring * local * setup.param_bytes * gathers / link
        # NCCL's latency per collective: one a layer (FSDP units, plus the root's), else one a bucket
        units = max(stage_layers(c.n_layer, plan.pp)) + 1 if sharded else math.ceil(local / max(DDP_BUCKET_PARAMS, 1e6 * n))
        lat = collective_latency_s("all_gather", n, per_node, host)
        red += units * (lat if plan.zero >= 1 or sharded else collective_latency_s("all_reduce", n, per_node, host))
        gat += units * gathers * lat
        reduce, gather, total = reduce + red, gather + gat, total + red + gat
    if total == 0.0 or setup.overlap == "none":
        return total, total
    if setup.overlap == "prefetch":  # each layer's gather prefetched under the previous layer's compute
        return total, max(0.0, total - m * mb["total"]) + total / (m * c.n_layer)
    backward = mb["total"] * mb["backward_share"]  # DDP buckets / overlap-grad-reduce: the last micro-batch's backward
    if setup.overlap == "backward":
        return total, max(0.0, total - backward)
    # Megatron-Core --overlap-grad-reduce --overlap-param-gather: the reduce under the last micro-batch's backward,
    # the parameter gather under the next step's first forward
    return total, max(0.0, reduce - backward) + max(0.0, gather - (mb["total"] - backward))


def pp_seconds(c: ModelConfig, plan: ParallelPlan, setup: Setup, r: Rates, m: int) -> tuple[float, float]:
    """(time of the stage-to-stage transfers per step, the part not overlapped). Neighbouring stages are
    tp x cp x dp ranks apart: on another node once that is a node's worth of GPUs."""
    if plan.pp == 1:
        return 0.0, 0.0
    per = setup.micro_batch * setup.seq_len / plan.cp * c.n_embd * setup.act_bytes / plan.tp
    link = r.internode_bytes_per_s if plan.tp * plan.cp * plan.dp >= GPUS_PER_NODE else r.nvlink_bytes_per_s
    total = 2 * m * plan.stages_per_rank * per / link
    return total, (0.0 if setup.overlap == "full" else total)


def step_time(c: ModelConfig, plan: ParallelPlan, setup: Setup, r: Rates) -> dict:
    """Predicted seconds per optimizer step, by part, with tokens/s/GPU, MFU and HFU."""
    check_context_parallel(plan, setup)
    m = max(1, setup.global_batch // (setup.micro_batch * plan.dp))
    mb = micro_batch_seconds(c, plan, setup, r)
    parts = {k: m * v for k, v in mb["parts"].items()}
    idle = plan.bubble_formula(m) or 0.0
    parts["bubble"] = m * mb["total"] * idle / (1 - idle)
    pp_total, parts["pp_comm"] = pp_seconds(c, plan, setup, r, m)
    dp_total, parts["dp_comm"] = dp_seconds(c, plan, setup, r, mb, m)
    sharded = plan.zero >= 1 or setup.overlap == "prefetch"
    shard = sum(local / (n if sharded else 1) for local, n, _ in _grad_groups(c, plan))
    parts["optimizer"] = shard * OPTIMIZER_BYTES_PER_PARAM / r.hbm_bytes_per_s
    # each micro-batch's weight gradients added into the fp32 accumulation buffer: read and write 4 bytes a parameter
    parts["memory"] += m * _local_params(c, plan) * GRAD_ACCUM_BYTES_PER_PARAM / r.hbm_bytes_per_s
    step = sum(parts.values())
    tokens = m * setup.micro_batch * plan.dp * setup.seq_len
    model = F.train_flops_per_token(c, setup.seq_len, "exact") * tokens
    recomputed = F.train_flops_per_token(c, setup.seq_len, "exact_recompute") * tokens - model
    if setup.recompute != "full":
        recomputed = m * mb["recomputed_flops"] * plan.world
    hardware = model + recomputed * (setup.recompute != "none")
    return {
        "step_s": step, "parts_s": parts, "micro_batches": m, "bubble_fraction": idle,
        "tokens_per_step": tokens, "tokens_per_s_per_gpu": tokens / step / plan.world,
        "mfu": model / step / plan.world / r.peak_flops, "hfu": hardware / step / plan.world / r.peak_flops,
        # each transfer before any overlap
        "traffic_s": {"tp": m * mb["tp_traffic_s"], "cp": m * mb["cp_traffic_s"], "ep": m * mb["ep_traffic_s"],
                      "pp": pp_total, "dp": dp_total},
        "ep_bytes_per_step": m * mb["ep_bytes"],  # all-to-all bytes one rank sends per step (in and beyond its node)
        "stage_layers": mb["stage_layers"], "busiest_stage": mb["busiest_stage"],
        "convention": ("predicted: parts from counted work over achievable rates (analytic/steptime.py); "
                       "MFU with the exact FLOP count (every matmul, full attention square, no recompute) over the "
                       "datasheet dense peak; HFU adds the recomputed forward"),
        "sources": r.sources,
    }


def check_context_parallel(plan: ParallelPlan, setup: Setup) -> None:
    """Context parallelism as Megatron-Core runs it: a flash kernel (the ring passes keys and values between its
    blocks) and each sequence in 2 cp equal chunks."""
    if plan.cp == 1:
        return
    if setup.attention != "flash":
        raise UserError(f"context parallelism (cp={plan.cp}) runs with a flash attention kernel; use attention = \"flash\"")
    if setup.seq_len % (2 * plan.cp):
        raise UserError(f"cp={plan.cp} splits each sequence into {2 * plan.cp} equal chunks: the sequence length "
                        f"{setup.seq_len} must divide by {2 * plan.cp}")


def tflops_per_gpu(c: ModelConfig, plan: ParallelPlan, setup: Setup, step_s: float, convention: str) -> float:
    """Achieved TFLOP/s per GPU under a named FLOP convention (how a publication counts)."""
    tokens = setup.global_batch * setup.seq_len
    return F.train_flops_per_token(c, setup.seq_len, convention) * tokens / step_s / plan.world / 1e12

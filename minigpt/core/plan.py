"""The parallel layout: one frozen, torch-free value that training, simulation and extrapolation share.

A plan says how a training step is spread over ranks: the data-parallel degree `dp` and what it shards
(`zero`, the ZeRO stage: 0 nothing, 1 optimizer state, 2 + gradients, 3 + parameters; Rajbhandari et al.
2019), the tensor-parallel degree `tp` (Megatron-LM, Shoeybi et al. 2019), the pipeline degree `pp`
(Narayanan et al. 2021), context parallelism `cp` (each sequence split over cp ranks, attention's keys
and values passed round them; predicted by the step-time model, not trained or simulated yet), expert
parallelism `ep`, offloads, and the engine that runs it (`backend`: ddp, fsdp or deepspeed; empty: the
parallel band picks the one for the stage).

One spelling everywhere, the same on `minigpt train`, `minigpt simulate` and `minigpt extrapolate`:

    --plan tp=8,pp=4,dp=32,zero=1          keys: dp tp pp zero backend offload (none|optimizer|params|all)
                                                 sp (0|1) schedule (gpipe|1f1b|interleaved-1f1b|zbv) stages_per_rank
                                                 cp ep

and the same words when printed (`describe`). Ranks are laid out pp outermost, then dp, tp innermost
(a tensor-parallel group is a node's neighbouring GPUs): rank = (pp_i * dp + dp_i) * tp + tp_i. The step-time
model puts context-parallel ranks between tp and dp, as Megatron-Core orders them (tp, cp, dp, pp).

The batch a step trains on is part of the layout too: `batch_layout` splits train.batch_size_tokens into
dp ranks x accumulation x micro-batches (nanochat's rule).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from minigpt.core.config import ModelConfig, TrainConfig, divisors
from minigpt.core.errors import UserError

OFFLOADS = {"none": (False, False), "optimizer": (True, False), "params": (False, True), "all": (True, True)}
KEYS = ("dp", "tp", "pp", "zero", "backend", "offload", "offload_to", "sp", "schedule", "stages_per_rank", "cp", "ep")
OFFLOAD_DEVICES = ("cpu", "nvme")  # where offloaded states go: CPU memory, or files on a fast disk (ZeRO-Infinity)
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zbv")
LOOPED = ("interleaved-1f1b", "zbv")  # schedules with several model chunks per pipeline rank
MAX_RANKS = 1 << 20  # a million ranks: beyond any machine, and beyond what a simulation can build


@dataclass(frozen=True)
class ParallelPlan:
    dp: int = 1  # data-parallel degree
    tp: int = 1  # tensor-parallel degree (innermost)
    pp: int = 1  # pipeline stages (outermost)
    zero: int = 0  # what data parallelism shards: 0 nothing, 1 optimizer state, 2 + gradients, 3 + parameters
    backend: str = ""  # the engine: "ddp", "fsdp", "deepspeed"; "": the default for the stage
    offload_optimizer: bool = False
    offload_params: bool = False
    offload_to: str = "cpu"  # "cpu" | "nvme": DeepSpeed ZeRO-3 swaps the offloaded states to train.nvme_path
    cp: int = 1  # context parallelism: each sequence split over cp ranks (step-time model only; not trained or simulated yet)
    ep: int = 1  # expert parallelism: a mixture's experts split over ep of the dp ranks (trained with DDP's dense part)
    sp: bool = False  # sequence parallelism with tp: norms and residuals sharded along the sequence
    schedule: str = "1f1b"  # the pipeline schedule (pp > 1)
    stages_per_rank: int = 0  # model chunks per pipeline rank; 0: the schedule's (1, or 2 for looped schedules)

    def __post_init__(self) -> None:
        for key in ("dp", "tp", "pp", "cp", "ep"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_RANKS:
                raise UserError(f"plan {key}={value!r} must be an integer in [1, {MAX_RANKS:,}]")
        if self.zero not in (0, 1, 2, 3):
            raise UserError(f"plan zero={self.zero!r} must be 0, 1, 2 or 3 (the ZeRO stage)")
        if self.schedule not in SCHEDULES:
            raise UserError(f"plan schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.stages_per_rank == 0:
            object.__setattr__(self, "stages_per_rank", 2 if self.schedule in LOOPED else 1)
        if not isinstance(self.stages_per_rank, int) or not 1 <= self.stages_per_rank <= 64:
            raise UserError(f"plan stages_per_rank={self.stages_per_rank!r} must be an integer in [1, 64] (0: the "
                            f"schedule's default)")
        if (self.schedule in LOOPED) != (self.stages_per_rank > 1) or (self.schedule == "zbv" and self.stages_per_rank != 2):
            raise UserError(f"plan schedule={self.schedule} with stages_per_rank={self.stages_per_rank}: gpipe and 1f1b "
                            f"run 1 chunk per rank, interleaved-1f1b 2 or more, zbv exactly 2")
        if self.offload_to not in OFFLOAD_DEVICES:
            raise UserError(f"plan offload_to={self.offload_to!r} is not one of {', '.join(OFFLOAD_DEVICES)}")
        if self.offload_to == "nvme" and (self.zero != 3 or not (self.offload_optimizer or self.offload_params)):
            raise UserError("offload_to=nvme swaps what ZeRO-3 offloads to files (ZeRO-Infinity): give zero=3 and "
                            "offload=optimizer, params or all, with backend=deepspeed")
        if self.sp and self.tp == 1:
            raise UserError("plan sp=1 (sequence parallelism) shards along the sequence within a tensor-parallel group: "
                            "it needs tp > 1")
        if self.world > MAX_RANKS:
            raise UserError(f"plan {self.spelling()} has {self.world:,} ranks; at most {MAX_RANKS:,}")

    # sizes and ranks ---------------------------------------------------------------------------

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def dp_shard(self) -> int:
        """Data-parallel ranks that hold distinct shards of the model states (ZeRO stage 1 and up)."""
        return self.dp if self.zero else 1

    @property
    def grad_ranks(self) -> int:
        """Ranks that hold the same parameters and reduce their gradients together: dp x cp (each of a
        sequence's cp ranks saw part of it; Megatron's data-parallel group with context parallelism)."""
        return self.dp * self.cp

    @property
    def dp_replicate(self) -> int:
        """Data-parallel ranks that hold the same (shard of the) model states."""
        return self.dp // self.dp_shard

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along each dimension."""
        return {"pp": rank // (self.dp * self.tp), "dp": rank // self.tp % self.dp, "tp": rank % self.tp}

    def dp_rank(self, rank: int) -> int:
        """Which shard of the batch a rank reads: a tensor-parallel group reads the same one."""
        return self.coords(rank)["dp"]

    @property
    def stages(self) -> int:
        """Pipeline stages (model chunks) in all: pp x stages_per_rank."""
        return self.pp * self.stages_per_rank

    def bubble_formula(self, micro_batches: int) -> float | None:
        """The idle fraction of a pipeline step: (p-1)/(m+p-1) for GPipe and 1F1B (Huang et al. 2019;
        Narayanan et al. 2021), (p-1)/(v m+p-1) interleaved with v chunks per rank (Narayanan et al. 2021,
        section 2.2); None for the zero-bubble schedule, whose bubble depends on the backward's split."""
        p, m, v = self.pp, micro_batches, self.stages_per_rank
        if self.schedule == "zbv":
            return None
        return (p - 1) / (v * m + p - 1)

    @property
    def expert_mesh_shape(self) -> tuple[int, int, int]:
        """(dp_replicate, dp_shard, ep) of the experts' own mesh (tp 1): the ep ranks innermost hold
        different experts; the dp/ep ranks that hold the same ones replicate or shard them as dp does."""
        if self.dp_replicate > 1:
            return (self.dp_replicate // self.ep, self.dp_shard, self.ep)
        return (1, self.dp_shard // self.ep, self.ep)

    @property
    def mesh_names(self) -> tuple[str, ...]:
        return ("pp", "dp_replicate", "dp_shard", "tp")

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return (self.pp, self.dp_replicate, self.dp_shard, self.tp)

    # words -------------------------------------------------------------------------------------

    def spelling(self) -> str:
        """The plan as `--plan` takes it."""
        parts = [f"dp={self.dp}", f"tp={self.tp}", f"pp={self.pp}", f"zero={self.zero}"]
        if self.backend:
            parts.append(f"backend={self.backend}")
        if self.sp:
            parts.append("sp=1")
        if self.cp > 1:
            parts.append(f"cp={self.cp}")
        if self.ep > 1:
            parts.append(f"ep={self.ep}")
        if self.pp > 1 and self.schedule != "1f1b":
            parts.append(f"schedule={self.schedule}")
            if self.stages_per_rank != (2 if self.schedule in LOOPED else 1):
                parts.append(f"stages_per_rank={self.stages_per_rank}")
        offload = next(k for k, v in OFFLOADS.items() if v == (self.offload_optimizer, self.offload_params))
        if offload != "none":
            parts.append(f"offload={offload}")
        if self.offload_to != "cpu":
            parts.append(f"offload_to={self.offload_to}")
        return ",".join(parts)

    def describe(self) -> str:
        """One line, the same on every command: `8 ranks = dp 2 (ZeRO-3, fsdp) x tp 2 x pp 2`."""
        engine = (f", {self.backend}" if self.backend else "") + (f", experts over ep {self.ep}" if self.ep > 1 else "")
        offload = [n for n, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params)) if on]
        more = (f", offload {'+'.join(offload)}" + (f" to {self.offload_to}" if self.offload_to != "cpu" else "")
                if offload else "")
        sp = " (sequence parallel)" if self.sp else ""
        pp = f" ({self.schedule}, {self.stages_per_rank} chunks per rank)" if self.pp > 1 and self.stages_per_rank > 1 else \
            (f" ({self.schedule})" if self.pp > 1 else "")
        cp = f" x cp {self.cp}" if self.cp > 1 else ""
        return (f"{self.world:,} ranks = dp {self.dp} (ZeRO-{self.zero}{engine}{more}) x tp {self.tp}{sp}{cp} x pp "
                f"{self.pp}{pp}")

    # building ----------------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str, world: int | None = None, origin: str = "--plan") -> ParallelPlan:
        """A plan from its spelling; dp defaults to world / (tp x pp) when `world` is given."""
        return cls.from_keys(parse_keys(text, origin), world, origin)

    @classmethod
    def from_keys(cls, keys: dict, world: int | None = None, origin: str = "--plan") -> ParallelPlan:
        keys = dict(keys)
        offload = OFFLOADS[keys.pop("offload", "none")]
        plan = cls(**{k: v for k, v in keys.items() if k != "dp"}, offload_optimizer=offload[0], offload_params=offload[1])
        if "dp" in keys:
            plan = dataclasses.replace(plan, dp=keys["dp"])
        elif world is not None:
            plan = plan.with_world(world, origin)
        if world is not None and plan.world != world:
            raise UserError(f"{origin} {plan.spelling()} has {plan.world:,} ranks, but {world:,} were given: make "
                            f"dp x tp x pp{' x cp' if plan.cp > 1 else ''} = {world:,}")
        return plan

    @classmethod
    def from_train(cls, tc: TrainConfig, c: ModelConfig, world: int | None = None) -> ParallelPlan:
        """The plan [train] describes for model `c` on `world` ranks (dp = world / (tp x pp); dp 1 without)."""
        plan = cls(tp=tc.tensor_parallel, pp=tc.pipeline_parallel, zero=tc.zero_stage, backend=tc.backend,
                   offload_optimizer=tc.offload_optimizer, offload_params=tc.offload_params,
                   offload_to=tc.offload_device, sp=tc.sequence_parallel,
                   schedule=tc.pipeline_schedule, stages_per_rank=tc.pipeline_stages_per_rank, ep=tc.expert_parallel)
        plan.check_model(c, world_known=world is not None)
        return plan if world is None else plan.with_world(world, "train.tensor_parallel x train.pipeline_parallel:")

    def with_world(self, world: int, origin: str = "--plan") -> ParallelPlan:
        per_replica = self.tp * self.pp * self.cp
        if world % per_replica:
            raise UserError(f"{origin.rstrip(':')}: tp x pp{' x cp' if self.cp > 1 else ''} = {per_replica} must divide the {world:,} ranks; e.g. "
                            f"--nproc_per_node {per_replica}")
        plan = dataclasses.replace(self, dp=world // per_replica)
        if plan.dp % plan.ep:
            raise UserError(f"plan ep={plan.ep} splits the experts over data-parallel ranks: it must divide dp = {plan.dp} "
                            f"({world:,} ranks); e.g. --nproc_per_node {plan.ep * per_replica}")
        return plan

    def train_overrides(self) -> list[str]:
        """The [train] keys that say this plan (`--set` strings): what `minigpt train --plan` records."""
        return [f"train.tensor_parallel={self.tp}", f"train.pipeline_parallel={self.pp}",
                f"train.zero_stage={self.zero}", f"train.offload_optimizer={str(self.offload_optimizer).lower()}",
                f"train.offload_params={str(self.offload_params).lower()}", f'train.offload_device="{self.offload_to}"'] + \
               [f"train.sequence_parallel={str(self.sp).lower()}", f'train.pipeline_schedule="{self.schedule}"',
                f"train.pipeline_stages_per_rank={self.stages_per_rank}"] + \
               [f"train.expert_parallel={self.ep}"] + ([f'train.backend="{self.backend}"'] if self.backend else [])

    def check_model(self, c: ModelConfig, world_known: bool = True, runs_here: bool = True) -> None:
        """Every dimension tensor parallelism splits divides by tp (a mixture's experts split as the dense MLP);
        the layers divide into pp stages; ep divides dp (checked again by with_world when dp is not known yet).
        runs_here=False: a layout only predicted (the step-time model's published runs), not trained or simulated
        here, so what minigpt's own backends lack (sequence parallelism with experts) is no reason to refuse it."""
        check_tensor_parallel(c, self.tp)
        if self.sp and c.is_moe and runs_here:
            raise UserError("sequence parallelism (sp=1) does not run with a mixture of experts here; use sp=0")
        if world_known and self.dp % self.ep:
            raise UserError(f"plan ep={self.ep} splits the experts over data-parallel ranks: it must divide dp = {self.dp}")
        if self.ep > 1 and (not c.is_moe or c.n_expert % self.ep):
            raise UserError(f"plan ep={self.ep} splits a mixture's experts: the model needs model.n_expert divisible by "
                            f"it (it has {c.n_expert} experts)")
        if c.n_layer < self.stages:
            more = f" x stages_per_rank {self.stages_per_rank}" if self.stages_per_rank > 1 else ""
            raise UserError(f"plan pp={self.pp}{more} has more pipeline stages than the model's {c.n_layer} layers; "
                            f"choose pp from {divisors(c.n_layer)}")

    def batch_layout(self, tc: TrainConfig, block_size: int) -> BatchLayout:
        return batch_layout(tc, block_size, self.dp)


def parse_keys(text: str, origin: str = "--plan") -> dict:
    """`tp=8,pp=4,dp=32,zero=1` -> {"tp": 8, ...}, every key and value checked."""
    keys: dict = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in KEYS:
            raise UserError(f"{origin} {text!r}: {item!r} is not KEY=VALUE with a key from {', '.join(KEYS)}, e.g. "
                            f"tp=8,pp=4,dp=32,zero=1")
        if key in keys:
            raise UserError(f"{origin} {text!r} gives {key} twice")
        keys[key] = _value(key, value, origin)
    return keys


def _value(key: str, value: str, origin: str):
    if key == "backend":
        if value not in TrainConfig.CHOICES["backend"]:
            raise UserError(f"{origin}: backend={value!r} is not one of {', '.join(TrainConfig.CHOICES['backend'])}")
        return value
    if key == "schedule":
        if value not in SCHEDULES:
            raise UserError(f"{origin}: schedule={value!r} is not one of {', '.join(SCHEDULES)}")
        return value
    if key == "sp":
        if value not in ("0", "1"):
            raise UserError(f"{origin}: sp={value!r} must be 0 or 1")
        return value == "1"
    if key == "offload":
        if value not in OFFLOADS:
            raise UserError(f"{origin}: offload={value!r} is not one of {', '.join(OFFLOADS)}")
        return value
    if key == "offload_to":
        if value not in OFFLOAD_DEVICES:
            raise UserError(f"{origin}: offload_to={value!r} is not one of {', '.join(OFFLOAD_DEVICES)}")
        return value
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{origin}: {key}={value!r} is not an integer") from None


def check_tensor_parallel(c: ModelConfig, tp: int) -> None:
    """Every sharded dimension must divide by tp (each expert's MLP is split as the dense MLP is); one clear line
    when one does not."""
    if tp == 1:
        return
    for name, n in (("model.n_head", c.n_head), ("model.n_kv_head", c.n_kv_head), ("model.ffn_hidden", c.ffn_hidden)):
        if n % tp:
            raise UserError(f"{name} = {n} does not divide by the tensor-parallel degree {tp}; choose tp from "
                            f"{[d for d in divisors(c.n_kv_head) if c.ffn_hidden % d == 0]}")


@dataclass(frozen=True)
class BatchLayout:
    """How train.batch_size_tokens splits into ranks x accumulation x micro-batches of sequences."""

    micro_batch_size: int  # sequences per forward pass on one rank
    accum: int  # micro-batches per optimizer step on one rank
    world_size: int  # data-parallel ranks (a tensor-parallel group counts once)
    block_size: int
    note: str = ""  # why the micro-batch differs from the configured one, when it does

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch_size * self.block_size * self.accum * self.world_size


def batch_layout(tc: TrainConfig, block_size: int, world_size: int) -> BatchLayout:
    """Gradient accumulation derived from the global batch in tokens (nanochat's rule).

    batch_size_tokens = 0 means one micro-batch per rank. When the configured micro-batch does not
    divide a rank's share of the global batch (e.g. the tiny preset's 4,096 tokens on 2 ranks), the
    largest micro-batch below it that does is used and `note` says so; the global batch, and so the
    training, stays the same.
    """
    micro, total = tc.micro_batch_size, tc.batch_size_tokens
    if total == 0:
        return BatchLayout(micro, 1, world_size, block_size)
    per_rank, rest = divmod(total, block_size * world_size)
    if rest or per_rank == 0:
        unit = block_size * world_size
        raise UserError(
            f"train.batch_size_tokens = {total:,} is not a multiple of block_size x data-parallel ranks = {block_size} "
            f"x {world_size} = {unit:,}; set train.batch_size_tokens to a multiple of {unit:,}, e.g. "
            f"{max(1, round(total / unit)) * unit:,}"
        )
    if per_rank % micro == 0:
        return BatchLayout(micro, per_rank // micro, world_size, block_size)
    fitted = max(d for d in divisors(per_rank) if d <= micro)
    note = (f"micro-batch {micro} -> {fitted} sequences: {total:,} tokens per step on {world_size} rank(s) is "
            f"{per_rank} sequences of {block_size} per rank, which {micro} does not divide")
    return BatchLayout(fitted, per_rank // fitted, world_size, block_size, note)

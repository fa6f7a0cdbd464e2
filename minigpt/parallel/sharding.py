"""FSDP2 and tensor parallelism through PyTorch, applied to the model from outside (torchtitan's order).

    mesh         world = dp x tp ranks, tp innermost (the ranks of one tensor-parallel group are
                 neighbours, so on GPUs they share a node's NVLink)
    tensor par.  DTensor `parallelize_module` per block on the "tp" mesh dim (Megatron-LM, Shoeybi
                 et al. 2019): column-wise QKV and MLP-in, row-wise attention out-projection and
                 MLP-out, so each block does one all-reduce forward and one backward per sublayer.
                 Embeddings, norms and the LM head stay replicated.
    sequence     with plan sp=1 (Korthikanti et al. 2022) the residual stream, the norms and the
    parallel     dropouts between sublayers hold each rank's T/tp positions: the all-reduce becomes an
                 all-gather before each sublayer and a reduce-scatter after it (the same bytes), and
                 those activations are stored once per group instead of tp times.
    FSDP2        `fully_shard` on each block, then on the root, over the "dp" mesh dim: parameters,
                 gradients and optimizer state sharded (ZeRO-3); all-gather before a block runs,
                 reduce-scatter of its gradients after.

minigpt fuses Q, K, V into one matrix (and SwiGLU's gate and up into one): a column-wise shard of
the fused rows would give rank 0 only queries. Before sharding, their rows are reordered so each
rank's contiguous slice holds its own heads' q, k, v (gate, up); state dicts are converted back
(`from_tp_layout`), so checkpoints and exported weights have the ordinary layout.

The same functions build the simulated runs of minigpt/measure/simulate.py on a fake process group.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch.distributed.device_mesh import DeviceMesh

from minigpt.core.blocks import inventory
from minigpt.core.config import Config, ModelConfig
from minigpt.core.errors import UserError
from minigpt.core.plan import BatchLayout, ParallelPlan, check_tensor_parallel
from minigpt.nn.model import GPT
from minigpt.nn.optim import DTYPES, StepResult, autocast_context, make_optimizer
from minigpt.nn.weights import read_weights
from minigpt.parallel.backend import Backend, states_saved_by_sharding
from minigpt.parallel.distributed import DistEnv

# torch.distributed.tensor (DTensor, the parallel styles, FSDP2, distributed state dicts) is imported in the
# functions that shard: it costs ~0.7 s of start-up that a one-process or DDP run does not need.


def tp_plan(c: ModelConfig, sequence_parallel: bool = False) -> dict:
    """A dense block's tensor-parallel plan (parallelize_module styles by submodule), from the `tp` of each
    part of the model's inventory (core/blocks.py): column- and row-parallel Linears; under sequence
    parallelism the norms run on sequence shards, the row-parallel outputs are reduce-scattered along the
    sequence, and attention and the MLP gather their input whole first."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel

    row = {"output_layouts": Shard(1)} if sequence_parallel else {}
    styles = {"column": ColwiseParallel, "row": lambda: RowwiseParallel(**row)}
    if sequence_parallel:
        styles["sequence"] = SequenceParallel
    plan = {p.name: styles[p.tp]() for p in inventory(c).layer if p.shape and p.tp in styles and not p.ep}
    if sequence_parallel:
        seq, full = (Shard(1), None, None, None, None), (Replicate(), None, None, None, None)
        plan["attn"] = PrepareModuleInput(input_layouts=seq, desired_input_layouts=full)
        plan["mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    return plan


def layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a GPT (a ModuleList) or of a pipeline stage (a ModuleDict by layer)."""
    blocks = model.blocks
    return list(blocks.values()) if isinstance(blocks, torch.nn.ModuleDict) else list(blocks)


# ----------------------------------------------------------------------------------------------
# the fused matrices' row order


def _row_order(c: ModelConfig, name: str, tp: int) -> torch.Tensor | None:
    """Row permutation of a fused weight (the inventory's `fused` blocks: q, k, v; gate, up) that makes each
    of tp contiguous slices whole for one rank."""
    module = name[name.find("blocks."):].rsplit(".", 1)[0] if "blocks." in name else ""
    part = inventory(c).find(module)
    if part is None or len(part.fused) < 2:
        return None
    sizes = part.fused
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    order = [torch.arange(s + r * n // tp, s + (r + 1) * n // tp) for r in range(tp) for s, n in zip(starts, sizes)]
    return torch.cat(order)


def to_tp_layout(sd: dict, c: ModelConfig, tp: int, inverse: bool = False) -> dict:
    """Ordinary layout -> the tensor-parallel row order (fused q/k/v and gate/up reordered), or back
    with inverse=True."""
    if tp == 1:
        return sd
    out = {}
    for name, t in sd.items():
        order = _row_order(c, name, tp)
        if order is not None:
            order = torch.argsort(order) if inverse else order
        out[name] = t if order is None else t[order.to(t.device)]
    return out


def from_tp_layout(sd: dict, c: ModelConfig, tp: int) -> dict:
    """The inverse of to_tp_layout."""
    return to_tp_layout(sd, c, tp, inverse=True)


def load_whole_weights(model: torch.nn.Module, weights: dict, c: ModelConfig, tp: int) -> None:
    """Whole weights in the ordinary layout into a model whose blocks hold DTensor shards (tensor parallelism,
    FSDP2): put in the tensor-parallel row order, a tied head given its embedding, each rank keeping its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if c.tie_embeddings:
        weights.setdefault("lm_head.weight", weights["wte.weight"])
    set_model_state_dict(model, to_tp_layout(weights, c, tp), options=StateDictOptions(full_state_dict=True))


def map_optimizer_state(osd: dict, fn) -> dict:
    """Apply a name -> tensor layout change to every per-parameter tensor of a full optimizer state."""
    state = {}
    for name, s in osd["state"].items():
        tensors = {k: v for k, v in s.items() if torch.is_tensor(v) and v.dim() > 0}
        state[name] = {**s, **{k: fn({name: t})[name] for k, t in tensors.items()}}
    return {**osd, "state": state}


# ----------------------------------------------------------------------------------------------
# applying the parallelisms


def apply_tensor_parallel(model: GPT, tp_mesh: DeviceMesh, reorder: bool = True, sequence_parallel: bool = False) -> GPT:
    """Shard every block's attention and MLP over tp_mesh; attention then runs on its local heads.
    reorder=False skips the fused rows' reordering (fake weights, whose values do not matter).
    sequence_parallel: between sublayers each rank holds T/tp positions; the embedding's output is cut
    into them before the first block, and gathered again for the LM head after the final norm. A
    pipeline stage without the embedding receives (and one without the head sends) the shard itself."""
    from torch.distributed.tensor.parallel import parallelize_module

    tp, c = tp_mesh.size(), model.config
    with torch.no_grad():
        for name, p in model.named_parameters() if reorder else ():
            order = _row_order(c, name, tp)
            if order is not None:
                p.copy_(p[order.to(p.device)])
    blocks = layers(model)
    for block in blocks:
        parallelize_module(block, tp_mesh, _block_plan(block, c, sequence_parallel))
        block.attn.n_head, block.attn.n_kv_head = c.n_head // tp, c.n_kv_head // tp
    if sequence_parallel:
        _shard_sequence_ends(model, blocks, tp_mesh)
    return model


def _block_plan(block, c: ModelConfig, sequence_parallel: bool) -> dict:
    """The block's tensor-parallel plan; a mixture of experts splits each expert's MLP as the dense MLP
    is split (Megatron's expert tensor parallelism: one all-reduce per expert and sublayer), by the
    inventory's `tp` of the expert parts."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = tp_plan(c, sequence_parallel)
    if not c.is_moe:
        return plan
    attn = {k: v for k, v in plan.items() if k.startswith("attn")}
    styles = {"column": ColwiseParallel, "row": RowwiseParallel}
    experts = {p.name.replace("*", str(e)): styles[p.tp]() for p in inventory(c).layer if p.ep
               for e in range(len(block.mlp.experts))}  # under expert parallelism, this rank's experts
    return {**attn, **experts}


def _shard_sequence_ends(model, blocks, tp_mesh: DeviceMesh) -> None:
    """Sequence parallelism's two edges: the replicated embedding output -> this rank's T/tp positions
    (a slice, no communication); the final norm on the shard, its output gathered whole for the head."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput, SequenceParallel, parallelize_module

    _SEQ, _FULL = (Shard(1), None, None, None, None), (Replicate(), None, None, None, None)
    if getattr(model, "wte", None) is not None and blocks:
        parallelize_module(blocks[0], tp_mesh, PrepareModuleInput(input_layouts=_FULL, desired_input_layouts=_SEQ,
                                                                  use_local_output=True))
    else:
        model.seq_shards = tp_mesh.size()  # a later pipeline stage: its input is the shard
    if getattr(model, "ln_f", None) is not None:
        parallelize_module(model, tp_mesh, {
            "ln_f": SequenceParallel(),
            "lm_head": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None),
                                          use_local_output=True)})


def apply_fsdp(model: GPT, dp_mesh: DeviceMesh, precision: str = "fp32", offload: bool = False,
               reshard_after_forward: bool = True, reduce_precision: str = "fp32", expert_mesh: DeviceMesh | None = None) -> GPT:
    """fully_shard each block, then the root (embeddings, final norm, head). bf16/fp16: parameters
    are gathered and computed in 16-bit, gradients reduced in `reduce_precision` (MixedPrecisionPolicy).
    reshard_after_forward=False keeps the gathered parameters until backward: ZeRO-2's traffic.
    expert_mesh: expert parallelism's experts are sharded first, each over the dp ranks that hold it."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=DTYPES[precision] if precision != "fp32" else None,
                              reduce_dtype=DTYPES[reduce_precision])
    kw = dict(mesh=dp_mesh, mp_policy=mp, offload_policy=CPUOffloadPolicy() if offload else None)
    kw = {k: v for k, v in kw.items() if v is not None}
    for block in layers(model) if expert_mesh is not None else ():
        for expert in block.mlp.experts:
            fully_shard(expert, reshard_after_forward=reshard_after_forward, **{**kw, "mesh": expert_mesh})
    for block in layers(model):
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
    return model


def grad_norm(params) -> torch.Tensor:
    """Global L2 norm of the gradients, whatever mix of DTensor meshes and plain tensors holds them."""
    from torch.distributed.tensor import DTensor

    groups: dict = {}
    for p in params:
        if p.grad is not None:
            key = id(p.grad.device_mesh) if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p.grad)
    squares = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2)
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros(())


# ----------------------------------------------------------------------------------------------
# the backend


def shards_parameters(plan: ParallelPlan) -> bool:
    """Whether the torch engine shards this plan's parameters with FSDP2 (ZeRO-3)."""
    return plan.backend == ShardedBackend.name and plan.zero == 3


class ShardedBackend(Backend):
    """FSDP2 (backend=fsdp: ZeRO-3) and/or tensor parallelism (tp > 1), applied by parallelize()."""

    name = "fsdp"
    runs_lora = True  # with FSDP2 alone: tensor and pipeline parallelism refuse it (Backend.check)
    # nn/optim.ShardedMuon gathers each matrix whole; under tp the fused q/k/v (gate/up) rows are in the tensor-parallel
    # order, which Newton-Schulz commutes with (X -> PX gives (PX)(PX)^T PX = P XX^T X): the same update, reordered
    runs_muon = True

    @classmethod
    def resolve(cls, plan: ParallelPlan) -> ParallelPlan:
        fsdp = plan.backend == cls.name
        if fsdp and plan.zero in (1, 2):
            raise UserError(f"backend=fsdp shards parameters too (FSDP2 is ZeRO-3): use zero=3, or backend=deepspeed "
                            f"for ZeRO-{plan.zero}")
        if plan.offload_optimizer:
            raise UserError("offload=optimizer needs backend=deepspeed (FSDP2 offloads parameters with their state)")
        if plan.offload_params and not fsdp:
            raise UserError("offload=params needs backend=fsdp or backend=deepspeed")
        if plan.offload_to == "nvme":
            raise UserError("offload_to=nvme swaps to files through DeepSpeed (ZeRO-Infinity): use backend=deepspeed")
        if not fsdp and plan.dp > 1:
            raise UserError(f"tp={plan.tp} with dp={plan.dp} shards the data-parallel part with FSDP2: use backend=fsdp "
                            f"(zero=3)")
        return dataclasses.replace(plan, zero=3 if fsdp else 0)  # resolve_plan has named the engine already

    @classmethod
    def check(cls, cfg: Config, plan: ParallelPlan, device: torch.device) -> None:
        super().check(cfg, plan, device)
        if cfg.train.precision == "fp16":
            raise UserError("train.precision = 'fp16' is not supported with FSDP/tensor parallel (no sharded grad "
                            "scaler here); use 'bf16'")
        if plan.offload_params and device.type != "cuda":
            raise UserError("train.offload_params with train.backend = 'fsdp' moves parameters from a GPU to the CPU; "
                            "on a CPU run set train.offload_params = false")
        check_tensor_parallel(cfg.model, plan.tp)

    @classmethod
    def memory_need(cls, cfg: Config, plan: ParallelPlan, layout: BatchLayout) -> float:
        """Model states divided over every rank (FSDP) or over the tensor-parallel group."""
        shards = plan.world if shards_parameters(plan) else plan.tp
        return super().memory_need(cfg, plan, layout) - states_saved_by_sharding(cfg, shards)

    def __init__(self, model: GPT, cfg: Config, env: DistEnv, plan: ParallelPlan) -> None:
        self.cfg, self.tc, self.env, self.plan = cfg, cfg.train, env, plan
        self.model, self.tp, self.fsdp = model, plan.tp, shards_parameters(plan)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(model, self.tc, fused=env.device.type == "cuda")

    def forward_backward(self, x, y, accum: int, last: bool) -> torch.Tensor:
        if self.fsdp:  # reduce-scatter the gradients on the step's last micro-batch only
            self.model.set_requires_gradient_sync(last)
        with autocast_context(self.env.device, self.tc.precision):
            out, loss = self.forward_objective(self.model, x, y)
        (loss / accum).backward()
        return out.loss.detach()

    def grad_norm(self) -> torch.Tensor:
        """The global gradient norm this rank clips by (the pipeline backend adds its other stages)."""
        return grad_norm(self.params)

    def optimizer_step(self) -> StepResult:
        norm = self.grad_norm()
        if self.tc.grad_clip > 0:  # the plain norm tensor scales DTensor gradients as a replicated scalar
            from torch.distributed.tensor.experimental import implicit_replication

            with implicit_replication():
                torch.nn.utils.clip_grads_with_norm_(self.params, self.tc.grad_clip, norm, foreach=False)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm, torch.zeros((), dtype=torch.int32))

    def _full(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def save_state(self, folder: Path) -> dict:
        """The optimizer state whole (gathered), in the ordinary layout: any world size can resume it."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        osd = get_optimizer_state_dict(self.model, self.optimizer, options=self._full())  # collective
        if not self.env.is_main:  # the whole state lands on rank 0 only
            return {}
        return {"optimizer": map_optimizer_state(osd, lambda sd: from_tp_layout(sd, self.cfg.model, self.tp))}

    def load_state(self, folder: Path, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        c = self.cfg.model
        weights = read_weights(folder)
        if self.tc.lora_rank:  # the checkpoint holds the adapters; the base came from train.init_from
            set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            load_whole_weights(self.model, weights, c, self.tp)
        osd = map_optimizer_state(state["optimizer"], lambda sd: to_tp_layout(sd, c, self.tp))
        set_optimizer_state_dict(self.model, self.optimizer, osd, options=StateDictOptions(full_state_dict=True))

    def full_state_dict(self) -> dict | None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(self.model, options=self._full())
        if not self.env.is_main:
            return None
        sd = from_tp_layout(sd, self.cfg.model, self.tp)
        if self.cfg.model.tie_embeddings:
            sd.pop("lm_head.weight", None)  # tied: saved once, under the embedding's name
        return sd

    def describe(self) -> str:
        dp = self.env.world_size // self.tp
        parts = ([f"FSDP2 over {dp} rank(s)"] if self.fsdp else []) + ([f"tensor parallel {self.tp}"] if self.tp > 1 else [])
        return ", ".join(parts) + (" +offload params" if self.tc.offload_params else "")

"""The DeepSpeed backend: ZeRO stages 0-3, offload to CPU memory or NVMe files, mixed precision, behind the same Backend
interface as the torch backend (minigpt/parallel/ddp.py). The one module that imports deepspeed,
lazily, so the rest of minigpt works without it.

The DeepSpeed config is generated from minigpt's TOML (one source of truth) and written into the
run directory as deepspeed_config.json. An expert may pass a DeepSpeed JSON file
(train.deepspeed_config) whose keys override the generated ones, except those minigpt owns
(batch sizes, accumulation, clipping, precision, ZeRO stage and offload), where a different value
is an error naming the minigpt key to set instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from minigpt.analytic import memory as M
from minigpt.analytic.flops import param_counts
from minigpt.core.blocks import inventory, numel
from minigpt.core.config import Config, TrainConfig, read_json
from minigpt.core.errors import UserError
from minigpt.core.plan import BatchLayout, ParallelPlan
from minigpt.nn.optim import DTYPES, StepResult, make_optimizer, objective
from minigpt.parallel.backend import Backend
from minigpt.parallel.distributed import DistEnv, all_gather_objects

# DeepSpeed keys minigpt sets, and the minigpt setting a user changes instead
OWNED = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.batch_size_tokens",
    "train_batch_size": "train.batch_size_tokens",
    "gradient_clipping": "train.grad_clip",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "zero_optimization.stage": "train.zero_stage",
    "zero_optimization.offload_optimizer.device": "train.offload_optimizer",
    "zero_optimization.offload_param.device": "train.offload_params",
    "zero_optimization.offload_optimizer.nvme_path": "train.nvme_path",
    "zero_optimization.offload_param.nvme_path": "train.nvme_path",
}


def require_deepspeed():
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    try:
        import deepspeed
    except ImportError:
        raise UserError("train.backend = 'deepspeed' needs the deepspeed package, which the core install leaves out: "
                        "pip install 'minigpt[deepspeed]'") from None
    return deepspeed


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def nvme_folder(tc: TrainConfig) -> Path:
    """Where NVMe offload swaps: train.nvme_path, or <out_dir>/nvme-swap (scratch, not part of a checkpoint)."""
    return Path(tc.nvme_path) if tc.nvme_path else Path(tc.out_dir) / "nvme-swap"


def remove_swap(tc: TrainConfig, rank: int) -> None:
    """This rank's swap files (DeepSpeed writes them in zero_stage_3/<state>/rank<r> of the NVMe folder), then the
    folders left empty: another rank's files, or the user's in a train.nvme_path of theirs, stay."""
    folder = nvme_folder(tc)
    for files in folder.glob(f"zero_stage_3/*/rank{rank}"):
        shutil.rmtree(files, ignore_errors=True)
    for empty in (*folder.glob("zero_stage_3/*"), folder / "zero_stage_3", *([] if tc.nvme_path else [folder])):
        with contextlib.suppress(OSError):
            empty.rmdir()


# DeepSpeed's async I/O settings for NVMe offload (its docs' defaults; one thread: this is a CPU's disk, not 8 NVMe
# drives): 1 MiB blocks, 8 requests in flight, reads and writes overlapped
AIO = {"block_size": 1 << 20, "queue_depth": 8, "thread_count": 1, "single_submit": False, "overlap_events": True}


# measured on deepspeed 0.19.8 (tests/test_offload.py): its NVMe checkpoint restores the swapped optimizer state
# stale (the first step after a resume differs from the uninterrupted run's) and fails outright with parameters
NVME_NO_RESUME = "a run with offload_to=nvme does not resume exactly (DeepSpeed restores NVMe-swapped states stale)"
NVME_PARAM_BUFFERS = 5  # DeepSpeed's default count (a module fetches its weight and bias together; 1 sufficed here)
NVME_SUB_GROUP = 10_000_000  # fp32 elements the optimizer swaps in at once (DeepSpeed's default 1e9 would hold
# 4 buffers of 4 GB in memory: ZeRO-Infinity's docs lower sub_group_size for NVMe so the swap buffers stay small)


def _offload(cfg: Config, world_size: int) -> dict:
    """zero_optimization's offload entries: to CPU memory, or the optimizer state (and with offload=params or all,
    the parameters) swapped to files in the NVMe folder (see _nvme_params)."""
    tc, out = cfg.train, {}
    if tc.offload_device == "nvme":
        if tc.offload_optimizer:
            out["offload_optimizer"] = {"device": "nvme", "nvme_path": str(nvme_folder(tc).resolve()), "pin_memory": False}
            out["sub_group_size"] = NVME_SUB_GROUP
        if tc.offload_params:
            out.update(_nvme_params(cfg, world_size))
        return out
    if tc.offload_optimizer:
        out["offload_optimizer"] = {"device": "cpu"}
    if tc.offload_params:
        out["offload_param"] = {"device": "cpu"}
    return out


def _nvme_params(cfg: Config, world_size: int) -> dict:
    """Parameters swapped to NVMe as ZeRO-Infinity does: every one DeepSpeed can swap (max_in_cpu 0; it keeps those
    under its 1 MiB I/O block in memory), swapped in through NVME_PARAM_BUFFERS buffers each the size of the largest
    parameter's partition (DeepSpeed's default 1e8 elements would hold 2 GB), and released after each use
    (stage3_max_reuse_distance 0: DeepSpeed's default 1e9 keeps every parameter swapped in from forward to backward
    and runs out of buffers on the second step) and fetched when needed, not prefetched (its NVMe prefetch fills every
    free buffer in the order the last training step met the parameters, and an evaluation, meeting them in another
    order, then finds none free); both measured with deepspeed 0.19.8."""
    largest = max(numel(p.shape) for p in inventory(cfg.model).parts() if p.shape)
    return {"offload_param": {"device": "nvme", "nvme_path": str(nvme_folder(cfg.train).resolve()), "pin_memory": False,
                              "max_in_cpu": 0, "buffer_count": NVME_PARAM_BUFFERS,
                              "buffer_size": -(-largest // world_size)},
            "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}


def check_nvme(tc: TrainConfig) -> None:
    """NVMe offload needs DeepSpeed's async I/O op (libaio's headers to build it) and a folder to swap into."""
    require_deepspeed()
    from deepspeed.ops.op_builder import AsyncIOBuilder

    # DeepSpeed's probe compiles a test against libaio with the process's stderr file descriptor: with sys.stderr
    # redirected to something without one (a notebook, minigpt called in-process) it says "incompatible"
    with contextlib.redirect_stderr(sys.__stderr__ or sys.stderr):
        compatible = AsyncIOBuilder().is_compatible(verbose=False)
    if not compatible:
        raise UserError("offload_to=nvme needs DeepSpeed's async I/O op, which builds against libaio: install it "
                        "(Debian/Ubuntu: apt-get install libaio-dev; `ds_report` then shows async_io [OKAY]), or "
                        "offload to cpu")
    folder = nvme_folder(tc)
    parent = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"train.nvme_path {folder}: no writable folder to swap into; give a folder on a fast local disk")


def build_config(cfg: Config, layout: BatchLayout) -> dict:
    """DeepSpeed's JSON config from minigpt's, merged with the user's override file if any."""
    tc = cfg.train
    micro, accum = layout.micro_batch_size, layout.accum
    zero: dict = {"stage": tc.zero_stage, **_offload(cfg, layout.world_size)}
    ds = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * layout.world_size,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": tc.precision == "bf16"},
        # dynamic loss scaling (loss_scale 0), DeepSpeed's default window and floor
        "fp16": {"enabled": tc.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if tc.offload_optimizer or tc.offload_params:
        # minigpt hands DeepSpeed a torch AdamW; DeepSpeedCPUAdam would need a compiled extension
        ds["zero_force_ds_cpu_optimizer"] = False
    if tc.offload_device == "nvme":
        ds["aio"] = dict(AIO)
    if not tc.deepspeed_config:
        return ds
    path = Path(tc.deepspeed_config)
    user = read_json(path, "train.deepspeed_config")
    ours, theirs = _flatten(ds), _flatten(user)
    for key, setting in OWNED.items():
        if key in theirs and key in ours and theirs[key] != ours[key]:
            raise UserError(
                f"{path}: {key} = {theirs[key]!r} fights minigpt's {ours[key]!r}; set {setting} in the TOML instead"
            )
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise UserError(f"{path}: '{key}' is minigpt's (AdamW with warmup + cosine); remove it from the override file")
    return _merge(ds, user)


def _single_process_env() -> None:
    """Outside torchrun, the environment of a one-rank job (DeepSpeed would otherwise look for MPI, and it reads
    LOCAL_RANK again while it saves): set for the rest of the process."""
    if "RANK" in os.environ:
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})


def _partition_for_nvme(deepspeed, model: torch.nn.Module, ds_config: dict, dtype: torch.dtype) -> None:
    """Partition the model before deepspeed.initialize, in the run's dtype (its parameters cast first, as the
    engine casts them for bf16; buffers stay fp32). Left to deepspeed.initialize, 0.19.8's parameter swapper takes
    an fp32 model's dtype as bf16 on the CPU accelerator (`dtype or fp16 if ... else bf16` in Init._set_dtype) and
    swaps fp32 weights back in as bf16."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    # without train_batch_size: Init checks it against a world of one when deepspeed.comm is not yet set up
    deepspeed.zero.Init(module=model, config_dict_or_path={k: v for k, v in ds_config.items() if k != "train_batch_size"})


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict, precision: str):
    deepspeed = require_deepspeed()
    from deepspeed.runtime.zero.utils import ZeRORuntimeException

    try:
        _single_process_env()
        if ds_config["zero_optimization"].get("offload_param", {}).get("device") == "nvme":
            _partition_for_nvme(deepspeed, model, ds_config, DTYPES[precision])
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    except (ValueError, AssertionError, ZeRORuntimeException) as e:
        raise UserError(f"DeepSpeed rejected the config: {str(e).splitlines()[0]}") from None
    return engine, ds_optimizer


class DeepSpeedBackend(Backend):
    """A DeepSpeed engine behind minigpt's Backend interface (see backend.py).

    DeepSpeed casts the model for bf16/fp16, scales the loss by 1/accumulation, reduces (and, from
    stage 2, partitions) gradients and steps at the accumulation boundary itself. Its optimizer is
    minigpt's AdamW; the gradient norm is DeepSpeed's (stages 1-3) or computed here (stage 0,
    where DeepSpeed keeps none), before clipping, whether clipping is on or not.
    """

    name = "deepspeed"
    files = ("deepspeed_config.json", "nvme-swap")
    scratch = ("nvme-swap",)  # NVMe offload's swap files (the default train.nvme_path): DeepSpeed's, not a checkpoint

    @classmethod
    def resolve(cls, plan: ParallelPlan) -> ParallelPlan:
        if plan.tp > 1 or plan.pp > 1:
            raise UserError("backend=deepspeed runs data parallelism only here (tp=1, pp=1); use backend=fsdp for "
                            "tensor parallelism")
        if plan.offload_params and plan.zero != 3:
            raise UserError("offload=params needs zero=3 (only stage 3 partitions parameters)")
        if plan.offload_optimizer and plan.zero == 0:
            raise UserError("offload=optimizer needs zero >= 1 (stage 0 keeps the optimizer whole)")
        return dataclasses.replace(plan, backend=cls.name)

    @classmethod
    def check(cls, cfg: Config, plan: ParallelPlan, device: torch.device) -> None:
        cls.check_techniques(cfg, plan)
        if cfg.train.precision == "fp16" and device.type != "cuda":
            raise UserError("train.precision = 'fp16' under DeepSpeed needs CUDA; on CPU use 'bf16' or 'fp32'")
        if plan.offload_to == "nvme":
            check_nvme(cfg.train)

    @classmethod
    def compile_rule(cls, tc: TrainConfig, device: torch.device, steps: int) -> tuple[bool, str]:
        if tc.compile:
            raise UserError("train.compile = true is not supported with train.backend = 'deepspeed' (its engine wraps "
                            "the model); set train.compile = false")
        return False, "default: off under DeepSpeed (its engine wraps the model)"

    @classmethod
    def check_resumable(cls, state: dict, run_dir: Path, plan: ParallelPlan, tc: TrainConfig) -> None:
        """Also: an NVMe run does not resume at all (said first: no other setting would make it); DeepSpeed's
        partitions are of one ZeRO stage over one number of ranks."""
        if state.get("offload_to") == "nvme" or plan.offload_to == "nvme":
            raise UserError(f"{run_dir}: {NVME_NO_RESUME}; start a new run from its weights: --set train.init_from={run_dir}")
        super().check_resumable(state, run_dir, plan, tc)
        if state.get("zero_stage") != tc.zero_stage:
            raise UserError(f"{run_dir} holds ZeRO-{state.get('zero_stage')} partitions; resume with "
                            f"--set train.zero_stage={state.get('zero_stage')} (its exported weights can start a new run)")
        if state.get("world_size") != plan.world:
            raise UserError(f"{run_dir} holds DeepSpeed partitions of {state.get('world_size')} ranks, "
                            f"not {plan.world}: resume with the same number of processes")

    @classmethod
    def cannot_resume(cls, plan: ParallelPlan) -> str | None:
        return NVME_NO_RESUME if plan.offload_to == "nvme" else None

    @classmethod
    def memory_need(cls, cfg: Config, plan: ParallelPlan, layout: BatchLayout) -> float:
        """minigpt's floor with the model states DeepSpeed holds under the plan's ZeRO stage; those swapped to NVMe
        (the optimizer state, the parameters) are not held."""
        n, precision = param_counts(cfg.model).total, cfg.train.precision
        need = super().memory_need(cfg, plan, layout)
        if not plan.zero:
            return need
        held = M.model_state_bytes(n, precision, plan.zero, plan.dp, "zero_fp32_grads")
        nvme = plan.offload_to == "nvme"
        return (need - M.model_state_bytes(n, precision, 0, 1, "amp").total + held.gradients
                + (0 if nvme and plan.offload_params else held.parameters)
                + (0 if nvme and plan.offload_optimizer else held.optimizer_state))

    def __init__(self, model: torch.nn.Module, cfg: Config, env: DistEnv, plan: ParallelPlan) -> None:
        self.tc, self.env, self.cfg, self.plan = cfg.train, env, cfg, plan
        self.ds_config = build_config(cfg, plan.batch_layout(cfg.train, cfg.model.block_size))
        if plan.offload_to == "nvme":  # DeepSpeed's swapper writes into it; its first use builds the async I/O op
            nvme_folder(self.tc).mkdir(parents=True, exist_ok=True)
        self.model = model
        self.engine, self.optimizer = initialize(model, make_optimizer(model, self.tc), self.ds_config, self.tc.precision)
        self.held: dict = {}
        self._skipped = 0

    def forward_backward(self, x, y, accum: int, last: bool) -> torch.Tensor:
        out = self.engine(x, y)
        self.engine.backward(objective(out, self.tc))  # DeepSpeed divides by its gradient_accumulation_steps
        if not last:  # DeepSpeed counts micro-steps: step() between them only advances the count
            self.engine.step()
        return out.loss.detach()

    def optimizer_step(self) -> StepResult:
        params = list({id(p): p for p in self.model.parameters()}.values())
        own = None
        if self.plan.zero == 0:  # gradients are whole and reduced here; DeepSpeed keeps no norm
            own = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        self.held = held_bytes(self.engine, self.optimizer, self.model)  # before the step frees gradients
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = own if norm is None else torch.as_tensor(float(norm), device=self.env.device)
        skipped = int(self.engine.skipped_steps > self._skipped)
        self._skipped = self.engine.skipped_steps
        return StepResult(norm if norm is not None else torch.tensor(float("nan")), torch.tensor(skipped))

    def save_state(self, folder: Path) -> dict:
        """DeepSpeed's checkpoint of the engine, except with NVMe offload: such a run cannot resume exactly
        (NVME_NO_RESUME; a new run starts from its weights, which the checkpoint holds), and DeepSpeed's save would
        swap every optimizer state back into memory and copy the swap files."""
        if self.plan.offload_to != "nvme":
            self.engine.save_checkpoint(str(folder / "deepspeed"), tag="deepspeed")
        return {"zero_stage": self.tc.zero_stage, "offload_to": self.plan.offload_to}

    def load_state(self, folder: Path, state: dict) -> None:
        path, _ = self.engine.load_checkpoint(str(folder / "deepspeed"), tag="deepspeed")
        if path is None:
            raise UserError(f"DeepSpeed found no checkpoint in {folder}; it is incomplete")

    def full_state_dict(self) -> dict | None:
        return full_state_dict(self.engine, self.model)

    def memory_report(self) -> dict:
        """Bytes each rank held (read from DeepSpeed's buffers) beside the ZeRO formulas (collective)."""
        tc, n = self.tc, param_counts(self.cfg.model).total
        rows = all_gather_objects(self.held, self.env)
        paper = M.model_state_bytes(n, tc.precision, tc.zero_stage, self.env.world_size).as_dict()
        ds = M.model_state_bytes(n, tc.precision, tc.zero_stage, self.env.world_size, layout="zero_fp32_grads").as_dict()
        return {"kind": "zero", "zero_stage": tc.zero_stage, "world_size": self.env.world_size, "precision": tc.precision,
                "params": n, "per_rank": rows, "predicted_paper": paper, "predicted_deepspeed": ds}

    def run_files(self) -> dict[str, str]:
        return {"deepspeed_config.json": json.dumps(self.ds_config, indent=2)}  # the generated config, recorded

    def describe(self) -> str:
        tc = self.tc
        return (f"DeepSpeed ZeRO-{tc.zero_stage}" + (" +offload optimizer" if tc.offload_optimizer else "")
                + (" +offload params" if tc.offload_params else ""))

    def close(self) -> None:
        self.engine.destroy()  # release the engine's hooks and buffers before the process group goes
        if self.plan.offload_to == "nvme":  # the run cannot resume from them (NVME_NO_RESUME)
            remove_swap(self.tc, self.env.rank)


def full_state_dict(engine, model: torch.nn.Module) -> dict | None:
    """Every parameter whole (ZeRO-3 partitions gathered), as fp32 CPU tensors; collective.

    Returns the dict on global rank 0 and None elsewhere. Tied weights appear once. Gathered one parameter at a
    time (every rank in the same order), so a run with parameters on NVMe needs one swap buffer, not one for each.
    """
    deepspeed = require_deepspeed()
    out = {}
    for name, p in model.named_parameters():  # a tied weight once (named_parameters leaves out repeats)
        gather = (deepspeed.zero.GatheredParameters([p], modifier_rank=None) if hasattr(p, "ds_id")
                  else contextlib.nullcontext())
        with gather:
            if engine.global_rank == 0:
                out[name] = p.detach().float().cpu().clone()
    return out if engine.global_rank == 0 else None


# ----------------------------------------------------------------------------------------------
# memory actually held by this rank


def _bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views into one flat buffer count once)."""
    seen, total = set(), 0
    for t in tensors:
        if not torch.is_tensor(t) or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def held_bytes(engine, ds_optimizer, model: torch.nn.Module) -> dict:
    """Bytes this rank holds for parameters, gradients and optimizer state, read from the engine's
    own buffers and partitions (not the process RSS)."""
    params = list({id(p): p for p in model.parameters()}.values())
    param_bytes = _bytes(getattr(p, "ds_tensor", p) for p in params)
    inner = getattr(ds_optimizer, "optimizer", ds_optimizer)
    moments = _bytes(v for st in inner.state.values() for v in st.values())
    master = 0
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        if hasattr(ds_optimizer, name):
            master = _bytes(getattr(ds_optimizer, name))
    grads = _bytes(p.grad for p in params if p.grad is not None)
    # gradient partitions: stages 1-2 keep them per group in averaged_gradients, stage 3 in one
    # flat buffer
    averaged = getattr(ds_optimizer, "averaged_gradients", None) or {}
    grads += _bytes(t for group in averaged.values() for t in (group or []))
    flat = getattr(ds_optimizer, "grad_partitions_flat_buffer", None)
    if torch.is_tensor(flat):
        grads += _bytes([flat])
    return {"parameters": param_bytes, "gradients": grads, "optimizer_state": moments + master,
            "optimizer_moments": moments, "optimizer_master_weights": master}


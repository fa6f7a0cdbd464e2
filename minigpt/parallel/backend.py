"""Training backends: the one seam between the training loop and how a step runs.

The loop (train/loop.py) sees a `Backend` and nothing else. A backend owns:
  its step        `step(micro_batches) -> (mean loss, StepResult)`: every micro-batch of the step at once
                  (accumulation and gradient-sync control inside; a pipeline schedule takes them all),
                  with the gradient norm and a skipped flag as device tensors (no host sync)
  its rules       `resolve(plan)` (which plans it runs, its defaults), `check(cfg, plan, device)` (its keys),
                  `compile_rule` (whether torch.compile applies), `memory_need` (bytes per process)
  its files       `save_state`/`load_state` in a checkpoint, `run_files` in the run directory, a memory
                  report, the whole weights for export and sampling

Implementations, chosen from the plan by `backend_class`:
  TorchBackend       one process, or DistributedDataParallel under torchrun (ZeRO-0)
  ShardedBackend     FSDP2 (ZeRO-3) and/or DTensor tensor parallelism (parallel/sharding.py)
  PipelineBackend    pp > 1: a torch.distributed.pipelining schedule over stages, each sharded as above
                     or DDP-replicated (parallel/pipeline.py)
  DeepSpeedBackend   ZeRO stages 0-3 and offload (parallel/zero.py, the only module naming DeepSpeed)

The model arrives already parallelised (parallel/parallelize.py: TP -> AC -> compile -> FSDP); a backend
constructor only wraps it in an optimizer and, for DDP and DeepSpeed, their engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from minigpt.analytic.flops import param_counts
from minigpt.analytic.memory import model_state_bytes, training_bytes_estimate
from minigpt.core.config import Config, TrainConfig
from minigpt.core.errors import UserError
from minigpt.core.plan import BatchLayout, ParallelPlan
from minigpt.nn.lora import apply_lora, merge_lora
from minigpt.nn.model import GPT
from minigpt.nn.optim import StepResult, autocast_context, objective

# torch.compile on a CPU: measured on the 2-core reference machine (benchmarks/bench_train_tiny_cpu.jsonl,
# README "Speed"), the tiny model's compiled step is 5-10% faster (~20 ms) but the first compilation takes
# ~25-30 s (~3-5 s from inductor's on-disk cache), which a run shorter than ~1,000 steps does not win back.
CPU_COMPILE_MIN_STEPS = 1000


class Backend:
    """Shared defaults; a subclass runs the step and says its own rules."""

    name: ClassVar[str] = ""
    files: ClassVar[tuple[str, ...]] = ()  # run-directory entries this backend writes (besides checkpoints)
    scratch: ClassVar[tuple[str, ...]] = ()  # of those, working folders it fills while it is built (kept by a fresh start)
    runs_muon: ClassVar[bool] = False  # whether train.optimizer = "muon" runs here (it needs whole matrices)
    runs_lora: ClassVar[bool] = False  # whether train.lora_rank > 0 runs here (frozen base, adapters trained and saved)
    # set from outside: an object whose .objective(net, x, y) gives (output, loss to backpropagate): distillation
    # (train/distill.py) or a post-training objective (train/post.py); None: the data loss
    loss_hook = None
    model: torch.nn.Module  # the model being trained (parallelised: evaluation runs on it)
    optimizer: torch.optim.Optimizer

    # rules, before anything is built --------------------------------------------------------------

    @classmethod
    def resolve(cls, plan: ParallelPlan) -> ParallelPlan:
        """The plan this backend runs, its defaults filled in; UserError for a plan it cannot run."""
        return plan

    @classmethod
    def check(cls, cfg: Config, plan: ParallelPlan, device: torch.device) -> None:
        """Training keys this backend refuses, said in one line before anything is allocated."""
        if cfg.train.deepspeed_config:
            raise UserError("train.deepspeed_config needs train.backend = 'deepspeed'")
        cls.check_techniques(cfg, plan)

    @classmethod
    def check_techniques(cls, cfg: Config, plan: ParallelPlan) -> None:
        """The optimizer and the techniques applied from outside (LoRA, distillation, experts) this backend
        and plan refuse; every backend's check calls it."""
        tc = cfg.train
        if tc.optimizer == "muon" and (not cls.runs_muon or tc.precision == "fp16"):
            raise UserError("train.optimizer = 'muon' runs on one process, DDP, FSDP2 (zero=3), tensor and expert "
                            "parallelism in fp32/bf16: its Newton-Schulz step gathers each sharded matrix whole, which "
                            "pipeline parallelism and DeepSpeed do not offer here, and fp16's grad scaler wants one torch "
                            "optimizer; use train.optimizer = 'adamw' there")
        if tc.lora_rank and (not cls.runs_lora or plan.tp > 1 or plan.pp > 1):
            raise UserError(f"train.lora_rank > 0 runs on one process, DDP or FSDP (no tensor or pipeline parallelism, "
                            f"not DeepSpeed) here; this plan is {plan.describe()} on the {cls.name} backend")
        if tc.distill_from and (plan.tp > 1 or plan.pp > 1 or cls.name == "deepspeed"):
            raise UserError("train.distill_from runs with backend=ddp or backend=fsdp without tensor or pipeline "
                            "parallelism (the teacher's logits meet the student's whole); drop tp/pp or the teacher")
        if tc.objective != "lm" and (not cls.runs_lora or plan.tp > 1 or plan.pp > 1):
            raise UserError(f"train.objective = '{tc.objective}' runs on one process, DDP or FSDP2 (backend=ddp or fsdp, "
                            f"no tensor or pipeline parallelism) here; this plan is {plan.describe()} on the {cls.name} "
                            f"backend")

    @classmethod
    def cannot_resume(cls, plan: ParallelPlan) -> str | None:
        """Why a run of this plan never resumes exactly under this backend (None: it does), said where a stop
        suggests resuming and where a resume is refused."""
        return None

    @classmethod
    def check_resumable(cls, state: dict, run_dir: Path, plan: ParallelPlan, tc: TrainConfig) -> None:
        """A checkpoint's state (state.pt) resumes under the engine (train.backend) that wrote it, with its
        optimizer and pipeline layout: checked before the model and the backend are built."""
        written_by = state.get("backend", "ddp")  # runs before the field existed were DDP's
        if written_by != plan.backend:
            raise UserError(f"{run_dir} was written by the {written_by} backend; resume with --set train.backend={written_by}")
        optimizer = state.get("optimizer_name", "adamw")  # runs before the field existed used AdamW
        if optimizer != tc.optimizer:
            raise UserError(f"{run_dir} was trained with train.optimizer = '{optimizer}'; resume with --set "
                            f"train.optimizer={optimizer}")
        ep = state.get("expert_parallel", 1)  # each rank's optimizer state holds its own experts
        if ep != plan.ep:
            raise UserError(f"{run_dir} was trained with expert_parallel = {ep}; resume with --plan ep={ep} on as many ranks "
                            f"as it had, or start a new run from its weights with --set train.init_from={run_dir}")
        pp = state.get("pipeline_parallel", 1)  # the optimizer state's layout follows the pipeline's
        if pp != plan.pp:
            raise UserError(f"{run_dir} was trained with pipeline_parallel = {pp}; resume with --set "
                            f"train.pipeline_parallel={pp}")

    @classmethod
    def check_layout(cls, plan: ParallelPlan, layout: BatchLayout) -> None:
        """The batch layout this backend refuses (e.g. a schedule's micro-batch count), said before work."""

    @classmethod
    def compile_rule(cls, tc: TrainConfig, device: torch.device, steps: int) -> tuple[bool, str]:
        """train.compile, and why: unset means on for CUDA and for a CPU run of CPU_COMPILE_MIN_STEPS
        steps or more."""
        if tc.compile is not None:
            return tc.compile, "train.compile"
        if device.type == "cuda":
            return True, "default on CUDA"
        if steps >= CPU_COMPILE_MIN_STEPS:
            return True, f"default on CPU for runs of {CPU_COMPILE_MIN_STEPS:,}+ steps"
        return False, (f"default on CPU for runs under {CPU_COMPILE_MIN_STEPS:,} steps: ~30 s of compilation is not won "
                       f"back; train.compile=true turns it on")

    @classmethod
    def memory_need(cls, cfg: Config, plan: ParallelPlan, layout: BatchLayout) -> float:
        """Bytes one process needs at least: minigpt's own trainer holds 16 bytes per parameter and one
        micro-batch's activations (memory.training_bytes_estimate)."""
        c = cfg.model
        return training_bytes_estimate(c, layout.micro_batch_size, c.block_size, cfg.train.precision)

    # the step -------------------------------------------------------------------------------------

    def step(self, micro_batches: list) -> tuple[torch.Tensor, StepResult]:
        """One optimizer step over this rank's micro-batches: (mean loss, StepResult), on device."""
        loss = torch.zeros((), device=micro_batches[0][0].device)
        for i, (x, y) in enumerate(micro_batches):
            loss += self.forward_backward(x, y, len(micro_batches), last=i == len(micro_batches) - 1)
        return loss / len(micro_batches), self.optimizer_step()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, accum: int, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch (gradients averaged over `accum`); its loss, detached."""
        raise NotImplementedError

    def optimizer_step(self) -> StepResult:
        """Clip, update, zero the gradients."""
        raise NotImplementedError

    def forward_objective(self, net, x: torch.Tensor, y: torch.Tensor):
        """(the model's output, whose .loss is logged; the loss to backpropagate): the data loss (+ MoE
        auxiliary), or the loss hook's (distillation's mix of data and teacher, a post-training objective)."""
        if self.loss_hook is not None:
            return self.loss_hook.objective(net, x, y)
        out = net(x, y)
        return out, objective(out, self.tc)

    def eval_losses(self, batches: list) -> torch.Tensor:
        """The mean loss (nats/token) of each (x, y) micro-batch, forward only, on every rank."""
        with autocast_context(self.env.device, self.tc.precision):
            return torch.stack([self.model(x, y).loss.float() for x, y in batches])

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # state and files ------------------------------------------------------------------------------

    def save_state(self, folder: Path) -> dict:
        """Collective. Write any per-rank shards into `folder`; return what state.pt keeps."""
        raise NotImplementedError

    def load_state(self, folder: Path, state: dict) -> None:
        """Collective. Restore weights and optimizer from a checkpoint folder and its state.pt."""
        raise NotImplementedError

    def full_state_dict(self) -> dict | None:
        """Collective. Every weight whole, on CPU, on rank 0 (None elsewhere); tied weights once."""
        raise NotImplementedError

    def inference_model(self) -> torch.nn.Module | None:
        """Collective. A model to sample from on rank 0 (None elsewhere)."""
        weights = self.full_state_dict()
        if weights is None:
            return None
        net = GPT(self.cfg.model)
        tc = self.tc
        if tc.lora_rank:  # the adapters on, then merged: what the run's readers will see
            apply_lora(net, tc.lora_rank, tc.lora_alpha, tc.lora_targets)
        net.load_state_dict(weights, strict=False)  # a tied head comes with the embedding
        return merge_lora(net).to(self.env.device)

    def memory_report(self) -> dict | None:
        """Collective. Per-rank memory beside the formulas, or None when the backend measures none."""
        return None

    def run_files(self) -> dict[str, str]:
        """Files (name -> text) to record in the run directory, e.g. a generated DeepSpeed config."""
        return {}

    def describe(self) -> str:
        return self.plan.describe()

    def close(self) -> None:
        pass


def states_saved_by_sharding(cfg: Config, shards: int) -> float:
    """Bytes of minigpt's trainer's model states (16 per parameter) a rank does not hold when they are
    divided over `shards` ranks."""
    states = model_state_bytes(param_counts(cfg.model).total, cfg.train.precision, 0, 1, "amp").total
    return states - states / shards

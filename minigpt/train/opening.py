"""The lines a training run opens with: model, plan, batch layout, FLOPs per step and the peak it is
measured against, the optimizer's and a teacher's costs."""

from __future__ import annotations

from minigpt.analytic.flops import forward_matmul_flops_per_token, muon_flops_per_step, param_counts
from minigpt.core.config import Config
from minigpt.core.plan import BatchLayout
from minigpt.core.resolve import init_source
from minigpt.train.state import Run


def opening_lines(run: Run, device_notes: list[str], compile_note: str, resume: bool) -> list[str]:
    cfg, env, layout, m = run.cfg, run.env, run.layout, run.metrics
    c, tc = cfg.model, cfg.train
    counts = param_counts(c)
    lines = run.prepared.summary_lines() + [
        f"model    {counts.total:,} parameters ({counts.non_embedding:,} non-embedding), "
        f"{c.n_layer} layers x {c.n_embd} wide, block {c.block_size}",
        f"train    {env.world_size} process(es) on {env.device} ({', '.join(device_notes) or 'defaults'}), "
        f"{tc.precision}, {run.backend.describe()}" + (", activation checkpointing" if tc.activation_checkpointing else ""),
        f"plan     {run.plan.describe()} (--plan {run.plan.spelling()})",
        f"compile  {compile_note}",
        f"batch    {layout.micro_batch_size} seq x {c.block_size} tok x {layout.accum} accum x {run.plan.dp} data-parallel ranks "
        f"= {layout.tokens_per_step:,} tokens/step, steps {run.start_step}->{run.end_step} of {tc.max_steps}"
        + (f" (resumed from step {run.start_step})" if resume else ""),
    ]
    if layout.note:
        lines.append(f"note     {layout.note}")
    if tc.warmup_steps >= tc.max_steps:
        lines.append(f"note     train.warmup_steps = {tc.warmup_steps} >= train.max_steps = {tc.max_steps}: the whole run is "
                     f"warm-up, the learning rate never reaches train.lr")
    peak = m.peak
    lines.append(f"mfu      model FLOPs {m.flops / layout.tokens_per_step:,.0f}/token (exact matmul count, 3x forward, "
                 f"full attention square, no recompute) per device / peak: {peak.source}"
                 + (f" = {peak.tflops:g} TFLOP/s" if peak.known else " (no MFU; set train.peak_tflops or train.peak_from)"))
    return lines + optimizer_lines(cfg, m.flops / env.world_size) + teacher_lines(cfg, m.flops, layout)


def teacher_flops_per_step(cfg: Config, tokens_per_step: int) -> float:
    """The teacher's forward FLOPs (exact matmul count) over one step's tokens."""
    teacher = init_source(cfg.train.distill_from, "train.distill_from")[1]
    return forward_matmul_flops_per_token(teacher, cfg.model.block_size) * tokens_per_step


def teacher_lines(cfg: Config, student_flops: float, layout: BatchLayout) -> list[str]:
    """Distillation's extra work: the teacher's forward on every micro-batch (not in the student's MFU)."""
    if not cfg.train.distill_from:
        return []
    per_step = teacher_flops_per_step(cfg, layout.tokens_per_step)
    return [f"teacher  forward {per_step / layout.tokens_per_step:,.0f} FLOPs/token = {per_step:.4g} per step "
            f"({per_step / student_flops:.1%} of the student's training FLOPs; counted here, not in the student's MFU)"]


def optimizer_lines(cfg: Config, device_flops: float) -> list[str]:
    """What train.optimizer and train.schedule are, and Muon's extra FLOPs (not in the model FLOPs)."""
    tc = cfg.train
    schedule = (f"wsd (warmup {tc.warmup_steps}, stable, linear decay over the last {tc.decay_fraction:.0%})"
                if tc.schedule == "wsd" else f"cosine (warmup {tc.warmup_steps})")
    if tc.optimizer != "muon":
        return [f"optim    AdamW, lr {tc.lr:g} -> {tc.min_lr:g}, {schedule}"]
    extra = muon_flops_per_step(cfg.model, ep=tc.expert_parallel)
    return [f"optim    Muon (5 Newton-Schulz steps) on the blocks' matrices + AdamW on the rest, lr {tc.lr:g} -> "
            f"{tc.min_lr:g}, {schedule}; Newton-Schulz adds {extra:,.0f} FLOPs per step on every rank ({extra / device_flops:.1%} "
            f"of the step's model FLOPs per device, not in MFU)"]

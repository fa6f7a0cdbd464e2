"""Training: one loop for every backend, in one process or many under torchrun.

    minigpt train --config tiny [--plan dp=2,zero=3]
    torchrun --nproc_per_node 2 -m minigpt train --config tiny      (or -m minigpt.train)

Read top to bottom: `TrainState` (what a checkpoint resumes), `evaluate` (a loss over fixed batches),
then `train`, which starts a run, loops and finishes it. The parallel layout is one `ParallelPlan`,
built once in `start` from [train] and the world size; `parallelize` applies it to the model and the
plan's backend owns the step (every micro-batch of it at once), its rules and its files: the loop has no
branch on it. Checkpoints go through one Checkpointer; step and evaluation lines through one
MetricsLogger, the only place a step reads the device.

Batches depend only on (seed, step, global micro-batch) and every piece of state (weights,
optimizer, grad scaler, RNG of every rank) is checkpointed, so a resumed run continues exactly.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from dataclasses import asdict

import torch

from minigpt.analytic.flops import param_counts
from minigpt.analytic.report import per_rank_memory_table
from minigpt.core.atomic import atomic_write_text
from minigpt.core.config import Config
from minigpt.core.device import configure_device, device_name, peak_memory_bytes
from minigpt.core.errors import UserError
from minigpt.core.fmt import to_json
from minigpt.core.hardware import choose_peak, mfu_warning
from minigpt.core.plan import ParallelPlan
from minigpt.data.loader import BatchLoader, get_batch
from minigpt.data.tokenizer import bits_per_byte
from minigpt.infer.generate import generate_text
from minigpt.interop.hf import load_init_weights
from minigpt.nn.lora import apply_lora
from minigpt.nn.model import GPT, routing_stats, update_router_bias
from minigpt.nn.optim import lr_at
from minigpt.parallel.backend import Backend
from minigpt.parallel.distributed import (
    DistEnv,
    StopControl,
    StopSignal,
    all_reduce_mean,
    heartbeat,
    init_distributed,
    shutdown,
    silent_ranks_error,
)
from minigpt.parallel.parallelize import eager, parallelize
from minigpt.parallel.registry import check_memory, make_backend
from minigpt.train.checkpoint import Checkpointer, RunDir
from minigpt.train.distill import Distiller, load_teacher
from minigpt.train.metrics import check_sinks
from minigpt.train.opening import opening_lines, teacher_flops_per_step
from minigpt.train.run_dir import (
    AlreadyDone,
    bytes_and_entropy,
    check_not_done,
    check_sampling,
    check_sources,
    claimed,
    make_metrics,
    plan_run,
    prepare_run_data,
    restore_state,
    resume_checked,
    resume_or_fresh,
    write_run_files,
)
from minigpt.train.state import Run


@torch.no_grad()
def evaluate(backend: Backend, tokens, cfg: Config, env: DistEnv, dp_rank: int, split_id: int,
             bytes_of: torch.Tensor, micro_batch: int) -> tuple[float, float | None]:
    """(mean loss in nats/token, bits per byte) over eval_iters micro-batches at fixed positions (the same
    at every evaluation); each data-parallel rank reads its own, a tensor-parallel group the same.
    bytes_of: bytes of text per token id (data.tokenizer.token_bytes), the denominator of bits per byte.
    micro_batch: sequences per forward pass, the batch layout's (never more than training's)."""
    model = backend.model
    was_training = model.training
    model.eval()
    batches = [tuple(t.to(env.device) for t in get_batch(tokens, micro_batch, cfg.model.block_size,
                                                          (cfg.train.seed, split_id, i, dp_rank)))
               for i in range(cfg.train.eval_iters)]
    with eager():
        losses = backend.eval_losses(batches).double()
    model.train(was_training)
    ys = torch.stack([y for _, y in batches])
    counts = torch.tensor([float(y.numel()) for _, y in batches], dtype=torch.float64, device=env.device)
    sums = torch.stack([(losses * counts).sum(), counts.sum(), bytes_of[ys].sum().double()])  # nats, tokens, bytes
    nats, count, num_bytes = all_reduce_mean(sums, env).tolist()
    return nats / count, bits_per_byte(nats, num_bytes)


# ----------------------------------------------------------------------------------------------
# a run


def train(cfg: Config, resume: bool = False, stop_at: int | None = None, overwrite: bool = False,
          log=print) -> dict:
    """Train per `cfg`; with resume=True continue from the latest checkpoint in train.out_dir.

    stop_at: stop (and checkpoint) after this step, keeping the schedule of max_steps; used to
    split a run in two. Returns the final summary (also printed as one JSON line); its `stopped`
    says when a signal or train.max_minutes ended the run early (after a checkpoint).
    """
    env = init_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    run = None
    if cfg.train.objective == "lm":
        begin, steps, end = start, loop, finish
    else:  # post-training: the same loop's parts for chat data (train/post_run.py)
        from minigpt.train import post_run
        begin, steps, end = post_run.start, post_run.loop, post_run.finish
    try:
        with StopControl(env, cfg.train.max_minutes) as stop:
            run = begin(cfg, env, resume, stop_at, overwrite, log)
            steps(run, stop)
        summary = end(run)
    except AlreadyDone as done:
        shutdown(env)
        return json.loads(str(done))
    except StopSignal as e:  # before the first step: the start cleaned up, nothing was written
        shutdown(env, together=False)
        if env.is_main:
            log(f"stopped by {e.name} before training began; nothing was written")
        return {"event": "final", "stopped": e.name, "step": None}
    except BaseException as e:
        silent = silent_ranks_error(env, e) if isinstance(e, RuntimeError) else None
        traceback.clear_frames(e.__traceback__)  # the failed frames hold the model and its process group
        if run is not None:
            run.metrics.close()
        shutdown(env, together=False)
        if silent is not None:
            raise silent from None
        raise
    run.backend.close()
    if run.lock is not None:
        run.lock.release()
    shutdown(env)
    return summary


def start(cfg: Config, env: DistEnv, resume: bool, stop_at: int | None, overwrite: bool, log) -> Run:
    """Check everything, claim the run directory, prepare data, model, backend; restore a checkpoint.

    Nothing is written into the run directory until every check has passed (a directory this
    start created is removed again if it fails).
    """
    tc = cfg.train
    say = log if env.is_main else (lambda *a, **k: None)
    plan, layout, compile_why = plan_run(cfg, env, stop_at)
    paths = RunDir(tc.out_dir)
    with claimed(paths, env) as lock:
        resume = resume_or_fresh(cfg, paths, resume, overwrite, say)
        if resume:  # what the run was started from is what it continues with: a changed base or teacher refused
            check_sources(paths.root, tc)
        end_step = stop_at if stop_at is not None else tc.max_steps
        check_not_done(paths, resume, end_step, say)
        check_memory(cfg, env, plan, layout)
        check_sinks(tc.log_to)
        device_notes = configure_device(tc, env.device)  # threads first: a stored CPU peak must match them
        peak = choose_peak(device_name(env.device), tc.precision, tc.peak_tflops, tc.peak_from,
                           threads=torch.get_num_threads())
        checkpointer = Checkpointer(paths, env, tc.checkpoint_every, tc.keep_checkpoints)
        saved = resume_checked(checkpointer, plan, paths, tc) if resume else None
        prepared, starts = prepare_run_data(cfg, env, paths, resume, say)
        check_sampling(cfg, prepared)
        backend = _build(cfg, env, plan, resume, say)
        state = restore_state(checkpointer, backend, plan, saved, env)
        write_run_files(paths, cfg, prepared, backend, state.step if resume else None, env)
    metrics = make_metrics(cfg, env, say, paths, layout, peak, state.step if resume else None, end_step)
    run = Run(cfg, env, say, paths, prepared, plan, layout, backend, checkpointer, metrics, state, state.step,
              end_step, lock, document_starts=starts)
    run.bytes_of, run.entropy = bytes_and_entropy(prepared, cfg, env)
    for line in opening_lines(run, device_notes, f"{'on' if tc.compile else 'off'} ({compile_why})", resume):
        say(line)
    return run


def _build(cfg: Config, env: DistEnv, plan: ParallelPlan, resume: bool, say) -> Backend:
    """The model (initial or init_from weights, equal on every rank), parallelised, in its backend."""
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = GPT(cfg.model)
    tc = cfg.train
    if tc.init_from and (not resume or tc.lora_rank):  # a LoRA run's base is read again on resume
        say(f"init     {load_init_weights(model, tc.init_from)}" + ("" if resume else "; fresh optimizer and schedule"))
    if tc.lora_rank:
        torch.manual_seed(tc.seed)  # the adapters' initial A, equal on every rank
        adapters = apply_lora(model, tc.lora_rank, tc.lora_alpha, tc.lora_targets)
        say(f"lora     rank {tc.lora_rank}, alpha {tc.lora_alpha:g} on {', '.join(tc.lora_targets)}: {adapters:,} trainable "
            f"of {model.num_params():,} parameters ({adapters / model.num_params():.2%}); the base frozen")
    backend = make_backend(parallelize(model, plan, tc, env.device), cfg, env, plan)
    if tc.distill_from:
        backend.loss_hook = Distiller(_teacher(cfg, env, say), cfg)
    return backend


def _teacher(cfg: Config, env: DistEnv, say) -> GPT:
    teacher, what = load_teacher(cfg, env.device)
    say(f"teacher  {what}; loss = {1 - cfg.train.distill_alpha:g} x data CE + {cfg.train.distill_alpha:g} x T^2 KL at "
        f"T = {cfg.train.distill_temperature:g}")
    return teacher


def loop(run: Run, stop: StopControl) -> None:
    """The steps, each followed by its evaluation, sample and checkpoint cadences; a stop request
    (agreed by every rank) saves the step just finished and ends the loop."""
    tc, env, state = run.cfg.train, run.env, run.state
    steps = range(state.step, run.end_step)
    tokens = run.prepared.tokens("train")
    run.t_start = time.perf_counter()
    stop.graceful = True  # from here a signal finishes the step and saves
    with BatchLoader(tokens, run.layout.micro_batch_size, run.cfg.model.block_size, tc.seed,
                     run.plan.dp_rank(env.rank), run.layout.accum, steps, env.device,
                     allowed=run.document_starts) as batches:
        for step, micro_batches in zip(steps, batches):
            lr = lr_at(step, tc)
            run.backend.set_lr(lr)
            loss, result = run.backend.step(micro_batches)
            if run.cfg.model.moe_bias_update_rate:  # DeepSeek-V3's balancing, alike on every data-parallel rank
                update_router_bias(run.backend.model, lambda t: all_reduce_mean(t, env))
            state.step = step + 1
            run.metrics.log_step(state.step, loss, result, lr, routing=lambda: routing_stats(run.backend.model))
            heartbeat(env, state.step)
            run.stopped = stop.requested()
            _after_step(run, loss)
            if run.stopped:
                break


def _after_step(run: Run, loss: torch.Tensor) -> None:
    """Evaluation, samples and checkpoints at their cadences (evaluation at the end, a checkpoint at
    the end or when the run stops early)."""
    tc, step = run.cfg.train, run.state.step
    synced = False
    if not run.stopped and ((tc.eval_every and step % tc.eval_every == 0) or step == run.end_step):
        dp_rank, bytes_of = run.plan.dp_rank(run.env.rank), run.bytes_of
        micro = run.layout.micro_batch_size  # the layout's: train.micro_batch_size clamped to the batch
        run.val_loss, run.val_bpb = evaluate(run.backend, run.prepared.tokens("val"), run.cfg, run.env, dp_rank,
                                             1, bytes_of, micro)
        run.train_loss, run.train_bpb = evaluate(run.backend, run.prepared.tokens("train"), run.cfg, run.env,
                                                 dp_rank, 2, bytes_of, micro)
        run.metrics.log_eval(step, (run.train_loss, run.train_bpb), (run.val_loss, run.val_bpb), run.entropy)
        synced = True
    if not run.stopped and tc.sample_every and step % tc.sample_every == 0 and step != run.end_step:
        sample(run, step)
        synced = True
    if run.checkpointer.due(step, run.end_step) or run.stopped:
        value = all_reduce_mean(loss, run.env).item()
        if not math.isfinite(value):  # never checkpoint diverged weights over good ones
            raise UserError(f"training diverged: the loss is {value} at step {step}; the last checkpoint keeps finite "
                            f"weights: lower train.lr (or raise train.warmup_steps), then --resume {run.paths.root}")
        run.state.skipped_steps = run.metrics.skipped_total
        run.checkpointer.save(step, run.backend, asdict(run.state))
        synced = True
    if synced:
        run.metrics.restart_clock(step)


def sample(run: Run, step: int) -> None:
    model = run.backend.inference_model()  # collective (DeepSpeed gathers ZeRO-3 partitions)
    if model is None:
        return
    sc = run.cfg.sample
    texts, _ = generate_text(model, run.prepared.load_tokenizer(), [sc.prompt], eot_id=run.prepared.manifest["eot_id"],
                             max_new_tokens=min(sc.max_new_tokens, 120), temperature=sc.temperature,
                             top_k=sc.top_k, top_p=sc.top_p, seed=sc.seed)
    run.say(f"sample @ step {step}:\n{texts[0]}\n" + "-" * 40)


def finish(run: Run) -> dict:
    """Final sample, per-rank memory, the run report and summary.json; returns the summary."""
    cfg, env, paths = run.cfg, run.env, run.paths
    steps_run = run.state.step - run.start_step
    wall = time.perf_counter() - run.t_start
    run.metrics.close()
    if run.stopped:
        why = type(run.backend).cannot_resume(run.plan)
        next_step = (f"{why}: start a new run from its weights with --set train.init_from={paths.root}" if why
                     else f"resume with: minigpt train --resume {paths.root}")
        run.say(f"stopped by {run.stopped} at step {run.state.step}; {next_step}")
    else:
        sample(run, run.end_step)
    summary = {
        "event": "final", "run_dir": str(paths.root), "step": run.state.step, "max_steps": cfg.train.max_steps,
        "stopped": run.stopped, "train_loss": run.train_loss, "val_loss": run.val_loss,
        "train_bpb": run.train_bpb, "val_bpb": run.val_bpb,
        "unigram_entropy_nats": run.entropy[0], "unigram_entropy_bpb": run.entropy[1],
        "tokens_seen": run.state.step * run.layout.tokens_per_step,
        "tokens_per_s": round(steps_run * run.layout.tokens_per_step / wall, 1) if steps_run else None,
        "wall_s": round(wall, 2), "world_size": env.world_size, "device": str(env.device),
        "precision": cfg.train.precision, "compile": cfg.train.compile, "backend": run.backend.describe(),
        "params": param_counts(cfg.model).total, "fp16_skipped_steps": run.metrics.skipped_total,
    }
    per_rank = run.backend.memory_report() if steps_run else None  # collective
    if env.is_main and per_rank is not None:
        atomic_write_text(paths.root / "memory_per_rank.json", to_json(per_rank, indent=2))
        run.say(per_rank_memory_table(per_rank))
    if env.is_main and cfg.train.report and steps_run and not run.stopped:
        run.say("report   counting FLOPs on the meta device and memory under fake tensors for report.md (seconds)")
        summary.update(_report(run, summary))
    if env.is_main:
        atomic_write_text(paths.summary, to_json(summary, indent=2))
        print(to_json(summary), flush=True)
    return summary


def _report(run: Run, summary: dict) -> dict:
    """The run report (report.md/.json): the run's own figures, then FLOPs counted vs formulas, MFU
    at the median step, and memory in a labelled fake-tensor replay of one step."""
    from minigpt.analytic.report import flops_table, memory_table, report_summary, run_report, write_report
    from minigpt.measure.counted import flops_report, memory_report

    cfg = run.cfg
    c, tc = cfg.model, cfg.train
    step_s = run.metrics.median_step_s
    flops = flops_report(c, run.layout.micro_batch_size, c.block_size, device="meta")  # one micro-batch
    memory = memory_report(c, run.layout.micro_batch_size, c.block_size, tc.precision, "cpu", fake=True,
                           dp=run.plan.dp, recompute=tc.activation_checkpointing)
    peak_bytes, peak_kind = peak_memory_bytes(run.env.device)
    c_ = cfg.model
    figures = {**summary, "peak_memory_bytes": peak_bytes, "peak_memory_kind": peak_kind,
               "config": f"{c_.n_layer} layers x {c_.n_embd} wide, {c_.n_head} heads, block {c_.block_size}, vocabulary "
                         f"{c_.vocab_size:,}, {summary['params']:,} parameters; lr {tc.lr:g}, corpus {cfg.data.source}"}
    if tc.distill_from:
        figures["teacher_forward_flops_per_step"] = teacher_flops_per_step(cfg, run.layout.tokens_per_step)
        figures["teacher_flops_convention"] = ("the teacher's forward (exact matmul count) on every micro-batch: work the "
                                               "run did that its MFU (the student's model FLOPs) leaves out")
    report = run_report(cfg, flops, memory, step_s, run.layout.tokens_per_step, run.env.world_size,
                        run.metrics.peak, run.env.device.type, figures)
    write_report(run.paths.root, report)
    p = report["performance"]
    if tc.report_full:
        run.say("== report (also report.md / report.json in the run directory)")
        run.say(flops_table(flops))
        run.say(f"achieved {p['achieved_tflops_per_device']:.4g} TFLOP/s per device at the median step; "
                f"{tc.precision} MFU " + (f"{p['mfu']:.2%}" if p["mfu"] is not None else "n/a") + f" (peak: {p['peak_source']})")
        run.say(memory_table(memory))
    else:  # one screen: four lines, the rest in report.md
        for line in report_summary(flops, memory, p, str(run.paths.root / "report.md")):
            run.say(line)
    warning = mfu_warning(p["mfu"], p["peak_source"])
    if warning:
        run.say(warning)
    return {"mfu": p["mfu"], "achieved_tflops_per_device": p["achieved_tflops_per_device"]}


# ----------------------------------------------------------------------------------------------
# run directory and opening lines



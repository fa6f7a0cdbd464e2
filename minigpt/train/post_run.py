"""A post-training run (train.objective = sft | rm | dpo | grpo): the training loop's start, steps and finish for
chat data. The plan, backend (DDP or FSDP2), checkpointer, stop control and metrics are the pre-training loop's;
what differs is the data (train/post_data.py), the loss (train/post.py, the backend's loss hook) and the
evaluation: held-out task accuracy from greedy answers on the engine (and held-out pair accuracy for rm/dpo).

The run directory is an ordinary run: config.json (its [model] with the chat tokens' rows), tokenizer.json
(with the chat tokens), checkpoints, metrics.jsonl, summary.json; sample.stop_token is <|end|>, so generate,
serve, eval and convert read it as they read any run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from minigpt.core.atomic import atomic_write_text
from minigpt.core.config import Config, config_from_json
from minigpt.core.device import configure_device, device_name
from minigpt.core.errors import UserError
from minigpt.core.fmt import to_json
from minigpt.core.hardware import choose_peak
from minigpt.data.chat import END
from minigpt.infer.answers import accuracy
from minigpt.nn.lora import apply_lora, train_embeddings
from minigpt.nn.optim import lr_at
from minigpt.parallel.distributed import DistEnv, StopControl, all_reduce_mean, broadcast_object, heartbeat
from minigpt.parallel.parallelize import parallelize
from minigpt.parallel.registry import make_backend
from minigpt.parallel.sharding import shards_parameters
from minigpt.run.files import check_pinned
from minigpt.run.load import run_tokenizer
from minigpt.train.checkpoint import Checkpointer, RunDir
from minigpt.train.metrics import check_sinks
from minigpt.train.post import DPO, end_rewards, make_objective, token_logps
from minigpt.train.post_data import (
    PostData,
    base_tokenizer,
    forward_flops,
    grown_config,
    grows_vocabulary,
    initial_model,
    rollouts,
)
from minigpt.train.run_dir import (
    check_not_done,
    check_sources,
    claimed,
    make_metrics,
    plan_run,
    restore_state,
    resume_checked,
    resume_or_fresh,
    write_files,
)
from minigpt.train.state import Run


@dataclass
class PostRun(Run):
    data: PostData | None = None
    hook: object = None  # the objective (the backend's loss hook)
    reward_model: object = None  # train.reward_from, frozen (GRPO scored by a reward model)
    flops: dict = field(default_factory=dict)  # FLOPs executed by stage, this session's steps
    figures: dict = field(default_factory=dict)  # the last evaluation's


def check_post(cfg: Config) -> None:
    """Beside the backend's refusals (parallel/backend.check_techniques: DDP or FSDP2, no tp or pp)."""
    if cfg.train.compile:
        raise UserError("post-training batches change length every step: set train.compile = false")


def _tokenizer_and_model(cfg: Config, paths: RunDir, resume: bool):
    """The chat tokenizer and the run's [model]: the run's own on resume, else init_from's grown."""
    if resume:
        return run_tokenizer(paths.root), config_from_json(paths.config).model
    tokenizer, _ = base_tokenizer(cfg.train.init_from)
    return tokenizer, grown_config(cfg.model, tokenizer)


def start(cfg: Config, env: DistEnv, resume: bool, stop_at: int | None, overwrite: bool, log) -> PostRun:
    tc = cfg.train
    say = log if env.is_main else (lambda *a, **k: None)
    tc.compile = False if tc.compile is None else tc.compile
    plan, layout, _ = plan_run(cfg, env, stop_at)
    check_post(cfg)
    paths = RunDir(tc.out_dir)
    with claimed(paths, env) as lock:
        resume = resume_or_fresh(cfg, paths, resume, overwrite, say)
        if resume:  # the LoRA base, and the reference DPO and GRPO read again from train.init_from: unchanged
            check_sources(paths.root, tc)
            check_pinned(paths.root, "init_from", tc.init_from, "train.init_from (the starting model and reference)")
            if tc.reward_from:
                check_pinned(paths.root, "reward_from", tc.reward_from, "train.reward_from (the reward model)")
        end_step = stop_at if stop_at is not None else tc.max_steps
        check_not_done(paths, resume, end_step, say)
        check_sinks(tc.log_to)
        tokenizer, cfg.model = _tokenizer_and_model(cfg, paths, resume)
        cfg.sample.stop_token = END
        data = PostData(cfg, tokenizer)
        reward_model = _reward_model(cfg, tokenizer, env, say)
        configure_device(tc, env.device)
        peak = choose_peak(device_name(env.device), tc.precision, tc.peak_tflops, tc.peak_from,
                           threads=torch.get_num_threads())
        checkpointer = Checkpointer(paths, env, tc.checkpoint_every, tc.keep_checkpoints)
        saved = resume_checked(checkpointer, plan, paths, tc) if resume else None
        backend, hook = _build(cfg, env, plan, data, say)
        state = restore_state(checkpointer, backend, plan, saved, env)
        write_files(paths, cfg, backend, state.step if resume else None, env,
                    lambda to: atomic_write_text(to, tokenizer.to_str()),
                    {"source": cfg.train.post_data, "objective": cfg.train.objective})
    metrics = make_metrics(cfg, env, say, paths, layout, peak, state.step if resume else None, end_step)
    run = PostRun(cfg, env, say, paths, None, plan, layout, backend, checkpointer, metrics, state, state.step,
                  end_step, lock, data=data, hook=hook, reward_model=reward_model)
    say(f"post     {tc.objective} on {tc.post_data}: {len(data.examples):,} examples, {len(data.heldout):,} held out; "
        f"{plan.describe()}; the step line's tok/s and TFLOP/s count every row as a full block (an upper bound), "
        f"FLOPs by stage are counted as they run (summary.json)")
    return run


def _build(cfg: Config, env: DistEnv, plan, data: PostData, say):
    """The policy (train.init_from's weights, grown; LoRA on it when asked), its backend and the objective with
    its reference (the adapters switched off under LoRA, a frozen copy otherwise, none when not needed)."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    model, what = initial_model(cfg)
    say(f"init     {what}")
    grown = grows_vocabulary(cfg)
    if tc.lora_rank:
        torch.manual_seed(tc.seed)
        apply_lora(model, tc.lora_rank, tc.lora_alpha, tc.lora_targets)
        if grown:  # the new tokens' rows are learned: the embedding (and an untied head) train whole, saved beside
            train_embeddings(model)
            say("lora     the vocabulary grew: the token embedding (and an untied head) train whole beside the adapters "
                "and are saved with them")
    needs_ref = tc.objective == "dpo" or (tc.objective == "grpo" and tc.kl_coef > 0)
    reference = None
    # a sharded LoRA model is merged for rank 0's evaluation: switching its adapters off there would do nothing; with
    # trained embeddings the adapters off are not the start either
    if needs_ref and (not tc.lora_rank or shards_parameters(plan) or grown):
        reference = initial_model(cfg)[0].to(env.device).eval().requires_grad_(False)
    backend = make_backend(parallelize(model, plan, tc, env.device), cfg, env, plan)
    backend.loss_hook = make_objective(tc, data.end_id, reference)
    return backend, backend.loss_hook


def _reward_model(cfg: Config, tokenizer, env: DistEnv, say):
    """train.reward_from's model, frozen (read on every rank, so a bad one stops every rank alike; rank 0 scores the
    answers it draws); it must read the policy's tokens: the same chat tokenizer."""
    if not cfg.train.reward_from:
        return None
    from minigpt.run.load import load_run

    model, tok, rm_cfg, step = load_run(cfg.train.reward_from, env.device)
    if tok.to_str() != tokenizer.to_str():
        raise UserError(f"train.reward_from = {cfg.train.reward_from!r} has another tokenizer than the policy's: train "
                        f"the reward model from the same SFT run (minigpt train --config rm-tiny)")
    say(f"reward   {cfg.train.reward_from} (step {step}, objective {rm_cfg.train.objective!r}): its score of each answer "
        f"is GRPO's reward; answers_right still counts exact answers")
    return model.requires_grad_(False)


# the steps ---------------------------------------------------------------------------------------------------


def loop(run: PostRun, stop: StopControl) -> None:
    tc, env, state = run.cfg.train, run.env, run.state
    run.t_start = time.perf_counter()
    stop.graceful = True
    for step in range(state.step, run.end_step):
        batches, figures = _batches(run, step)
        lr = lr_at(step, tc)
        run.backend.set_lr(lr)
        batches = [(x.to(env.device), y.to(env.device)) for x, y in batches]
        loss, result = run.backend.step(batches)
        _count(run, batches, figures)
        state.step = step + 1
        run.metrics.log_step(state.step, loss, result, lr, extra=_step_figures(run, figures))
        heartbeat(env, state.step)
        run.stopped = stop.requested()
        _after_step(run)
        if run.stopped:
            break


def _batches(run: PostRun, step: int) -> tuple[list, dict]:
    """This rank's micro-batches of the step; GRPO's answers drawn on rank 0 from the current weights (collective:
    a sharded model is gathered) and sent to every rank."""
    tc, layout, env = run.cfg.train, run.layout, run.env
    rank, accum, micro = run.plan.dp_rank(env.rank), layout.accum, layout.micro_batch_size
    if tc.objective != "grpo":
        return run.data.micro_batches(step, rank, accum, micro), {}
    picks = run.data.step_prompts(step, run.plan.dp * accum * micro)
    model = run.backend.inference_model()
    made = rollouts(model, run.data, step, picks, micro, run.reward_model) if model is not None else None
    batches, figures = broadcast_object(made, env)
    return batches[rank * accum:(rank + 1) * accum], figures


def _count(run: PostRun, batches: list, figures: dict) -> None:
    """FLOPs of the step by stage, as executed on this rank's rows (all ranks: x the data-parallel ranks)."""
    c, dp, f = run.cfg.model, run.plan.dp, run.flops
    fwd = sum(forward_flops(c, x) for x, _ in batches) * dp
    f["policy_forward_backward"] = f.get("policy_forward_backward", 0.0) + 3 * fwd
    if isinstance(run.hook, DPO) or (run.cfg.train.objective == "grpo" and run.cfg.train.kl_coef > 0):
        f["reference_forward"] = f.get("reference_forward", 0.0) + fwd
    if "rollout_flops" in figures:
        f["rollout_generation"] = f.get("rollout_generation", 0.0) + figures.pop("rollout_flops")


def _step_figures(run: PostRun, figures: dict) -> dict:
    """The objective's figures of the step averaged over micro-batches and ranks, with the rollouts'."""
    mine = run.hook.take_stats()
    if mine:
        keys = sorted(mine)
        mean = all_reduce_mean(torch.stack([mine[k] for k in keys]).to(run.env.device), run.env).tolist()
        figures = {**figures, **dict(zip(keys, mean))}
    return figures


def _after_step(run: PostRun) -> None:
    tc, step = run.cfg.train, run.state.step
    if not run.stopped and ((tc.eval_every and step % tc.eval_every == 0) or step == run.end_step):
        run.figures = evaluate(run)
        if run.figures:
            run.metrics.log_task(step, run.figures)
    if run.checkpointer.due(step, run.end_step) or run.stopped:
        run.state.skipped_steps = run.metrics.skipped_total
        run.checkpointer.save(step, run.backend, asdict(run.state))
    run.metrics.restart_clock(step)


@torch.no_grad()
def evaluate(run: PostRun) -> dict:
    """Held-out accuracy (greedy answers to heldout.jsonl) and, for rm/dpo, held-out pair accuracy (chosen
    scored above rejected), on rank 0 (collective: a sharded model is gathered)."""
    model = run.backend.inference_model()
    if model is None:
        return {}
    data, tc, out = run.data, run.cfg.train, {}
    if data.heldout:
        out["heldout_accuracy"] = accuracy(model, data.tokenizer, data.heldout[:tc.task_eval_examples],
                                           tc.rollout_max_tokens)
    if data.heldout_pairs:
        out["heldout_pair_accuracy"] = _pair_accuracy(run, model, data.heldout_pairs[:tc.task_eval_examples])
    return out


def _pair_accuracy(run: PostRun, model, pairs: list[dict]) -> float:
    from minigpt.data.chat import completion, pad_rows

    tok = run.data.tokenizer
    items = [completion(tok, p["prompt"], p[k]) for k in ("chosen", "rejected") for p in pairs]
    x, y = pad_rows(items)
    x, y = x.to(run.env.device), y.to(run.env.device)
    was = model.training
    model.eval()
    if run.cfg.train.objective == "rm":
        score = end_rewards(model(x).logits, y, run.data.end_id)
    else:  # DPO's implicit reward: the log-ratio to the reference
        score = token_logps(model(x).logits, y).sum(-1) - run.hook.reference_logps(model, x, y).sum(-1)
    model.train(was)
    chosen, rejected = score.chunk(2)
    return float((chosen > rejected).float().mean())


def finish(run: PostRun) -> dict:
    cfg, env, paths = run.cfg, run.env, run.paths
    wall = time.perf_counter() - run.t_start
    run.metrics.close()
    if run.stopped:
        run.say(f"stopped by {run.stopped} at step {run.state.step}; resume with: minigpt train --resume {paths.root}")
    summary = {"event": "final", "run_dir": str(paths.root), "objective": cfg.train.objective,
               "step": run.state.step, "max_steps": cfg.train.max_steps, "stopped": run.stopped,
               **run.figures, "flops_by_stage": {k: float(v) for k, v in run.flops.items()},
               "flops_convention": "exact matmul FLOPs as executed (padding included; generation: prefill once per "
                                   "group + one decode step per answer token), all ranks, this session's steps",
               "wall_s": round(wall, 2), "world_size": env.world_size, "device": str(env.device),
               "backend": run.backend.describe()}
    if env.is_main:
        atomic_write_text(paths.summary, to_json(summary, indent=2))
        print(to_json(summary), flush=True)
    return summary

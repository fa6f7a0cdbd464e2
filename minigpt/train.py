"""Training: one process, or data-parallel under torchrun.

    python -m minigpt.train --config configs/tiny.toml
    torchrun --nproc_per_node 2 -m minigpt.train --config configs/tiny.toml

One optimizer step, top to bottom (`train`): set the learning rate for the step; for each
micro-batch of the gradient accumulation, draw windows that depend only on (seed, step, rank,
micro-step), run forward and backward (DDP reduces gradients on the last micro-batch); clip the
global gradient norm; step AdamW (through the grad scaler in fp16); log one line. Evaluation,
samples and checkpoints happen at their cadences and at the end.

Because batches depend only on the step and every piece of state (weights, AdamW moments, scaler,
RNG) is checkpointed, a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from minigpt import checkpoint, data
from minigpt.bench import device_name
from minigpt.config import Config, apply_override, config_from_dict, config_from_json, load_config
from minigpt.distributed import DistEnv, all_gather_objects, all_reduce_mean, barrier, env_rank, init_distributed, on_main_first, shutdown
from minigpt.errors import UserError
from minigpt.flops import param_counts, train_flops_per_token
from minigpt.generate import generate_text
from minigpt.hardware import choose_peak
from minigpt.model import GPT
from minigpt.optim import autocast_context, lr_at, make_optimizer

# ----------------------------------------------------------------------------------------------
# pieces of a step


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    per_micro = cfg.train.micro_batch_size * cfg.model.block_size * world_size
    total = cfg.train.batch_size_tokens
    if total == 0:
        return 1
    if total % per_micro:
        raise UserError(
            f"train.batch_size_tokens = {total:,} is not a multiple of micro_batch_size x block_size x "
            f"world_size = {cfg.train.micro_batch_size} x {cfg.model.block_size} x {world_size} = {per_micro:,}; "
            f"set train.batch_size_tokens to a multiple of {per_micro:,}, e.g. {max(1, round(total / per_micro)) * per_micro:,}"
        )
    return total // per_micro


def memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB peak alloc"
    try:  # resident set size of this process (Linux), the honest figure available on CPU
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return f"{rss / 2**30:.2f} GiB rss"
    except (OSError, ValueError, IndexError):
        return "mem n/a"


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


@torch.no_grad()
def estimate_loss(model, tokens, cfg: Config, env: DistEnv, split_id: int) -> float:
    """Mean loss over eval_iters micro-batches at fixed positions (the same at every evaluation)."""
    was_training = model.training
    model.eval()
    losses = []
    for i in range(cfg.train.eval_iters):
        x, y = data.get_batch(tokens, cfg.train.micro_batch_size, cfg.model.block_size,
                              (cfg.train.seed, split_id, i, env.rank))
        with autocast_context(env.device, cfg.train.precision):
            _, loss = model(x.to(env.device), y.to(env.device))
        losses.append(loss.float())
    model.train(was_training)
    return all_reduce_mean(torch.stack(losses).mean(), env).item()


# ----------------------------------------------------------------------------------------------
# the run


@dataclass
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"


def train(cfg: Config, resume: bool = False, stop_at: int | None = None, overwrite: bool = False,
          log=print) -> dict:
    """Train per `cfg`; with resume=True continue from the latest checkpoint in train.out_dir.

    stop_at: stop (and checkpoint) after this step, keeping the schedule of max_steps; used to
    split a run in two. Returns the final summary (also printed as one JSON line).
    """
    env = init_distributed(cfg.train.device)
    try:
        summary = _train(cfg, env, resume, stop_at, overwrite, log)
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)  # the failed frames hold the model and its process group
        shutdown(env, together=False)
        raise
    shutdown(env)
    return summary


def _train(cfg: Config, env: DistEnv, resume: bool, stop_at: int | None, overwrite: bool, log) -> dict:
    tc = cfg.train
    say = log if env.is_main else (lambda *a, **k: None)
    run = RunPaths(Path(tc.out_dir))
    if tc.threads:
        torch.set_num_threads(tc.threads)
    use_ds = tc.backend == "deepspeed"
    if use_ds:
        from minigpt import zero

        zero.validate(tc, env.device)
    elif tc.zero_stage or tc.offload_optimizer or tc.offload_params or tc.deepspeed_config:
        raise UserError("train.zero_stage / offload / deepspeed_config need train.backend = 'deepspeed'")
    if tc.precision == "fp16" and env.device.type == "cpu":
        raise UserError("train.precision = 'fp16' needs CUDA (its grad scaler); on CPU use 'bf16' or 'fp32'")
    accum = grad_accum_steps(cfg, env.world_size)
    if stop_at is not None and not 0 < stop_at <= tc.max_steps:
        raise UserError(f"--stop-at {stop_at} must be between 1 and train.max_steps = {tc.max_steps}")

    start_step, state = 0, None
    if resume:
        folder, start_step = checkpoint.latest_checkpoint(run.root)
        state = checkpoint.load_state(folder)
        _check_resume_layout(state, tc, env.world_size, run.root)
    elif (run.root / checkpoint.LATEST).exists() and not overwrite:
        raise UserError(
            f"{run.root} already holds a run; continue it with --resume {run.root}, replace it with "
            f"--overwrite, or set train.out_dir to a new directory"
        )
    elif overwrite and env.is_main and run.root.exists():
        shutil.rmtree(run.root)

    # data: rank 0 builds the token cache, the others then find it built
    prepared = on_main_first(env, lambda: data.prepare_data(cfg.data, cfg.model, log=say))
    for line in prepared.summary_lines():
        say(line)
    train_tokens, val_tokens = prepared.tokens("train"), prepared.tokens("val")
    data.check_split_length(train_tokens, "train", cfg.model.block_size)
    data.check_split_length(val_tokens, "validation", cfg.model.block_size)
    tokenizer = prepared.load_tokenizer()
    eot_id = prepared.manifest["eot_id"]
    entropy = prepared.manifest["unigram_entropy_nats"]

    # model and optimizer; identical initial weights on every rank
    torch.manual_seed(tc.seed)
    model = GPT(cfg.model)
    model.activation_checkpointing = tc.activation_checkpointing
    if state is not None and not use_ds:
        checkpoint.load_weights(model, folder)
    model.to(env.device)
    optimizer = make_optimizer(model, tc)
    scaler = torch.amp.GradScaler(env.device.type, enabled=tc.precision == "fp16")
    skipped_steps = 0
    if state is not None:
        if not use_ds:
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
        skipped_steps = state["skipped_steps"]
        torch.set_rng_state(state["rng_cpu"][env.rank % len(state["rng_cpu"])])
        if env.device.type == "cuda" and state.get("rng_cuda"):
            torch.cuda.set_rng_state(state["rng_cuda"][env.rank % len(state["rng_cuda"])].cpu())
    else:
        torch.manual_seed(tc.seed + env.rank)  # dropout differs per rank; weights are already equal
    raw_model = model
    engine = ds_optimizer = ds_config = None
    if use_ds:
        ds_config = zero.build_config(cfg, accum, env.world_size)
        engine, ds_optimizer = zero.initialize(model, optimizer, ds_config)
        model = engine
        if state is not None:
            zero.load(engine, folder / "deepspeed")
    elif env.distributed:
        model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    tokens_per_step = tc.micro_batch_size * cfg.model.block_size * accum * env.world_size
    end_step = stop_at if stop_at is not None else tc.max_steps
    if env.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(run.config, cfg.to_json())
        shutil.copyfile(prepared.tokenizer_path, run.root / "tokenizer.json")
        if ds_config is not None:  # the generated DeepSpeed config: one source of truth, recorded
            checkpoint.atomic_write_text(run.root / "deepspeed_config.json", json.dumps(ds_config, indent=2))
        if resume:  # drop records past the checkpoint: those steps are about to be redone
            kept = [l for l in _read_jsonl(run.metrics) if l.get("step", 0) <= start_step]
            checkpoint.atomic_write_text(run.metrics, "".join(json.dumps(r) + "\n" for r in kept))
    counts = param_counts(cfg.model)  # analytic (equal to the module's; ZeRO-3 leaves it empty)
    n_params = counts.total
    say(
        f"model    {n_params:,} parameters ({counts.non_embedding:,} non-embedding), "
        f"{cfg.model.n_layer} layers x {cfg.model.n_embd} wide, block {cfg.model.block_size}"
    )
    if use_ds:
        layout = f"DeepSpeed ZeRO-{tc.zero_stage}" + (" +offload optimizer" if tc.offload_optimizer else "") + (
            " +offload params" if tc.offload_params else "")
    else:
        layout = "DDP" if env.distributed else "single process"
    say(
        f"train    {env.world_size} process(es) on {env.device}, {tc.precision}, {layout}, "
        f"{tc.micro_batch_size} seq x {cfg.model.block_size} tok x {accum} accum x {env.world_size} ranks "
        f"= {tokens_per_step:,} tokens/step, steps {start_step}->{end_step} of {tc.max_steps}"
        + (f" (resumed from step {start_step})" if resume else "")
    )

    # model FLOPs (MFU) and hardware FLOPs (HFU, with recompute) per step; the peak they divide by
    model_flops = train_flops_per_token(cfg.model, cfg.model.block_size, "exact") * tokens_per_step
    hw_flops = train_flops_per_token(cfg.model, cfg.model.block_size, "exact_recompute") * tokens_per_step
    peak = choose_peak(device_name(env.device), tc.precision, tc.peak_tflops, tc.peak_from)
    say(
        f"mfu      model FLOPs {model_flops / tokens_per_step:,.0f}/token (exact matmul count, 3x forward, full "
        f"attention square, no recompute) per device / peak: {peak.source}"
        + (f" = {peak.tflops:g} TFLOP/s" if peak.known else " (no MFU; set train.peak_tflops or train.peak_from)")
    )

    def objective(loss: torch.Tensor) -> torch.Tensor:
        """What backward sees: the cross-entropy, plus MoE load balancing (the log shows CE only)."""
        if cfg.model.is_moe:
            return loss + tc.moe_aux_loss_coef * raw_model.moe_aux_loss
        return loss

    def save(step: int) -> None:
        state = {
            "step": step,
            # under DeepSpeed the optimizer (and loss scaler) live in the engine's own checkpoint
            "optimizer": None if use_ds else optimizer.state_dict(),
            "scaler": None if use_ds else scaler.state_dict(),
            "skipped_steps": skipped_steps,
            "rng_cpu": all_gather_objects(torch.get_rng_state(), env),  # each rank resumes its own stream
            "rng_cuda": all_gather_objects(torch.cuda.get_rng_state(env.device), env) if env.device.type == "cuda" else [],
            "data_position": {"next_step": step, "rule": "windows drawn from (seed, step, global micro-batch)"},
            "backend": tc.backend,
            "zero_stage": tc.zero_stage if use_ds else None,
            "world_size": env.world_size,
        }
        if not use_ds:
            if env.is_main:
                checkpoint.save_checkpoint(run.root, step, raw_model, state)
            barrier(env)
            return
        # DeepSpeed: every rank writes its partitions into one temporary folder; rank 0 adds the
        # gathered weights (safetensors, for generate/flops) and our state, then commits it
        tmp = checkpoint.partial_folder(run.root, step)
        if env.is_main:
            checkpoint.new_checkpoint_folder(run.root, step)
        barrier(env)
        try:
            zero.save(engine, tmp / "deepspeed", {"minigpt_step": step})
            weights = zero.full_state_dict(engine, raw_model)
            if env.is_main:
                from safetensors.torch import save_file

                save_file(weights, str(tmp / checkpoint.WEIGHTS), metadata={"format": "pt", "step": str(step)})
                torch.save(state, tmp / checkpoint.STATE)
            barrier(env)
            if env.is_main:
                checkpoint.commit_checkpoint(run.root, step, tmp)
        finally:
            if env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
        barrier(env)

    def sample(step: int) -> None:
        net = raw_model
        if use_ds:  # ZeRO-3 partitions the weights: gather them (collective) into a plain model
            weights = zero.full_state_dict(engine, raw_model)
            if env.is_main:
                net = GPT(cfg.model)
                net.load_state_dict(weights, strict=False)  # a tied head comes with the embedding
                net.to(env.device)
        if not env.is_main:
            return
        sc = cfg.sample
        texts, _ = generate_text(net, tokenizer, [sc.prompt], eot_id=eot_id,
                                 max_new_tokens=min(sc.max_new_tokens, 120), temperature=sc.temperature,
                                 top_k=sc.top_k, top_p=sc.top_p, seed=sc.seed)
        say(f"sample @ step {step}:\n{texts[0]}\n" + "-" * 40)

    metrics_file = open(run.metrics, "a") if env.is_main else None
    model.train()
    t_start = time.perf_counter()
    step_times: list[float] = []
    last_loss = float("nan")
    val_loss = train_loss = None
    held: dict = {}
    step = start_step
    try:
        for step in range(start_step, end_step):
            lr = lr_at(step, tc)
            for group in (ds_optimizer or optimizer).param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=env.device)
            for micro, key in enumerate(data.iter_train_keys(tc.seed, step, env.rank, accum)):
                x, y = data.get_batch(train_tokens, tc.micro_batch_size, cfg.model.block_size, key)
                x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
                last_micro = micro == accum - 1
                if use_ds:  # DeepSpeed scales by 1/accum, reduces and steps at the boundary itself
                    _, loss = engine(x, y)  # DeepSpeed casts the model itself for bf16/fp16
                    engine.backward(objective(loss))
                    if last_micro and step == end_step - 1:
                        held = zero.held_bytes(engine, ds_optimizer, raw_model)  # grads still whole here
                    engine.step()
                    loss_sum += loss.detach().float() / accum
                    continue
                sync = contextlib.nullcontext() if (last_micro or not env.distributed) else model.no_sync()
                with sync:
                    with autocast_context(env.device, tc.precision):
                        _, loss = model(x, y)
                    scaler.scale(objective(loss) / accum).backward()
                loss_sum += loss.detach() / accum
            if use_ds:
                norm = engine.get_global_grad_norm()
                grad_norm = float(norm) if norm is not None else float("nan")
                if engine.skipped_steps > skipped_steps:
                    skipped_steps = engine.skipped_steps
                    say(f"step {step + 1}: fp16 gradients overflowed, DeepSpeed skipped the update")
            else:
                if tc.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tc.grad_clip).item()
                else:
                    grad_norm = float("nan")
                scale_before = scaler.get_scale() if scaler.is_enabled() else None
                scaler.step(optimizer)
                scaler.update()
                if scale_before is not None and scaler.get_scale() < scale_before:
                    skipped_steps += 1  # inf/NaN gradients: the scaler skipped this update and backed off
                    say(f"step {step + 1}: fp16 gradients overflowed, update skipped (loss scale -> {scaler.get_scale():g})")
                optimizer.zero_grad(set_to_none=True)
            last_loss = all_reduce_mean(loss_sum, env).item()  # .item() waits for the step to finish
            dt = time.perf_counter() - t0
            step_times.append(dt)
            done = step + 1
            if done % tc.log_every == 0 or done == end_step:
                recent = step_times[-20:]
                eta = (end_step - done) * sum(recent) / len(recent)
                tflops = model_flops / dt / env.world_size / 1e12  # per device
                record = {"step": done, "loss": round(last_loss, 6), "lr": lr, "grad_norm": round(grad_norm, 4),
                          "ms_per_step": round(dt * 1e3, 2), "tokens_per_s": round(tokens_per_step / dt, 1),
                          "tflops_per_device": round(tflops, 5)}
                util = "MFU n/a"
                if peak.known:
                    record["mfu"] = tflops / peak.tflops
                    util = f"{tc.precision} MFU {record['mfu']:.1%}"
                    if tc.activation_checkpointing:
                        record["hfu"] = hw_flops / dt / env.world_size / 1e12 / peak.tflops
                        util += f" HFU {record['hfu']:.1%}"
                say(
                    f"step {done:>6}/{end_step} | loss {last_loss:.4f} | lr {lr:.2e} | {dt * 1e3:7.1f} ms | "
                    f"{tokens_per_step / dt:9,.0f} tok/s | {tflops:.3g} TFLOP/s | {util} | "
                    f"{memory_note(env.device)} | ETA {format_duration(eta)}"
                )
                if metrics_file:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
            if (tc.eval_every and done % tc.eval_every == 0) or done == end_step:
                val_loss = estimate_loss(model, val_tokens, cfg, env, split_id=1)
                train_loss = estimate_loss(model, train_tokens, cfg, env, split_id=2)
                say(f"eval   step {done} | train loss {train_loss:.4f} | val loss {val_loss:.4f} | "
                    f"unigram entropy {entropy:.4f} nats")
                if metrics_file:
                    metrics_file.write(json.dumps({"step": done, "train_loss": train_loss, "val_loss": val_loss}) + "\n")
                    metrics_file.flush()
            if (tc.sample_every and done % tc.sample_every == 0) and done != end_step:
                sample(done)
            if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == end_step:
                save(done)
    finally:
        if metrics_file:
            metrics_file.close()
    if end_step == start_step:
        say("nothing to do: the run is already at its last step")
    else:
        sample(end_step)
    wall = time.perf_counter() - t_start
    steps_run = end_step - start_step
    summary = {
        "event": "final",
        "run_dir": str(run.root),
        "step": end_step,
        "max_steps": tc.max_steps,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "last_step_loss": last_loss,
        "unigram_entropy_nats": entropy,
        "tokens_seen": end_step * tokens_per_step,
        "tokens_per_s": round(steps_run * tokens_per_step / wall, 1) if steps_run else None,
        "wall_s": round(wall, 2),
        "world_size": env.world_size,
        "device": str(env.device),
        "precision": tc.precision,
        "params": n_params,
        "fp16_skipped_steps": skipped_steps,
    }
    if use_ds and steps_run:
        from minigpt.report import zero_memory_table

        table = _zero_memory(cfg, env, held, n_params)
        if env.is_main:
            checkpoint.atomic_write_text(run.root / "zero_memory.json", json.dumps(table, indent=2))
            say(zero_memory_table(table))
    if env.is_main and tc.report and steps_run:
        from minigpt.report import flops_table, memory_table, run_report, write_report

        timed = sorted(step_times[1:] or step_times)  # the first step pays one-off costs
        report = run_report(cfg, timed[len(timed) // 2], tokens_per_step, env.world_size, peak, env.device.type)
        write_report(run.root, report)
        p = report["performance"]
        say("== report (also report.md / report.json in the run directory)")
        say(flops_table(report["flops"]))
        say(f"achieved {p['achieved_tflops_per_device']:.4g} TFLOP/s per device at the median step; "
            f"{tc.precision} MFU " + (f"{p['mfu']:.2%}" if p["mfu"] is not None else "n/a") + f" (peak: {p['peak_source']})")
        say(memory_table(report["memory"]))
        summary["mfu"] = p["mfu"]
        summary["achieved_tflops_per_device"] = p["achieved_tflops_per_device"]
    if env.is_main:
        checkpoint.atomic_write_text(run.root / "summary.json", json.dumps(summary, indent=2))
        print(json.dumps(summary), flush=True)
    if use_ds:
        engine.destroy()  # release the engine's hooks and buffers; shutdown() then leaves the group together
    return summary


def _check_resume_layout(state: dict, tc, world_size: int, run_dir: Path) -> None:
    """A checkpoint's backend, ZeRO stage and world size must match the resumed run's."""
    backend = state.get("backend", "ddp")
    if backend != tc.backend:
        raise UserError(f"{run_dir} was written by the {backend} backend; resume with --set train.backend={backend}")
    if backend == "deepspeed":
        if state.get("zero_stage") != tc.zero_stage:
            raise UserError(f"{run_dir} holds ZeRO-{state.get('zero_stage')} partitions; resume with "
                            f"--set train.zero_stage={state.get('zero_stage')} (its exported weights can start a new run)")
        if state.get("world_size") != world_size:
            raise UserError(f"{run_dir} holds DeepSpeed partitions of {state.get('world_size')} ranks, not {world_size}: "
                            f"resume with the same number of processes")


def _zero_memory(cfg: Config, env: DistEnv, held: dict, num_params: int) -> dict:
    """Bytes each rank held (read from DeepSpeed's buffers) beside the ZeRO formulas."""
    from minigpt import memory as M

    tc = cfg.train
    rows = all_gather_objects(held, env)
    paper = M.model_state_bytes(num_params, tc.precision, tc.zero_stage, env.world_size).as_dict()
    ds = M.model_state_bytes(num_params, tc.precision, tc.zero_stage, env.world_size, layout="deepspeed").as_dict()
    return {"zero_stage": tc.zero_stage, "world_size": env.world_size, "precision": tc.precision,
            "params": num_params, "per_rank": rows, "predicted_paper": paper, "predicted_deepspeed": ds}


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut short by a kill
    return out


# ----------------------------------------------------------------------------------------------
# command line (shared by `minigpt train`, `python -m minigpt.train` and scripts/train.py)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML preset, a path or a name in configs/ (default: tiny)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable (e.g. --set train.max_steps=100)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--stop-at", type=int, metavar="STEP", help="stop and checkpoint after STEP (schedule unchanged)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in train.out_dir")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # passed by `deepspeed`


def resolve_preset(name: str | None) -> Path:
    """A config path, or a preset name looked up in ./configs and in the repository's configs/."""
    name = name or "tiny"
    path = Path(name)
    if path.suffix == ".toml" or path.exists():
        return path
    for root in (Path.cwd() / "configs", Path(__file__).resolve().parent.parent / "configs"):
        if (root / f"{name}.toml").is_file():
            return root / f"{name}.toml"
    return Path("configs") / f"{name}.toml"  # load_config reports it missing, with the presets


def config_from_args(args) -> tuple[Config, bool]:
    """The config for a train command line: (config, resume?)."""
    if not args.resume:
        return load_config(resolve_preset(args.config), args.set), False
    run_dir = Path(args.resume)
    checkpoint.latest_checkpoint(run_dir, verify=False)  # a clear error when it is no run
    saved = config_from_json(run_dir / "config.json")
    if args.config:
        requested = load_config(resolve_preset(args.config), args.set)
    else:
        raw = saved.to_dict()
        for item in args.set:
            apply_override(raw, item)
        requested = config_from_dict(raw, origin=f"{run_dir}/config.json + --set")
    mismatch = [k for k, v in saved.to_dict()["model"].items() if requested.to_dict()["model"][k] != v]
    if mismatch:
        k = mismatch[0]
        raise UserError(
            f"the checkpoint in {run_dir} was trained with model.{k} = {saved.to_dict()['model'][k]!r}, the "
            f"requested config has {requested.to_dict()['model'][k]!r}; resume with the run's own config "
            f"(drop --config/--set model.*) or start a new run"
        )
    requested.train.out_dir = str(run_dir)
    return requested, True


def run_from_args(args) -> dict:
    cfg, resume = config_from_args(args)
    return train(cfg, resume=resume, stop_at=args.stop_at, overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minigpt.train", description="Train a GPT (torchrun-ready).")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_from_args(args)
    except UserError as e:
        if env_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

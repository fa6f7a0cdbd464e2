"""A training run's directory policy, decided before the first step: claim it (the lock), resume or start
fresh (or refuse: a finished run, foreign files), prepare and pin the corpus and tokenizer, write the run's
files (resolved config, data.json), and open the metrics sinks."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from minigpt.analytic.flops import train_flops_per_token
from minigpt.core.atomic import atomic_write, atomic_write_text
from minigpt.core.config import Config, config_from_json, read_json
from minigpt.core.device import resolve_precision
from minigpt.core.errors import UserError
from minigpt.core.files import iter_jsonl
from minigpt.core.plan import BatchLayout, ParallelPlan
from minigpt.core.resolve import check_same_model
from minigpt.data import cache as data
from minigpt.data.loader import check_split_length, document_starts
from minigpt.data.tokenizer import token_bytes
from minigpt.infer.generate import check_prompts
from minigpt.parallel.backend import Backend
from minigpt.parallel.distributed import DistEnv, barrier, on_main, on_main_first
from minigpt.parallel.registry import backend_class, resolve_plan
from minigpt.run.files import check_pinned, file_digest, latest_checkpoint, pin_sources, refuse_links
from minigpt.run.load import check_tokenizer
from minigpt.train.checkpoint import Checkpointer, RunDir, RunLock, clear_run_dir, foreign_entries, remove_temporaries
from minigpt.train.metrics import CsvSink, MetricsLogger, make_sinks
from minigpt.train.state import TrainState


def claim(paths: RunDir) -> tuple[RunLock, bool]:
    """Create the run directory if needed and take its lock (rank 0): one trainer per run."""
    created = not paths.root.exists()
    paths.root.mkdir(parents=True, exist_ok=True)
    lock = RunLock(paths.root)
    try:
        lock.acquire()
        refuse_links(paths.root)
    except UserError:
        lock.release()
        if created:
            shutil.rmtree(paths.root, ignore_errors=True)
        raise
    return lock, created


@contextlib.contextmanager
def claimed(paths: RunDir, env: DistEnv):
    """Rank 0 takes the run directory's lock (yielded; None elsewhere); a start that fails inside releases it and
    removes the directory when this start created it: nothing is left half-written."""
    lock, created = on_main(env, lambda: claim(paths)) or (None, False)
    try:
        yield lock
    except BaseException:
        if env.is_main and lock is not None:
            lock.release()
            if created:
                shutil.rmtree(paths.root, ignore_errors=True)
        raise


def resume_checked(checkpointer, plan: ParallelPlan, paths: RunDir, tc) -> tuple | None:
    """The latest checkpoint's (folder, state), checked against the backend's rules before anything is built."""
    saved = checkpointer.latest_state()
    backend_class(plan).check_resumable(saved[1], paths.root, plan, tc)
    return saved


def resume_or_fresh(cfg: Config, paths: RunDir, resume: bool, overwrite: bool, say) -> bool:
    """Whether this start resumes (asked, or train.auto_resume over a checkpoint); checks a fresh
    start may use the directory."""
    if not resume and cfg.train.auto_resume and paths.has_checkpoint():
        check_same_model(config_from_json(paths.config), cfg, paths.root)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        say(f"resume   train.auto_resume: continuing the run in {paths.root} (torchrun restart {restart})")
        return True
    if resume:
        return True
    if paths.has_checkpoint() and not overwrite:
        raise UserError(f"{paths.root} already holds a run; continue it with --resume {paths.root}, replace it with "
                        f"--overwrite, or set train.out_dir to a new directory")
    foreign = foreign_entries(paths.root)
    if foreign:
        raise UserError(f"{paths.root} is not a minigpt run directory (it holds {', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}); give an empty or new train.out_dir")
    return False


def check_not_done(paths: RunDir, resume: bool, end_step: int, say) -> None:
    """Resuming a run already at its end changes nothing (no file is rewritten)."""
    if not resume:
        return
    _, at = latest_checkpoint(paths.root)  # verified: a damaged run is reported, even when it is done
    if at > end_step:
        raise UserError(f"{paths.root} is at step {at}, past the requested end at step {end_step}; "
                        f"raise train.max_steps (--set train.max_steps=N) to train further")
    if at == end_step:
        say(f"nothing to do: {paths.root} is already at step {at} of {end_step}; raise train.max_steps "
            f"(--set train.max_steps=N) to train further")
        summary = read_json(paths.summary, "run summary") if paths.summary.is_file() else {"step": at}
        raise AlreadyDone(json.dumps(summary))


def prepare_run_data(cfg: Config, env: DistEnv, paths: RunDir, resume: bool,
                  say) -> tuple[data.PreparedData, np.ndarray | None]:
    """Tokens of the corpus, and where its documents start (data.align = "document"; else None). A resumed run
    is pinned to the corpus (and tokenizer) it started with."""
    prepared = on_main_first(env, lambda: data.prepare_data(cfg.data, cfg.model, log=say, show_progress=env.is_main))
    pinned_path = paths.root / "data.json"
    if resume and pinned_path.is_file():
        pinned = read_json(pinned_path, "the run's pinned corpus")
        check_tokenizer(paths.root)
        if prepared.manifest["inputs_sha256"] != pinned["inputs_sha256"]:
            change = data.describe_change(pinned, prepared.manifest)
            if not cfg.train.allow_new_data:
                raise UserError(f"the corpus of {paths.root} changed since the run started ({change}); restore it, or "
                                f"resume with --set train.allow_new_data=true to continue on the new data with the "
                                f"run's tokenizer")
            cfg.data.tokenizer = str(paths.tokenizer.resolve())  # the run's tokenizer, not one retrained
            prepared = on_main_first(env, lambda: data.prepare_data(cfg.data, cfg.model, log=say, show_progress=env.is_main))
            say(f"data     continuing on a changed corpus (train.allow_new_data): {change}; tokenized with the "
                f"run's tokenizer")
    for split in ("train", "val"):
        check_split_length(prepared.tokens(split), split, cfg.model.block_size)
    starts = (document_starts(prepared.tokens("train"), prepared.manifest.get("eot_id"), cfg.model.block_size)
              if cfg.data.align == "document" else None)  # refused now, not at the first step
    return prepared, starts


def bytes_and_entropy(prepared, cfg: Config, env: DistEnv) -> tuple[torch.Tensor, tuple[float, float | None]]:
    """Bytes per token id (on the device) and the unigram entropy in nats/token and bits/byte (the train
    split's entropy over its mean bytes per token: comparable across tokenizers)."""
    table = token_bytes(prepared.load_tokenizer(), cfg.model.padded_vocab_size)
    nats = prepared.manifest["unigram_entropy_nats"]
    per_token = corpus_bytes_per_token(prepared.tokens("train"), table)
    return torch.from_numpy(table).to(env.device), (nats, nats / (math.log(2) * per_token) if per_token else None)


def check_sampling(cfg: Config, prepared) -> None:
    """The run samples sample.prompt during and after training: a prompt the model cannot continue is
    found now, before the first step, not after the last (with the same rule generate applies)."""
    ids = prepared.load_tokenizer().encode(cfg.sample.prompt).ids
    try:
        check_prompts([ids], cfg.model.block_size, cfg.sample.max_new_tokens, cfg.model.pos_emb == "rope")
    except UserError as e:
        raise UserError(f"sample.prompt ({len(ids)} tokens) cannot be sampled from this model: {e} (or raise "
                        f"model.block_size = {cfg.model.block_size})") from None


def check_sources(run_dir: Path, tc) -> None:
    """On resume: a LoRA run's base and a distillation's teacher are still the ones the run pinned."""
    if tc.lora_rank and tc.init_from:
        check_pinned(run_dir, "init_from", tc.init_from, "train.init_from (the LoRA base)")
    if tc.distill_from:
        check_pinned(run_dir, "distill_from", tc.distill_from, "the teacher (train.distill_from)")


def keep_records_until(paths: RunDir, step: int) -> None:
    """metrics.jsonl (and metrics.csv) rewritten with the records up to `step`, streamed: a file of any size
    in constant memory; damaged lines dropped."""
    def kept():
        for r in iter_jsonl(paths.metrics, "metrics"):
            if isinstance(r.get("step", 0), (int, float)) and r.get("step", 0) <= step:
                yield r

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            for r in kept():
                f.write(json.dumps(r) + "\n")
    atomic_write(paths.metrics, write)
    if (paths.root / "metrics.csv").is_file():  # the CSV follows the records kept
        (paths.root / "metrics.csv").unlink()
        csv_sink = CsvSink(paths.root / "metrics.csv")
        for r in kept():
            csv_sink.write(r)
        csv_sink.close()


def write_run_files(paths: RunDir, cfg: Config, prepared, backend: Backend, resumed_at: int | None,
                    env: DistEnv) -> None:
    """A pre-training run's files (write_files): its tokenizer copied from the token cache, data.json the corpus it
    is pinned to."""
    m = prepared.manifest
    pinned = {k: m[k] for k in (*data.PINNED, "unigram_entropy_nats")}
    write_files(paths, cfg, backend, resumed_at, env, lambda to: shutil.copyfile(prepared.tokenizer_path, to), pinned)


def write_files(paths: RunDir, cfg: Config, backend: Backend, resumed_at: int | None, env: DistEnv, put_tokenizer,
                pinned: dict) -> None:
    """A fresh run clears what an earlier attempt left (no checkpoint, or --overwrite) and writes
    config.json (resolved), tokenizer.json (put_tokenizer(path)), data.json (`pinned`, what the run is pinned to,
    with the tokenizer's SHA-256) and the backend's own config. A resumed run removes temporaries a kill left, keeps
    its tokenizer, and drops the metrics records past its checkpoint (those steps are about to be redone). Rank 0
    writes; the others wait for it."""
    if not env.is_main:
        barrier(env)
        return
    if resumed_at is None:
        clear_run_dir(paths.root, keep=type(backend).scratch)
        put_tokenizer(paths.tokenizer)
        pin_sources(paths.root, cfg.train)
    else:
        remove_temporaries(paths.root)
        keep_records_until(paths, resumed_at)
    atomic_write_text(paths.config, cfg.to_json())
    pinned = {**pinned, "tokenizer_sha256": file_digest(paths.tokenizer)["sha256"]}  # checked again by every reader
    atomic_write_text(paths.root / "data.json", json.dumps(pinned, indent=2))
    for name, text in backend.run_files().items():
        atomic_write_text(paths.root / name, text)
    barrier(env)


def make_metrics(cfg: Config, env: DistEnv, say, paths: RunDir, layout: BatchLayout, peak, resumed_at: int | None,
             end_step: int) -> MetricsLogger:
    c, tc = cfg.model, cfg.train
    sinks = make_sinks(tc.log_to, paths.root, resumed_at, cfg.to_dict()) if env.is_main else []
    start_step = resumed_at or 0
    tokens = layout.tokens_per_step
    hw = train_flops_per_token(c, c.block_size, "exact_recompute") * tokens if tc.activation_checkpointing else None
    return MetricsLogger(sinks, env, say, tokens_per_step=tokens,
                         flops_per_step=train_flops_per_token(c, c.block_size, "exact") * tokens, hw_flops_per_step=hw,
                         peak=peak, precision=tc.precision, log_every=tc.log_every, start_step=start_step,
                         end_step=end_step)


def corpus_bytes_per_token(tokens: np.ndarray, bytes_of: np.ndarray) -> float:
    """Mean bytes of text per token of a split (a histogram: memory does not grow with the corpus)."""
    counts = np.bincount(np.asarray(tokens), minlength=len(bytes_of))[: len(bytes_of)]
    return float((counts * bytes_of).sum() / max(1, len(tokens)))


class AlreadyDone(Exception):
    """Resuming a run that is at its last step: nothing to do, nothing written."""


def plan_run(cfg: Config, env: DistEnv, stop_at: int | None) -> tuple[ParallelPlan, BatchLayout, str]:
    """The run's plan (built once, from [train] and the world size), its batch layout, and the choices
    its backend's rules make: precision and compile (recorded in config.json as what ran)."""
    tc = cfg.train
    if stop_at is not None and not 0 < stop_at <= tc.max_steps:
        raise UserError(f"--stop-at {stop_at} must be between 1 and train.max_steps = {tc.max_steps}")
    tc.precision = resolve_precision(tc.precision, env.device)
    asked = ParallelPlan.from_train(tc, cfg.model)
    rules = backend_class(asked)
    rules.check(cfg, asked, env.device)  # the backend's keys, before the world size is asked about
    plan = resolve_plan(asked.with_world(env.world_size, "train.tensor_parallel x train.pipeline_parallel:"))
    tc.compile, compile_why = rules.compile_rule(tc, env.device, stop_at or tc.max_steps)
    layout = plan.batch_layout(tc, cfg.model.block_size)
    backend_class(plan).check_layout(plan, layout)
    return plan, layout, compile_why


def restore_state(checkpointer: Checkpointer, backend: Backend, plan: ParallelPlan, saved: tuple | None,
             env: DistEnv) -> TrainState:
    """The training state: the checkpoint's (`saved`: its folder and state) when resuming, else fresh (dropout
    seeded per data-parallel rank: a tensor-parallel group shares its masks; the weights are equal)."""
    if saved is None:
        torch.manual_seed(backend.tc.seed + plan.dp_rank(env.rank))
        return TrainState(backend=plan.backend, optimizer_name=backend.tc.optimizer)
    state = checkpointer.load(backend, saved)
    return TrainState(state["step"], state.get("skipped_steps", 0), plan.backend, backend.tc.optimizer)

"""Run directories, atomic verified checkpoints, and the one Checkpointer every backend saves through.

A run directory holds:
  config.json        the resolved config (written when the run starts)
  tokenizer.json     the tokenizer the run was trained with
  metrics.jsonl      one JSON record per logged step and per evaluation
  summary.json       the final summary (when a run ends)
  latest.json        pointer to the newest complete checkpoint, with sizes and SHA-256 of its files
  checkpoints/step_NNNNNNN/
      model.safetensors   weights (safetensors: loading never unpickles code)
      state.pt            optimizer, grad-scaler, RNG and data-position state (weights_only load)
      deepspeed/          (DeepSpeed backend) the engine's own per-rank partitions

Every file is written to a temporary name, flushed, fsync'ed and renamed. A checkpoint folder is
complete before `latest.json` points at it, and the previous one is deleted only after that.
So a kill at any instant leaves `latest.json` naming a complete, verifiable checkpoint.

`Checkpointer` is the one save/load path for every backend: the backend writes its shards (if
any) into the folder being assembled and returns its small state; the checkpointer adds the whole
weights (safetensors), every rank's RNG state and the training state, then commits the folder.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

import torch

from minigpt.core.atomic import atomic_write_text, fsync_dir
from minigpt.core.config import Config, config_from_json
from minigpt.core.errors import UserError
from minigpt.data.tokenizer import read_tokenizer
from minigpt.nn.model import GPT
from minigpt.nn.weights import WEIGHTS, load_weights, save_weights
from minigpt.parallel.backends import run_file_names
from minigpt.parallel.distributed import DistEnv, all_gather_objects, barrier

LATEST = "latest.json"
STATE = "state.pt"


def file_digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def partial_folder(run_dir: Path, step: int) -> Path:
    """Where step's checkpoint is assembled before commit_checkpoint (the same path on every rank)."""
    return Path(run_dir) / "checkpoints" / f".step_{step:07d}.partial"


def new_checkpoint_folder(run_dir: Path, step: int) -> Path:
    """A fresh, empty partial_folder for step's checkpoint."""
    tmp = partial_folder(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(run_dir: Path, step: int, tmp: Path, keep: int = 1) -> Path:
    """Fsync every file in `tmp`, rename it to checkpoints/step_N, point latest.json at it, prune.

    latest.json records each file's size and SHA-256, so a truncated or altered file is refused.
    """
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    name = f"step_{step:07d}"
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        files[str(path.relative_to(tmp))] = file_digest(path)
    for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        fsync_dir(d)
    final = ckpt_root / name
    if final.exists():  # a checkpoint of this step from an earlier, interrupted attempt
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(ckpt_root)
    pointer = {"step": step, "dir": f"checkpoints/{name}", "files": files}
    atomic_write_text(run_dir / LATEST, json.dumps(pointer, indent=2))
    # prune: everything but the newest `keep` complete checkpoints, and stray temporaries
    complete = sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in complete[:-keep]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    for stray in ckpt_root.glob(".step_*"):
        shutil.rmtree(stray, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path, verify: bool = True) -> tuple[Path, int]:
    """The newest complete checkpoint of a run: (folder, step). UserError when missing or corrupt."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; give a directory written by 'minigpt train'")
    pointer_path = run_dir / LATEST
    if not pointer_path.is_file():
        raise UserError(f"{run_dir} has no checkpoint ({LATEST} missing); train first or give another run directory")
    try:
        pointer = json.loads(pointer_path.read_text())
        folder, step, files = run_dir / pointer["dir"], int(pointer["step"]), pointer["files"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise UserError(f"{pointer_path} is corrupt; the run cannot be resumed from it") from None
    if verify:
        for fname, expected in files.items():
            path = folder / fname
            if not path.is_file():
                raise UserError(f"checkpoint {folder} is incomplete: {fname} is missing; it cannot be loaded")
            found = file_digest(path)
            if found != expected:
                raise UserError(
                    f"checkpoint file {path} is corrupt ({found['bytes']:,} bytes, expected "
                    f"{expected['bytes']:,} with a different SHA-256); it was not loaded"
                )
    return folder, step


def load_state(folder: Path, device: torch.device | str = "cpu") -> dict:
    """state.pt, unpickled with weights_only=True: tensors and plain containers, never code."""
    try:
        return torch.load(Path(folder) / STATE, map_location=device, weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain data
        raise UserError(f"{Path(folder) / STATE} is not a minigpt training state ({str(e).splitlines()[0][:160]}); "
                        f"it was not loaded") from None


def load_latest(run_dir: Path, load, attempts: int = 5):
    """(load(folder), step) of the newest checkpoint, for readers of a run that may be training.

    A save commits a new checkpoint and then deletes the old one, so a reader can be pointed at a
    folder that disappears under it: when loading fails and latest.json has moved meanwhile, read
    it again. A failure with latest.json unchanged is a damaged run, reported at once.
    """
    pointer = Path(run_dir) / LATEST
    for attempt in range(attempts):
        before = pointer.read_bytes() if pointer.is_file() else None
        try:
            folder, step = latest_checkpoint(run_dir)
            return load(folder), step
        except (UserError, OSError):
            moved = (pointer.read_bytes() if pointer.is_file() else None) != before
            if not moved or attempt == attempts - 1:
                raise
            time.sleep(0.05)


# ----------------------------------------------------------------------------------------------
# a run directory and its checkpointer


class RunDir:
    """Every path of a run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.metrics = self.root / "metrics.jsonl"
        self.summary = self.root / "summary.json"
        self.latest = self.root / LATEST
        self.tokenizer = self.root / "tokenizer.json"

    def has_checkpoint(self) -> bool:
        return self.latest.is_file()


class Checkpointer:
    """Saves and restores a run: weights, the backend's state and shards, RNG, training state.

    save() and load() are collective under torchrun; rank 0 alone writes the shared files.
    """

    def __init__(self, run: RunDir, env: DistEnv, every: int, keep: int = 1) -> None:
        self.run, self.env, self.every, self.keep = run, env, every, keep

    def due(self, step: int, end_step: int) -> bool:
        return bool(self.every and step % self.every == 0) or step == end_step

    def save(self, step: int, backend, train_state: dict) -> None:
        env = self.env
        tmp = partial_folder(self.run.root, step)
        if env.is_main:
            new_checkpoint_folder(self.run.root, step)
        barrier(env)
        try:
            state = {**train_state, **backend.save_state(tmp), **self._rng_states(), "world_size": env.world_size}
            weights = backend.full_state_dict()
            if env.is_main:
                save_weights(weights, tmp / WEIGHTS)
                torch.save(state, tmp / STATE)
            barrier(env)
            if env.is_main:
                commit_checkpoint(self.run.root, step, tmp, self.keep)
        finally:
            if env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
        barrier(env)

    def load(self, backend) -> dict:
        """Restore the latest checkpoint into `backend` (which checks it may) and this rank's RNG; return
        the training state."""
        folder, _ = latest_checkpoint(self.run.root)
        state = load_state(folder)
        backend.check_resumable(state, self.run.root)
        backend.load_state(folder, state)
        rank = self.env.rank
        torch.set_rng_state(state["rng_cpu"][rank % len(state["rng_cpu"])])
        if self.env.device.type == "cuda" and state.get("rng_cuda"):
            torch.cuda.set_rng_state(state["rng_cuda"][rank % len(state["rng_cuda"])].cpu())
        return state

    def _rng_states(self) -> dict:
        env = self.env
        cuda = env.device.type == "cuda"
        return {"rng_cpu": all_gather_objects(torch.get_rng_state(), env),  # each rank resumes its own stream
                "rng_cuda": all_gather_objects(torch.cuda.get_rng_state(env.device), env) if cuda else []}


# ----------------------------------------------------------------------------------------------
# the run directory: one writer, only minigpt's files


LOCK = ".lock"
RUN_FILES = {"config.json", "tokenizer.json", "metrics.jsonl", "metrics.csv", "tensorboard", "wandb", "summary.json",
             LATEST, "checkpoints", "report.json", "report.md", "loss.png", "memory_per_rank.json",
             "data.json", "imported.json", LOCK} | run_file_names()  # + what the backends write (their `files`)


class RunLock:
    """One trainer per run directory: an exclusive lock (fcntl.flock) on RUN/.lock, which names its
    holder. The OS releases it when the process ends, however it ends."""

    def __init__(self, root: Path) -> None:
        self.path, self.fd = Path(root) / LOCK, None

    def acquire(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = self.path.read_text().strip() or "another process"
            os.close(self.fd)
            self.fd = None
            raise UserError(f"{self.path.parent} is being trained by {holder}; wait for it, stop it (SIGTERM saves a "
                            f"checkpoint), or set train.out_dir to another directory") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                 .encode())

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def foreign_entries(root: Path) -> list[str]:
    """Entries of a directory that a minigpt run does not write (temporaries aside)."""
    if not Path(root).is_dir():
        return []
    return sorted(p.name for p in Path(root).iterdir() if p.name not in RUN_FILES and not p.name.endswith(".tmp"))


def clear_run_dir(root: Path) -> None:
    """Delete a run's files (for --overwrite, or a start over a run that died before its first
    checkpoint), keeping the lock that this process holds."""
    for p in Path(root).iterdir():
        if p.name != LOCK:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def remove_temporaries(root: Path) -> list[Path]:
    """Files and folders that a killed write left behind: *.tmp, checkpoints/.step_*.partial."""
    root = Path(root)
    stale = list(root.glob(".*.tmp")) + list((root / "checkpoints").glob(".step_*"))
    stale += list((root / "checkpoints").glob("step_*/.*.tmp"))
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


# ----------------------------------------------------------------------------------------------
# a run's model, for every reader (generate, serve, bench decode, the quickstart)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", step: int | None = None) -> tuple[GPT, object, Config, int]:
    """Model (eval mode, on `device`), tokenizer, config and step of a run's latest checkpoint, or of
    the kept checkpoint of `step` (train.keep_checkpoints keeps several).

    Safe while the run is training: a checkpoint replaced mid-read is read again (load_latest).
    """
    run_dir = Path(run_dir)
    latest_checkpoint(run_dir, verify=False)  # a clear error when it is no run
    cfg = config_from_json(run_dir / "config.json")
    tokenizer = read_tokenizer(run_dir / "tokenizer.json", f"{run_dir} has no tokenizer.json: the run directory is "
                                                            f"damaged; copy the tokenizer the run was trained with there")
    model = GPT(cfg.model)
    if step is None:
        _, step = load_latest(run_dir, lambda folder: load_weights(model, folder))
    else:
        folder = run_dir / "checkpoints" / f"step_{step:07d}"
        if not folder.is_dir():
            kept = sorted(int(f.name[5:]) for f in (run_dir / "checkpoints").glob("step_*") if f.name[5:].isdigit())
            raise UserError(f"{run_dir} keeps no checkpoint of step {step}; it keeps steps {kept} (train.keep_checkpoints "
                            f"sets how many are kept)")
        load_weights(model, folder)
    model.to(device).eval()
    return model, tokenizer, cfg, step

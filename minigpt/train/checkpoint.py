"""Writing a run: the run directory's paths, the one Checkpointer every backend saves through, and the
run lock. The layout, verification and commit live one band down (minigpt/run/files.py), with reading
a run's model (minigpt/run/load.py), so inference and interop never import training.

`Checkpointer` is the one save/load path for every backend: the backend writes its shards (if
any) into the folder being assembled and returns its small state; the checkpointer adds the whole
weights (safetensors), every rank's RNG state and the training state, then commits the folder.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import stat
import time
from pathlib import Path

import torch

from minigpt.core.errors import UserError, write_error
from minigpt.nn.lora import adapter_state, lora_saved
from minigpt.nn.weights import WEIGHTS, save_weights
from minigpt.parallel.distributed import DistEnv, all_gather_objects, barrier
from minigpt.parallel.registry import run_file_names
from minigpt.run.files import (
    LATEST,
    STATE,
    commit_checkpoint,
    latest_checkpoint,
    load_state,
    new_checkpoint_folder,
    partial_folder,
)

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
            if env.is_main and backend.tc.lora_rank:  # a LoRA run keeps its adapters; the base is train.init_from
                weights = adapter_state(weights, lora_saved(backend.model))
            if env.is_main:
                self._write(weights, state, tmp)
            barrier(env)
            if env.is_main:
                commit_checkpoint(self.run.root, step, tmp, self.keep)
        finally:
            if env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
        barrier(env)

    def _write(self, weights: dict, state: dict, tmp: Path) -> None:
        """The weights and state.pt into the partial folder; a full disk, a read-only file system or a
        quota, however the library reports it, is one line: the last complete checkpoint stays."""
        try:
            save_weights(weights, tmp / WEIGHTS)
            torch.save(state, tmp / STATE)
        except Exception as e:
            error = write_error(e, tmp)
            if error is None:
                raise
            _, last = latest_checkpoint(self.run.root, verify=False) if self.run.has_checkpoint() else (None, None)
            kept = f"the last complete checkpoint (step {last}) is intact" if last is not None else "no checkpoint yet"
            raise UserError(f"{error}; {kept}: resume with --resume {self.run.root}") from None

    def latest_state(self) -> tuple[Path, dict]:
        """The latest checkpoint's folder and its state.pt (read once: the backend's rules check it before the
        backend is built, then `load` restores it)."""
        folder, _ = latest_checkpoint(self.run.root)
        return folder, load_state(folder)

    def load(self, backend, saved: tuple[Path, dict]) -> dict:
        """Restore `saved` (latest_state, already checked) into `backend` and this rank's RNG; return the training
        state."""
        folder, state = saved
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
             "quantized.json", "pruned.json",
             LATEST, "checkpoints", "report.json", "report.md", "loss.png", "memory_per_rank.json",
             "data.json", "imported.json", "depends.json", LOCK} | run_file_names()  # + what the backends write (their `files`)


class RunLock:
    """One trainer per run directory: an exclusive lock (fcntl.flock) on RUN/.lock, which names its
    holder. The OS releases it when the process ends, however it ends."""

    def __init__(self, root: Path) -> None:
        self.path, self.fd = Path(root) / LOCK, None

    def acquire(self) -> None:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise UserError(f"{self.path} is a symbolic link; minigpt never follows links in a run directory (writing "
                            f"the lock would overwrite the file it points to): remove it") from None
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            os.close(self.fd)
            self.fd = None
            what = "has another name (a hard link)" if stat.S_ISREG(st.st_mode) else "is not a regular file"
            raise UserError(f"{self.path} {what}: writing the lock would overwrite that file too; remove {self.path}")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
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


def clear_run_dir(root: Path, keep: tuple[str, ...] = ()) -> None:
    """Delete a run's files (for --overwrite, or a start over a run that died before its first
    checkpoint), keeping the lock that this process holds and `keep` (the backend's working folders, just built)."""
    for p in Path(root).iterdir():
        if p.name != LOCK and p.name not in keep:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()  # a link goes, not its target


def remove_temporaries(root: Path) -> list[Path]:
    """Files and folders that a killed write left behind: *.tmp, checkpoints/.step_*.partial."""
    root = Path(root)
    stale = list(root.glob(".*.tmp")) + list((root / "checkpoints").glob(".step_*"))
    stale += list((root / "checkpoints").glob("step_*/.*.tmp"))
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale



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
import re
import shutil
import socket
import time
from pathlib import Path, PurePosixPath

import torch

from minigpt.analytic.flops import param_counts
from minigpt.analytic.memory import model_bytes
from minigpt.core.atomic import atomic_write_text, fsync_dir
from minigpt.core.config import Config, config_from_json, read_json
from minigpt.core.device import check_fits
from minigpt.core.errors import UserError, write_error
from minigpt.data.tokenizer import read_tokenizer
from minigpt.nn.lora import adapter_state, apply_lora, load_adapters, merge_lora
from minigpt.nn.model import GPT
from minigpt.nn.weights import WEIGHTS, load_weights, read_weights, save_weights
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
    if tmp.parent.is_symlink():
        raise UserError(f"{tmp.parent} is a symbolic link; a run's checkpoints folder never is: remove it")
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()
    elif tmp.exists():
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
    prune(ckpt_root, keep, name)
    return final


CHECKPOINT_FILES = {WEIGHTS, STATE, "deepspeed"}  # what a checkpoint folder holds (deepspeed/: that backend's shards)


def prune(ckpt_root: Path, keep: int, newest: str) -> None:
    """Delete all but the newest `keep` complete checkpoints, and stray temporaries: only folders this run
    wrote, proved so by their name and contents (never a link, never a folder holding anything else)."""
    ours = [p for p in ckpt_root.iterdir() if not p.is_symlink() and p.is_dir()
            and {c.name for c in p.iterdir()} <= CHECKPOINT_FILES]
    complete = sorted(p for p in ours if STEP_DIR.fullmatch(p.name))
    for old in complete[:-keep]:
        if old.name != newest:
            shutil.rmtree(old, ignore_errors=True)
    for stray in ours:
        if re.fullmatch(r"\.step_\d{7,}\.partial", stray.name):
            shutil.rmtree(stray, ignore_errors=True)


def latest_checkpoint(run_dir: Path, verify: bool = True) -> tuple[Path, int]:
    """The newest complete checkpoint of a run: (folder, step). UserError when missing or corrupt.

    latest.json is untrusted input (a run directory can come from anyone): its step must be a plain count,
    its folder exactly checkpoints/step_NNNNNNN, every file it lists a plain relative name inside that
    folder, and nothing on the way a symbolic link; so no file outside the run is ever read, hashed or
    named. verify: also check every file's size and SHA-256 against the record."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; give a directory written by 'minigpt train'")
    pointer_path = run_dir / LATEST
    if not pointer_path.is_file():
        raise UserError(f"{run_dir} has no checkpoint ({LATEST} missing); train first or give another run directory")
    refuse_links(run_dir)
    try:
        pointer = read_json(pointer_path, "checkpoint pointer")
    except UserError as e:
        raise UserError(f"{pointer_path} is corrupt ({str(e).split(': ', 1)[-1]}); the run cannot be loaded from it") from None
    folder, step, files = _checked_pointer(run_dir, pointer)
    for fname, expected in files.items() if verify else ():
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


MAX_STEP = 10**12
STEP_DIR = re.compile(r"step_\d{7,}")


def _checked_pointer(run_dir: Path, pointer: dict) -> tuple[Path, int, dict]:
    """(folder, step, files) of a latest.json, each field checked; UserError naming the field otherwise."""
    where = run_dir / LATEST
    step, name, files = pointer.get("step"), pointer.get("dir"), pointer.get("files")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
        raise UserError(f"{where} is corrupt: step {step!r} is not a step count; the run cannot be loaded from it")
    if name != f"checkpoints/step_{step:07d}":
        raise UserError(f"{where} is corrupt: it points outside the run's own checkpoints/step_{step:07d}; the run "
                        f"cannot be loaded from it")
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise UserError(f"{where} is corrupt: it lists no {WEIGHTS}; the run cannot be loaded from it")
    for fname, digest in files.items():
        parts = PurePosixPath(fname).parts if isinstance(fname, str) else ()
        if not parts or fname.startswith("/") or any(p in ("..", ".", "") for p in parts) or "\\" in fname:
            raise UserError(f"{where} is corrupt: it lists a file outside its checkpoint folder; the run cannot be "
                            f"loaded from it")
        if not (isinstance(digest, dict) and isinstance(digest.get("bytes"), int) and digest["bytes"] >= 0
                and isinstance(digest.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", digest["sha256"])):
            raise UserError(f"{where} is corrupt: the record of {fname} is not a size and a SHA-256")
    folder = run_dir / name
    for link in [run_dir / "checkpoints", folder] + [folder.joinpath(*PurePosixPath(f).parts[:i + 1])
                                                    for f in files for i in range(len(PurePosixPath(f).parts))]:
        if link.is_symlink():
            raise UserError(f"{link.relative_to(run_dir)} in {run_dir} is a symbolic link; a run's checkpoints never "
                            f"are: it was not followed (remove the link)")
    return folder, step, files


def refuse_links(root: Path) -> None:
    """A run directory's own entries (and its checkpoints') are never symbolic links: minigpt writes them, and
    following one would read or overwrite a file elsewhere. One line naming the first link found."""
    root = Path(root)
    entries = list(root.iterdir()) if root.is_dir() else []
    ckpt = root / "checkpoints"
    if ckpt.is_dir() and not ckpt.is_symlink():
        entries += list(ckpt.iterdir())
    for entry in entries:
        if entry.is_symlink():
            raise UserError(f"{entry.relative_to(root)} in {root} is a symbolic link; minigpt never follows links in a "
                            f"run directory (it would read or overwrite a file elsewhere): remove it")


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
            if env.is_main and backend.tc.lora_rank:  # a LoRA run keeps its adapters; the base is train.init_from
                weights = adapter_state(weights)
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
             "quantized.json",
             LATEST, "checkpoints", "report.json", "report.md", "loss.png", "memory_per_rank.json",
             "data.json", "imported.json", LOCK} | run_file_names()  # + what the backends write (their `files`)


class RunLock:
    """One trainer per run directory: an exclusive lock (fcntl.flock) on RUN/.lock, which names its
    holder. The OS releases it when the process ends, however it ends."""

    def __init__(self, root: Path) -> None:
        self.path, self.fd = Path(root) / LOCK, None

    def acquire(self) -> None:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise UserError(f"{self.path} is a symbolic link; minigpt never follows links in a run directory (writing "
                            f"the lock would overwrite the file it points to): remove it") from None
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


def clear_run_dir(root: Path) -> None:
    """Delete a run's files (for --overwrite, or a start over a run that died before its first
    checkpoint), keeping the lock that this process holds."""
    for p in Path(root).iterdir():
        if p.name != LOCK:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()  # a link goes, not its target


def remove_temporaries(root: Path) -> list[Path]:
    """Files and folders that a killed write left behind: *.tmp, checkpoints/.step_*.partial."""
    root = Path(root)
    stale = list(root.glob(".*.tmp")) + list((root / "checkpoints").glob(".step_*"))
    stale += list((root / "checkpoints").glob("step_*/.*.tmp"))
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


def check_tokenizer(run_dir: Path) -> None:
    """The run's tokenizer.json is the one it was trained with: its SHA-256 as data.json recorded it (runs
    from before the record are not checked)."""
    run_dir = Path(run_dir)
    pinned = run_dir / "data.json"
    if not pinned.is_file() or not (run_dir / "tokenizer.json").is_file():
        return
    expected = read_json(pinned, "the run's pinned corpus").get("tokenizer_sha256")
    if expected and file_digest(run_dir / "tokenizer.json")["sha256"] != expected:
        raise UserError(f"{run_dir}/tokenizer.json is not the tokenizer the run was trained with (its SHA-256 differs "
                        f"from data.json's record): restore the run's own tokenizer.json")


# ----------------------------------------------------------------------------------------------
# a run's model, for every reader (generate, serve, bench decode, the quickstart)


def load_run_weights(model: GPT, folder: Path, cfg: Config) -> None:
    """A checkpoint folder's weights into `model` (a GPT of cfg.model). A LoRA run saves its adapters only:
    its base (train.init_from, a run) is read again, the adapters put on and merged, so `model` stays a
    plain GPT."""
    tc = cfg.train
    if not tc.lora_rank:
        load_weights(model, folder)
        return
    base = Path(tc.init_from)
    base_cfg = config_from_json(base / "config.json")
    load_latest(base, lambda f: load_run_weights(model, f, base_cfg))
    apply_lora(model, tc.lora_rank, tc.lora_alpha, tc.lora_targets)
    load_adapters(model, read_weights(folder), str(folder))
    merge_lora(model)
    model.requires_grad_(True)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", step: int | None = None) -> tuple[GPT, object, Config, int]:
    """Model (eval mode, on `device`), tokenizer, config and step of a run's latest checkpoint, or of
    the kept checkpoint of `step` (train.keep_checkpoints keeps several).

    Safe while the run is training: a checkpoint replaced mid-read is read again (load_latest). A LoRA
    run's adapters come merged into its base (load_run_weights).
    """
    run_dir = Path(run_dir)
    latest_checkpoint(run_dir, verify=False)  # a clear error when it is no run
    cfg = config_from_json(run_dir / "config.json")
    check_tokenizer(run_dir)
    tokenizer = read_tokenizer(run_dir / "tokenizer.json", f"{run_dir} has no tokenizer.json: the run directory is "
                                                            f"damaged; copy the tokenizer the run was trained with there")
    if tokenizer.get_vocab_size() > cfg.model.vocab_size:
        raise UserError(f"{run_dir}/tokenizer.json has {tokenizer.get_vocab_size():,} tokens, more than the model's "
                        f"vocab_size {cfg.model.vocab_size:,}: it is not the run's tokenizer; restore the run's own")
    check_fits(model_bytes(cfg.model), device, f"loading the model of {run_dir} ({param_counts(cfg.model).total:,} "
               f"parameters)", "use a machine with more memory, or check that its config.json is the run's own")
    model = GPT(cfg.model)
    if cfg.model.quantization:  # a quantized run: the quantized modules first, then their saved tensors
        from minigpt.infer.quantize import quantize_model

        quantize_model(model, cfg.model.quantization)
    if step is None:
        _, step = load_latest(run_dir, lambda folder: load_run_weights(model, folder, cfg))
    else:
        folder = run_dir / "checkpoints" / f"step_{step:07d}"
        if not folder.is_dir():
            kept = sorted(int(f.name[5:]) for f in (run_dir / "checkpoints").glob("step_*") if f.name[5:].isdigit())
            raise UserError(f"{run_dir} keeps no checkpoint of step {step}; it keeps steps {kept} (train.keep_checkpoints "
                            f"sets how many are kept)")
        load_run_weights(model, folder, cfg)
    model.to(device).eval()
    return model, tokenizer, cfg, step

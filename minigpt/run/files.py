"""A run directory's files, read and committed: the layout every command shares, and the checks that
make a run directory (which may come from anyone) safe to read.

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

This band sits below training, inference and interop: all of them read runs; training (train/checkpoint.py)
and `convert` write them through commit_checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from pathlib import Path, PurePosixPath

import torch

from minigpt.core.atomic import atomic_write_text, fsync_dir
from minigpt.core.config import read_json
from minigpt.core.errors import UserError
from minigpt.core.files import LATEST, RECORD, check_record, digest_file, folder_record, read_verified
from minigpt.nn.weights import WEIGHTS

STATE = "state.pt"


def file_digest(path: Path) -> dict:
    """Size and SHA-256 of a regular file (never a link, a FIFO or a device)."""
    return digest_file(path, "file")


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
    for path in sorted(p for p in tmp.rglob("*") if p.is_file() and p.relative_to(tmp) != Path(RECORD)):
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        files[str(path.relative_to(tmp))] = file_digest(path)
    # the folder's own record, so a kept older step is verified as the latest is (core/files.read_verified)
    atomic_write_text(tmp / RECORD, json.dumps({"step": step, "files": files}, indent=2))
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


CHECKPOINT_FILES = {WEIGHTS, STATE, RECORD, "deepspeed"}  # what a checkpoint folder holds (deepspeed/: that backend's shards)


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
    if verify:
        verify_checkpoint(run_dir, folder, files)
    return folder, step


def _refuse_record_links(run_dir: Path, folder: Path, files: dict) -> None:
    """Nothing on the way to a recorded file is a symbolic link (the checkpoints folder, the step folder, each
    part of each listed name): no file outside the run is read, hashed or named."""
    for link in [run_dir / "checkpoints", folder] + [folder.joinpath(*PurePosixPath(f).parts[:i + 1])
                                                    for f in files for i in range(len(PurePosixPath(f).parts))]:
        if link.is_symlink():
            raise UserError(f"{link.relative_to(run_dir)} in {run_dir} is a symbolic link; a run's checkpoints never "
                            f"are: it was not followed (remove the link)")


def verify_checkpoint(run_dir: Path, folder: Path, files: dict) -> None:
    """Every file of a checkpoint's record present, a regular file of its size and SHA-256. Before any work: what
    is then loaded is verified again on its own bytes."""
    for fname, expected in files.items():
        path = folder / fname
        if not os.path.lexists(path):
            raise UserError(f"checkpoint {folder} is incomplete: {fname} is missing; it cannot be loaded")
        found = file_digest(path)
        if found != expected:
            raise UserError(
                f"checkpoint file {path} is corrupt ({found['bytes']:,} bytes, expected "
                f"{expected['bytes']:,} with a different SHA-256); it was not loaded"
            )


def kept_checkpoint(run_dir: Path, step: int) -> Path:
    """The kept checkpoint of `step` (train.keep_checkpoints), verified as the latest is: by its own record."""
    run_dir = Path(run_dir)
    folder = run_dir / "checkpoints" / f"step_{step:07d}"
    refuse_links(run_dir)
    if not folder.is_dir() or folder.is_symlink():
        kept = sorted(int(f.name[5:]) for f in (run_dir / "checkpoints").glob("step_*") if f.name[5:].isdigit())
        raise UserError(f"{run_dir} keeps no checkpoint of step {step}; it keeps steps {kept} (train.keep_checkpoints "
                        f"sets how many are kept)")
    files = folder_record(folder)
    if WEIGHTS not in files:
        raise UserError(f"checkpoint {folder}'s record lists no {WEIGHTS}; it cannot be loaded")
    _refuse_record_links(run_dir, folder, files)
    verify_checkpoint(run_dir, folder, files)
    return folder


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
    files = check_record(files, str(where))
    _refuse_record_links(run_dir, run_dir / name, files)  # with or without verify, as before the records split
    return run_dir / name, step, files


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
    """state.pt, unpickled with weights_only=True (tensors and plain containers, never code), from the bytes
    the checkpoint's record verified."""
    data = read_verified(folder, STATE)
    try:
        return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
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
# what a run depends on, pinned: a LoRA run's base, a distillation's teacher

DEPENDS = "depends.json"
PINNED_SOURCES = ("init_from", "distill_from", "reward_from")


def source_pin(source: str) -> dict:
    """What `source` (a minigpt run, or a Hugging Face folder) is now: a run's latest step and the SHA-256 of its
    weights (from its checkpoint record), or an HF folder's config and weight files' SHA-256."""
    src = Path(source)
    if os.path.lexists(src / LATEST):
        folder, step = latest_checkpoint(src, verify=False)
        return {"path": str(src.resolve()), "step": step, "weights_sha256": folder_record(folder)[WEIGHTS]["sha256"]}
    files = sorted(p for p in src.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    return {"path": str(src.resolve()), "files": {p.name: digest_file(p, "file")["sha256"] for p in files}}


def pin_sources(run_dir: Path, train_cfg) -> None:
    """depends.json: the pins of train.init_from and train.distill_from as they are when the run starts."""
    pins = {key: source_pin(getattr(train_cfg, key)) for key in PINNED_SOURCES if getattr(train_cfg, key)}
    atomic_write_text(Path(run_dir) / DEPENDS, json.dumps(pins, indent=2))


def check_pinned(run_dir: Path, key: str, source: str, what: str) -> None:
    """Refuse, naming it, a source that changed since the run pinned it (a base trained further, a teacher
    swapped). Runs from before pins are not checked."""
    path = Path(run_dir) / DEPENDS
    if not os.path.lexists(path):
        return
    pinned = read_json(path, "the run's pinned sources").get(key)
    if pinned is None:
        return
    now = source_pin(source)
    if {k: v for k, v in now.items() if k != "path"} != {k: v for k, v in pinned.items() if k != "path"}:  # moved is fine
        was = f"step {pinned.get('step')}" if "step" in pinned else "its files"
        raise UserError(f"{what} {source} is not the one {run_dir} was trained with: it changed since ({was} then, "
                        f"{'step ' + str(now.get('step')) if 'step' in now else 'other files'} now); restore it, or "
                        f"start a new run from it")

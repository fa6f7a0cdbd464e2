"""Run directories and atomic, verified checkpoints.

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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from minigpt.errors import UserError

LATEST = "latest.json"
WEIGHTS = "model.safetensors"
STATE = "state.pt"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), fsync the file, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


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


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, state: dict, keep: int = 1) -> Path:
    """Write weights + training state for `step`, point latest.json at them, prune old ones."""
    tmp = new_checkpoint_folder(run_dir, step)
    try:
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt", "step": str(step)})
        torch.save(state, tmp / STATE)
        return commit_checkpoint(run_dir, step, tmp, keep)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    try:
        missing, unexpected = load_model(model, str(Path(folder) / WEIGHTS), strict=False)
    except Exception as e:
        raise UserError(f"cannot load weights from {folder}: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise UserError(
            f"weights in {folder} do not fit the model (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}): the checkpoint was written for another model config"
        )


def load_state(folder: Path, device: torch.device | str = "cpu") -> dict:
    return torch.load(Path(folder) / STATE, map_location=device, weights_only=True)

"""A model written as a new run directory (config, tokenizer, weights as a committed checkpoint, a record of where
it came from), atomically: built in a `.partial.tmp` sibling and renamed. What `convert --quantize-run` and
`minigpt prune` produce; every reader (generate, eval, serve, convert, init_from) loads it as any run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from minigpt.core.atomic import atomic_write_text
from minigpt.core.config import Config
from minigpt.core.errors import UserError
from minigpt.nn.weights import WEIGHTS, save_weights, weights_of
from minigpt.run.files import commit_checkpoint, new_checkpoint_folder


def check_new_folder(out: str) -> Path:
    out_path = Path(out)
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder: give a new folder")
    return out_path


def write_model_run(model, cfg: Config, source_run: str, out: str, step: int, record: str, info: dict) -> None:
    """`model` (its config in `cfg`) as a run in `out`, with `source_run`'s tokenizer and `record` (a JSON file
    naming its source) beside it."""
    out_path = check_new_folder(out)
    cfg.train.out_dir, cfg.data.tokenizer = str(out_path), str((out_path / "tokenizer.json").resolve())
    tmp = out_path.with_name(out_path.name + ".partial.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        atomic_write_text(tmp / "config.json", cfg.to_json())
        shutil.copyfile(Path(source_run) / "tokenizer.json", tmp / "tokenizer.json")
        atomic_write_text(tmp / record, json.dumps(info, indent=2))
        folder = new_checkpoint_folder(tmp, step)
        save_weights(weights_of(model), folder / WEIGHTS)
        commit_checkpoint(tmp, step, folder)
        if out_path.exists():
            out_path.rmdir()
        tmp.rename(out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

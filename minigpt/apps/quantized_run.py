"""`minigpt convert --quantize-run RUN --quantize int8|int4 --out DIR`: a run's weights quantized into a new run
(orchestration over nn/quantize.py and the run-directory helpers of run/files.py)."""

from __future__ import annotations

from minigpt.core.errors import UserError
from minigpt.nn.quantize import quantize_model, weight_bytes


def save_quantized_run(run_dir: str, mode: str, out: str) -> dict:
    """A run's latest weights quantized into a new run directory (its config says model.quantization, so
    every reader builds the quantized modules and loads their tensors); the source run is untouched."""
    import dataclasses
    import json
    import shutil
    from pathlib import Path

    from minigpt.core.atomic import atomic_write_text
    from minigpt.nn.weights import WEIGHTS, save_weights
    from minigpt.run.files import commit_checkpoint, new_checkpoint_folder
    from minigpt.run.load import load_run

    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()):
        raise UserError(f"--out {out} exists and is not empty: give a new folder")
    model, _, cfg, step = load_run(run_dir)
    quantize_model(model, mode)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantization=mode))
    cfg.train.out_dir, cfg.data.tokenizer = str(out_path), str((out_path / "tokenizer.json").resolve())
    tmp = out_path.with_name(out_path.name + ".partial.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        atomic_write_text(tmp / "config.json", cfg.to_json())
        shutil.copyfile(Path(run_dir) / "tokenizer.json", tmp / "tokenizer.json")
        info = {"from": str(Path(run_dir).resolve()), "step": step, "quantization": mode, **weight_bytes(model)}
        atomic_write_text(tmp / "quantized.json", json.dumps(info, indent=2))
        folder = new_checkpoint_folder(tmp, step)
        save_weights({k: v for k, v in model.state_dict().items()}, folder / WEIGHTS)
        commit_checkpoint(tmp, step, folder)
        if out_path.exists():
            out_path.rmdir()
        tmp.rename(out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info

"""`minigpt convert --quantize-run RUN --quantize int8|int4 --out DIR`: a run's weights quantized into a new run
(orchestration over nn/quantize.py and apps/model_run.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from minigpt.apps.model_run import check_new_folder, write_model_run
from minigpt.nn.quantize import quantize_model, weight_bytes
from minigpt.run.load import load_run


def save_quantized_run(run_dir: str, mode: str, out: str) -> dict:
    """A run's latest weights quantized into a new run directory (its config says model.quantization, so
    every reader builds the quantized modules and loads their tensors); the source run is untouched."""
    check_new_folder(out)
    model, _, cfg, step = load_run(run_dir)
    quantize_model(model, mode)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantization=mode))
    info = {"from": str(Path(run_dir).resolve()), "step": step, "quantization": mode, **weight_bytes(model)}
    write_model_run(model, cfg, run_dir, out, step, "quantized.json", info)
    return info

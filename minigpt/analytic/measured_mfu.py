"""MFU measured by minigpt itself, read from a run's summary or a benchmark's JSON line, for
`extrapolate --from-run / --from-bench`. Torch-free."""

from __future__ import annotations

import json
from pathlib import Path

from minigpt.core.config import read_json
from minigpt.core.errors import UserError
from minigpt.core.hardware import GPUSpec


def mfu_from_run(run_dir: str, gpu: GPUSpec) -> tuple[float, str]:
    """The MFU a training run measured (report.json), labelled with where it was measured."""
    path = Path(run_dir) / "report.json"
    try:
        perf = read_json(path, "run report")["performance"]
    except (UserError, KeyError, TypeError):
        raise UserError(f"{path} is missing or unreadable: train with train.report = true, or give --mfu") from None
    if perf.get("mfu") is None:
        raise UserError(f"the run in {run_dir} has no MFU (unknown peak): retrain with train.peak_from, or give --mfu")
    source = f"measured in run {run_dir}: {perf['mfu_dtype']} MFU against {perf['peak_source']}"
    if gpu.name.lower() not in perf["peak_source"].lower():
        source += f" (WARNING: measured on another device than the target {gpu.name})"
    return float(perf["mfu"]), source


def mfu_from_bench(path: str, gpu: GPUSpec) -> tuple[float, str]:
    """The MFU in a benchmark JSON line: an 'mfu' key, or achieved_tflops / peak_tflops."""
    try:
        data = json.loads(Path(path).read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        raise UserError(f"cannot read a benchmark JSON line from {path}") from None
    if data.get("mfu"):
        mfu = float(data["mfu"])
    elif data.get("achieved_tflops") and data.get("peak_tflops"):
        mfu = float(data["achieved_tflops"]) / float(data["peak_tflops"])
    else:
        raise UserError(f"{path} has no 'mfu' (nor achieved_tflops and peak_tflops); give --mfu instead")
    source = f"measured by benchmark {path} on {data.get('device_name', data.get('device', '?'))}"
    if gpu.name.lower() not in str(data.get("device_name", "")).lower():
        source += f" (WARNING: measured on another device than the target {gpu.name})"
    return mfu, source

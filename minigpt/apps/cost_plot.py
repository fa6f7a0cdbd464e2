"""The points of `minigpt extrapolate plot`: every GPT-3 size and GPT-4 extrapolated on 1,024 GPUs, beside
minigpt's own finished runs (their measured GPU-hours, from summary.json)."""

from __future__ import annotations

from pathlib import Path

from minigpt.analytic.extrapolate import extrapolate
from minigpt.analytic.scenario import Scenario
from minigpt.core.config import GPT3_PRESETS, read_json
from minigpt.core.errors import UserError
from minigpt.core.hardware import GPUSpec
from minigpt.core.resolve import target_config

PLOTTED_GPUS = 1024


def cost_points(gpu: GPUSpec, mfu: float | None, runs: list[str]) -> list[dict]:
    """One point per model: {name, params, tokens, gpu_hours, kind ("extrapolated" at the given MFU, or the
    step-time model's prediction on its fastest layout; "measured" for a run: wall time x world size)}."""
    points = []
    for name in [*GPT3_PRESETS, "gpt4"]:
        cfg = target_config(name)
        given = {"mfu": mfu, "mfu_source": "given (--mfu)"} if mfu else {}  # else predicted per model
        r = extrapolate(cfg.model, cfg.target, Scenario(gpu, num_gpus=PLOTTED_GPUS, **given))
        points.append({"name": name, "params": r["params_active"], "gpu_hours": r["gpu_hours"], "kind": "extrapolated",
                       "tokens": r["train_tokens"], "mfu": r["mfu"], "mfu_source": r["mfu_source"]})
    for run in runs:
        path = Path(run) / "summary.json"
        if not path.is_file():
            raise UserError(f"{path} does not exist: give a finished run directory with --run")
        summary = read_json(path, "run summary")
        points.append({"name": Path(run).name, "params": summary["params"], "tokens": summary["tokens_seen"],
                       "gpu_hours": summary["wall_s"] * summary["world_size"] / 3600, "kind": "measured"})
    return points

"""A CPU speedrun: what a recipe learns in a fixed wall-clock budget, in validation bits per byte.

Each recipe is the tiny preset with [model]/[train] overrides. A short probe times its step on this
machine (median of the steps after the first); the run is then given the steps that fit the budget, so
its learning-rate schedule ends where the budget does, with train.max_minutes as a hard stop. The run is
`minigpt train` itself (in-process), compilation off (the CPU default below 1,000 steps) and counted in
the wall time. Validation bpb is measured at the end over `eval_iters` micro-batches of the fixed
validation split (the same windows for every recipe at a seed). Recipes run back to back within each
seed, so the machine's drift is shared; seeds give the spread.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from minigpt.core.config import load_config, resolve_preset
from minigpt.core.progress import note

RECIPES: dict[str, list[str]] = {
    "tiny": [],  # the preset: learned positions, LayerNorm, GELU, tied head, AdamW, cosine
    "llama": ['model.pos_emb="rope"', 'model.norm="rmsnorm"', 'model.mlp="swiglu"', "model.tie_embeddings=false"],
    "modern": ['model.pos_emb="rope"', 'model.norm="rmsnorm"', 'model.mlp="relu2"', "model.qk_norm=true",
               "model.tie_embeddings=false", 'train.schedule="wsd"'],
    "modern+muon": ['model.pos_emb="rope"', 'model.norm="rmsnorm"', 'model.mlp="relu2"', "model.qk_norm=true",
                    "model.tie_embeddings=false", 'train.schedule="wsd"', 'train.optimizer="muon"'],
}
RECIPES["modern+muon lr x2"] = RECIPES["modern+muon"] + ["train.lr=6e-3", "train.min_lr=6e-4"]  # the budget's lr
# the budget's batch: half and twice the preset's 32 x 128 tokens a step (the steps that fit follow from the probe)
RECIPES["modern+muon half batch"] = RECIPES["modern+muon"] + ["train.batch_size_tokens=2048", "train.micro_batch_size=16"]
RECIPES["modern+muon double batch"] = RECIPES["modern+muon"] + ["train.batch_size_tokens=8192", "train.micro_batch_size=64"]
RECIPES["modern+muon doc-aligned"] = RECIPES["modern+muon"] + ['data.align="document"']
# leave-one-out: each switch of modern+muon taken back alone, to attribute the gain
LEAVE_ONE_OUT = {"learned positions": 'model.pos_emb="learned"', "layernorm": 'model.norm="layernorm"',
                 "gelu mlp": 'model.mlp="gelu"', "no qk-norm": "model.qk_norm=false", "tied head": "model.tie_embeddings=true",
                 "cosine": 'train.schedule="cosine"'}
for _name, _back in LEAVE_ONE_OUT.items():
    RECIPES[f"modern+muon - {_name}"] = RECIPES["modern+muon"] + [_back]
PROBE_STEPS = 6


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def _config(overrides: list[str], out_dir: Path, steps: int, seed: int, eval_iters: int, budget_s: float):
    sets = [*overrides, f'train.out_dir="{out_dir}"', f"train.max_steps={steps}", f"train.seed={seed}",
            f"train.eval_iters={eval_iters}", "train.eval_every=0", "train.checkpoint_every=0", "train.sample_every=0",
            "train.report=false", "train.log_every=1", f"train.max_minutes={1.25 * budget_s / 60:.4f}",
            f"train.warmup_steps={max(1, min(30, steps // 10))}"]
    return load_config(resolve_preset("tiny"), sets)


def run_recipe(name: str, root: Path, budget_s: float, seed: int, eval_iters: int, extra: list[str]) -> dict:
    """Probe the step time, then train for the steps that fit `budget_s`; the run's figures."""
    from minigpt.train.loop import train

    overrides = RECIPES[name] + extra
    probe = root / f"{name}-probe-{seed}"
    train(_config(overrides, probe, PROBE_STEPS, seed, 1, budget_s), log=lambda *a: None)
    ms = statistics.median(r["ms_per_step"] for r in _records(probe, "step")[1:])
    steps = max(10, int(budget_s * 1000 / ms))
    out = root / f"{name}-{seed}"
    t0 = time.perf_counter()
    train(_config(overrides, out, steps, seed, eval_iters, budget_s), log=lambda *a: None)
    wall = time.perf_counter() - t0
    step_recs, evals = _records(out, "step"), _records(out, "eval")
    return {"recipe": name, "seed": seed, "val_bpb": evals[-1]["val_bpb"], "val_loss": evals[-1]["val_loss"],
            "steps": step_recs[-1]["step"], "steps_planned": steps, "tokens": step_recs[-1]["tokens"],
            "probe_ms_per_step": round(ms, 1), "wall_s": round(wall, 1), "overrides": overrides}


def speedrun(root: Path, recipes: list[str], seeds: list[int], budget_s: float, eval_iters: int,
             extra: list[str]) -> dict:
    """Every recipe at every seed, recipes back to back within a seed; the mean bpb and spread per recipe."""
    jobs = [(seed, name) for seed in seeds for name in recipes]
    runs = []
    for i, (seed, name) in enumerate(jobs):
        note(f"speedrun: {i + 1}/{len(jobs)} {name}, seed {seed}, {budget_s:g} s of training")
        runs.append(run_recipe(name, root, budget_s, seed, eval_iters, extra))
    table = []
    for name in recipes:
        bpb = [r["val_bpb"] for r in runs if r["recipe"] == name]
        table.append({"recipe": name, "val_bpb_mean": round(statistics.mean(bpb), 4),
                      "val_bpb_spread": round(max(bpb) - min(bpb), 4), "seeds": len(bpb),
                      "steps_mean": round(statistics.mean(r["steps"] for r in runs if r["recipe"] == name)),
                      "overrides": RECIPES[name] + extra})
    return {"runs": runs, "table": table}

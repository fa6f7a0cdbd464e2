"""Distillation against training from scratch: the same student shape, tokens, tokenizer, schedule and seed,
with and without the teacher's soft targets; scored in validation bits per byte (`minigpt train` itself,
in-process, back to back per seed)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from minigpt.core.config import load_config, resolve_preset
from minigpt.core.progress import note

STUDENT = ["model.n_layer=2", "model.n_embd=64", "model.n_head=2"]


def _run(root: Path, name: str, teacher: str, steps: int, seed: int, eval_iters: int, extra: list[str]) -> dict:
    from minigpt.train.loop import train

    out = root / f"{name}-{seed}"
    sets = [*STUDENT, *extra, f'train.out_dir="{out}"', f"train.max_steps={steps}", f"train.seed={seed}",
            f"train.eval_iters={eval_iters}", "train.eval_every=0", "train.checkpoint_every=0", "train.sample_every=0",
            "train.report=false", "train.log_every=10", f'data.tokenizer="{Path(teacher) / "tokenizer.json"}"']
    if name == "distilled":
        sets = [s for s in sets if not s.startswith("data.tokenizer")] + [f'train.distill_from="{teacher}"']
    from minigpt.core.resolve import train_config

    cfg = train_config(str(resolve_preset("tiny")), sets) if name == "distilled" else load_config(resolve_preset("tiny"), sets)
    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg, log=lambda *a: None)
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "eval"]
    return {"student": name, "seed": seed, "val_bpb": evals[-1]["val_bpb"], "val_loss": evals[-1]["val_loss"]}


def compare(root: Path, teacher: str, steps: int, seeds: list[int], eval_iters: int, extra: list[str]) -> list[dict]:
    jobs = [(seed, name) for seed in seeds for name in ("scratch", "distilled")]
    out = []
    for i, (seed, name) in enumerate(jobs):
        note(f"distill bench: {i + 1}/{len(jobs)} the {name} student, seed {seed}, {steps} steps")
        out.append(_run(root, name, teacher, steps, seed, eval_iters, extra))
    return out

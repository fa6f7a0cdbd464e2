"""The post-training pipeline measured on the synthetic task: a pre-trained run -> SFT -> reward model, DPO (plain and
with RPO's NLL), GRPO, and a control (SFT continued for as many steps as the later stages, at their learning rate),
held-out accuracy after each on every held-out problem, for each seed. `minigpt train` itself, in-process, with the
shipped presets (sft-tiny, rm-tiny, dpo-tiny, grpo-tiny); the seed is train.seed of every stage after the base.

The control answers the question a reader should ask of any "RL beats SFT" table: is the gain more than more SFT?
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
from pathlib import Path

from minigpt.core.progress import note

STAGES = {  # name: (preset, starts from, extra settings)
    "sft": ("sft-tiny", "base", []),
    "rm": ("rm-tiny", "sft", []),
    "dpo (plain)": ("dpo-tiny", "sft", ["train.dpo_nll_coef=0"]),
    "dpo + nll (rpo)": ("dpo-tiny", "sft", []),
    "grpo": ("grpo-tiny", "sft", []),
    "sft continued (control)": ("sft-tiny", "sft", ["train.max_steps=600", "train.lr=5e-5", "train.min_lr=5e-6",
                                                    "train.warmup_steps=10"]),
}
# With scarce demonstrations (minigpt task --demonstrations 500: SFT sees 500 worked answers, GRPO's prompts and the
# pairs all 9,010 problems), the later stages run longer: chosen on seeds 1337 and 1338 (a fit, said with the
# table; other seeds are the check). GRPO 1,500 steps at 1e-4 (600 at 5e-5 or 2e-4 gained +0.04-0.05, inside the
# spread), DPO + NLL 600 at 5e-5 (300 at 2e-5: +0.037), plain DPO as DPO + NLL; the control matches GRPO's steps
# and rate.
SCARCE = {
    "dpo (plain)": ["train.max_steps=600", "train.lr=5e-5", "train.min_lr=5e-6"],
    "dpo + nll (rpo)": ["train.max_steps=600", "train.lr=5e-5", "train.min_lr=5e-6"],
    "grpo": ["train.max_steps=1500", "train.lr=1e-4", "train.min_lr=1e-5"],
    "sft continued (control)": ["train.max_steps=1500", "train.lr=1e-4", "train.min_lr=1e-5"],
}


def stages(scarce: bool) -> dict:
    """STAGES, or with scarce demonstrations STAGES with SCARCE's settings after each stage's own."""
    return {name: (preset, start, extra + (SCARCE.get(name, []) if scarce else []))
            for name, (preset, start, extra) in STAGES.items()}


def _train(preset: str, out: Path, sets: list[str]) -> dict:
    from minigpt.core.resolve import resolve_preset, train_config
    from minigpt.train.loop import train

    cfg = train_config(str(resolve_preset(preset)), [*sets, f'train.out_dir="{out}"'])
    with contextlib.redirect_stdout(io.StringIO()):
        return train(cfg, log=lambda *a, **k: None)


def pipeline(root: Path, base: str, task: str, seed: int, heldout: int, sft_steps: int | None = None,
             scarce: bool = False) -> list[dict]:
    """Every stage for one seed; sft_steps: SFT's train.max_steps (None: the preset's); scarce: SCARCE's settings."""
    runs, rows = {"base": base}, []
    for i, (name, (preset, start, extra)) in enumerate(stages(scarce).items()):
        if name == "sft" and sft_steps is not None:
            extra = [*extra, f"train.max_steps={sft_steps}"]
        note(f"post-training bench: seed {seed}, stage {i + 1}/{len(STAGES)}: {name} ({preset}) from {start}")
        out = root / f"{name.split()[0]}-{i}-{seed}"
        sets = [f'train.init_from="{runs[start]}"', f'train.post_data="{task}"', f"train.seed={seed}",
                f"train.task_eval_examples={heldout}", "train.eval_every=0", "train.checkpoint_every=0", *extra]
        summary = _train(preset, out, sets)
        runs[name] = str(out)
        rows.append({"stage": name, "preset": preset, "from": start, "seed": seed, "steps": summary["step"],
                     "heldout_accuracy": summary.get("heldout_accuracy"),
                     "heldout_pair_accuracy": summary.get("heldout_pair_accuracy"), "wall_s": summary["wall_s"],
                     "flops_by_stage": summary["flops_by_stage"], "settings": extra})
    return rows


def table(rows: list[dict]) -> list[dict]:
    """Per stage: the mean held-out accuracy over seeds, its spread (max - min), and its gain over SFT's mean."""
    out = []
    sft = statistics.mean(r["heldout_accuracy"] for r in rows if r["stage"] == "sft")
    spread_sft = _spread([r["heldout_accuracy"] for r in rows if r["stage"] == "sft"])
    for stage in STAGES:
        acc = [r["heldout_accuracy"] for r in rows if r["stage"] == stage]
        mean, spread = statistics.mean(acc), _spread(acc)
        policy = stage not in ("sft", "rm")  # the reward model scores answers: its figure is pair accuracy
        out.append({"stage": stage, "heldout_accuracy_mean": mean, "seed_spread": spread, "gain_over_sft": mean - sft,
                    "beats_sft_by_more_than_spread": (mean - sft) > max(spread, spread_sft) if policy else None,
                    "per_seed": acc,
                    "heldout_pair_accuracy": [r["heldout_pair_accuracy"] for r in rows if r["stage"] == stage]})
    return out


def _spread(values: list[float]) -> float:
    return max(values) - min(values)


def markdown(result: dict) -> str:
    lines = ["| stage | held-out accuracy (mean of seeds) | per seed | seed spread | gain over SFT | gain > spread "
             "| held-out pair accuracy |", "|---|---|---|---|---|---|---|"]
    for r in result["table"]:
        seeds = ", ".join(f"{a:.3f}" for a in r["per_seed"])
        beats = {None: "", True: "yes", False: "no"}[r["beats_sft_by_more_than_spread"]]
        pairs = ", ".join(f"{a:.3f}" for a in r["heldout_pair_accuracy"] if a is not None)
        lines.append(f"| {r['stage']} | {r['heldout_accuracy_mean']:.3f} | {seeds} | {r['seed_spread']:.3f} | "
                     f"{r['gain_over_sft']:+.3f} | {beats} | {pairs} |")
    return "\n".join(lines)


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".jsonl"), "a") as f:
        f.write(json.dumps(result) + "\n")

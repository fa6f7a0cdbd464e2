"""Pruned vs unpruned, measured: a tiny run trained on the embedded default (or --run), the same trained --steps
more (the fair baseline), pruned (half the heads and MLP channels, one layer of four; Minitron's activation
importance, ShortGPT's layer influence), pruned and recovered by --steps of distillation from the unpruned run, and
that int8: parameters, weight bytes, greedy decode tokens/s at batch 1 and 16, held-out bits per byte.

    python scripts/bench_prune.py [--run RUN] [--teacher-steps 300] [--steps 100] [--out FILE]

Prints one JSON line (minigpt/apps/compress_bench.py does the work)."""

import argparse
import tempfile
from pathlib import Path

from minigpt.apps.compress_bench import PRUNE, emit, prune_rows, train_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a trained run to prune (default: train tiny on the embedded default)")
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=100, help="recovery (and baseline) steps")
    ap.add_argument("--out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = Path(args.run) if args.run else train_run(root / "teacher", args.teacher_steps, {})
        rows = prune_rows(root, teacher, args.steps, {})
    emit({"bench": "prune", "pruned": PRUNE, "recovery_steps": args.steps, "rows": rows,
          "convention": "measured here: bits per byte by minigpt eval on the teacher's held-out split; decode greedy "
                        "tokens/s (median of 3) at batch 1 and 16 on this CPU"}, args.out)


if __name__ == "__main__":
    main()

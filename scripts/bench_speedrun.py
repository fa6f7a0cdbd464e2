"""The CPU speedrun: recipes trained for a fixed wall-clock budget, scored in validation bits per byte;
one JSON line (minigpt/apps/speedrun.py says how).

    python scripts/bench_speedrun.py [--budget 120] [--seeds 1337,1338] [--recipes tiny,modern+muon]
                                     [--eval-iters 40] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from minigpt.apps.speedrun import RECIPES, speedrun
from minigpt.core.device import busy_cores, device_name
from minigpt.core.progress import note


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=120.0, help="seconds of training per run (compile counted)")
    p.add_argument("--seeds", default="1337,1338")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--eval-iters", type=int, default=40, help="validation micro-batches of 32 x 128 tokens")
    p.add_argument("--set", action="append", default=[], help="an override for every recipe, e.g. train.lr=3e-3")
    args = p.parse_args()
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        print(f"error: unknown recipe {unknown[0]!r}; choose from {', '.join(RECIPES)}", file=sys.stderr)
        sys.exit(2)
    busy, how = busy_cores()
    with tempfile.TemporaryDirectory() as tmp:
        note(f"bench_speedrun: {len(recipes)} recipes x seeds {args.seeds}, {args.budget:g} s of training each; a line "
             f"per training, the result one JSON line on stdout")
        result = speedrun(Path(tmp), recipes, [int(s) for s in args.seeds.split(",")], args.budget, args.eval_iters,
                          args.set)
    print(json.dumps({"bench": "speedrun", "budget_s": args.budget, "eval_iters": args.eval_iters,
                      "device_name": device_name(torch.device("cpu")), "cpu_cores": os.cpu_count(),
                      "threads": torch.get_num_threads(), "busy_cores_before": busy, "load_source": how,
                      "torch": torch.__version__, **result}))


if __name__ == "__main__":
    main()

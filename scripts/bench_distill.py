"""A student distilled from a teacher run beside the same student trained from scratch on the same tokens;
one JSON line (minigpt/apps/distill_bench.py says how).

    python scripts/bench_distill.py --teacher RUN [--steps 300] [--seeds 1337,1338] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from minigpt.apps.distill_bench import STUDENT, compare
from minigpt.core.device import busy_cores, device_name
from minigpt.core.errors import UserError
from minigpt.core.progress import note


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", default="1337,1338")
    p.add_argument("--eval-iters", type=int, default=40)
    p.add_argument("--set", action="append", default=[], help="an override for both students, e.g. train.lr=3e-3")
    args = p.parse_args()
    busy, how = busy_cores()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            note(f"bench_distill: students from scratch and distilled from {args.teacher}, {args.steps} steps per seed "
                 f"{args.seeds}; a line per training, the result one JSON line on stdout")
            rows = compare(Path(tmp), args.teacher, args.steps, [int(s) for s in args.seeds.split(",")],
                           args.eval_iters, args.set)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"bench": "distill", "teacher": args.teacher, "student": STUDENT + args.set, "steps": args.steps,
                      "device_name": device_name(torch.device("cpu")), "cpu_cores": os.cpu_count(),
                      "threads": torch.get_num_threads(), "busy_cores_before": busy, "load_source": how,
                      "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()

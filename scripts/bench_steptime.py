"""The step-time model's prediction beside a measured `minigpt train` step on this CPU, one JSON line
(minigpt/apps/steptime_check.py says how).

    python scripts/bench_steptime.py [--steps 12] [--shapes tiny,wide] [--dp 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from minigpt.apps.steptime_check import SHAPES, check_data_parallel, check_shape
from minigpt.core.device import busy_cores, device_name
from minigpt.core.progress import note
from minigpt.measure.bench import matmul_tflops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="training steps measured per shape (the first 2 left out)")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--dp", type=int, default=2, help="also the tiny preset on this many gloo ranks under torchrun "
                                                    "(DDP); 0: skip")
    args = p.parse_args()
    shapes = args.shapes.split(",")
    if any(s not in SHAPES for s in shapes) or args.steps < 5:
        print(f"error: --shapes from {', '.join(SHAPES)}; --steps at least 5", file=sys.stderr)
        sys.exit(2)
    busy, how = busy_cores()
    peak = matmul_tflops(torch.device("cpu"), torch.float32, 1024, 10)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for i, s in enumerate(shapes):
            note(f"bench_steptime: {i + 1}/{len(shapes)} {s}: a {args.steps}-step minigpt train run, timed")
            rows.append(check_shape(s, Path(tmp), args.steps, peak))
        if args.dp > 1:
            rows.append(check_data_parallel(Path(tmp), args.steps, args.dp))
    print(json.dumps({"bench": "steptime_cpu", "device_name": device_name(torch.device("cpu")),
                      "cpu_cores": os.cpu_count(), "threads": torch.get_num_threads(), "busy_cores_before": busy,
                      "load_source": how, "torch": torch.__version__, "peak_tflops_fp32": round(peak, 4),
                      "steps": args.steps, "shapes": rows}))


if __name__ == "__main__":
    main()

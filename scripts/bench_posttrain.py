"""The post-training pipeline on the synthetic addition task, two seeds: held-out accuracy after SFT, the reward
model (pair accuracy), DPO, GRPO and an SFT-continued control; one JSON line (minigpt/apps/posttrain_bench.py says
how), also appended to OUT.jsonl with the table in OUT.md.

    python scripts/bench_posttrain.py --base runs/tiny [--task tasks/add] [--seeds 1337,1338] [--sft-steps N]
        [--demonstrations N] [--out benchmarks/bench_posttrain_cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from minigpt.apps.posttrain_bench import markdown, pipeline, table, write
from minigpt.core.device import busy_cores, device_name
from minigpt.core.errors import UserError
from minigpt.data.task import write_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the pre-trained run (e.g. minigpt train --config tiny)")
    p.add_argument("--task", help="a task folder (default: minigpt task's, seed 0, written to a temporary folder)")
    p.add_argument("--seeds", default="1337,1338")
    p.add_argument("--heldout", type=int, default=990, help="held-out problems scored (default 990: all of them)")
    p.add_argument("--sft-steps", type=int, help="SFT's train.max_steps (default: the sft-tiny preset's)")
    p.add_argument("--demonstrations", type=int, help="without --task: train problems with a worked answer for SFT "
                   "(minigpt task --demonstrations; default all); RL prompts and pairs keep every train problem, and "
                   "the later stages take posttrain_bench.SCARCE's settings")
    p.add_argument("--out", help="append the JSON line to OUT.jsonl and write the table to OUT.md")
    args = p.parse_args()
    busy, how = busy_cores()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            task = args.task or str(Path(tmp) / "task")
            if not args.task:
                write_task(task, demonstrations=args.demonstrations)
            rows = [r for s in args.seeds.split(",")
                    for r in pipeline(Path(tmp), args.base, task, int(s), args.heldout, args.sft_steps,
                                      scarce=bool(args.demonstrations))]
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    default_task = "minigpt task (seed 0, 2 digits" + (f", {args.demonstrations} demonstrations)" if args.demonstrations else ")")
    result = {"bench": "posttrain", "base": args.base, "task": args.task or default_task,
              "heldout_problems": args.heldout, "sft_steps": args.sft_steps,
              "demonstrations": args.demonstrations, "device_name": device_name(torch.device("cpu")),
              "cpu_cores": os.cpu_count(), "threads": torch.get_num_threads(), "busy_cores_before": busy,
              "load_source": how, "torch": torch.__version__, "rows": rows, "table": table(rows)}
    if args.out:
        write(result, Path(args.out))
        Path(args.out).with_suffix(".md").write_text(markdown(result) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

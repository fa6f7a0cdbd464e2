"""Time training steps under DDP and each DeepSpeed ZeRO stage at the same config and world size.

    python scripts/bench_zero.py [--config tiny] [--nproc 2] [--steps 12] [--set k=v ...]

Each setting is a real `torchrun -m minigpt.train` run; ms/step is the median of the logged steps
after the first two (warm-up). Prints one JSON line per setting, with the ratio to DDP.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from minigpt.core.device import device_name
from minigpt.core.progress import note

SETTINGS = [
    ("ddp", []),
    ("zero0", ["train.backend=deepspeed", "train.zero_stage=0"]),
    ("zero1", ["train.backend=deepspeed", "train.zero_stage=1"]),
    ("zero2", ["train.backend=deepspeed", "train.zero_stage=2"]),
    ("zero3", ["train.backend=deepspeed", "train.zero_stage=3"]),
    ("zero2+offload_opt", ["train.backend=deepspeed", "train.zero_stage=2", "train.offload_optimizer=true"]),
    ("zero3+offload_all", ["train.backend=deepspeed", "train.zero_stage=3", "train.offload_optimizer=true",
                           "train.offload_params=true"]),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--only", help="comma-separated setting names")
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    ddp_ms = None
    wanted = set(args.only.split(",")) if args.only else None
    for i, (name, sets) in enumerate(SETTINGS):
        note(f"bench_zero: {i + 1}/{len(SETTINGS)} {name}: a torchrun training run")
        if wanted and name not in wanted:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            common = [f"train.out_dir={tmp}/run", f"train.max_steps={args.steps}", "train.eval_every=0",
                      "train.checkpoint_every=0", "train.report=false", "train.sample_every=0", "train.log_every=1",
                      "train.eval_iters=1", "train.batch_size_tokens=0"]  # one micro-batch per rank
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   "-m", "minigpt", "train", "--config", args.config,
                   *[a for s in common + args.set + sets for a in ("--set", s)]]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode != 0:
                errors = [l for l in r.stderr.splitlines() if l.startswith("error:")] or r.stderr.strip().splitlines()[-1:]
                print(json.dumps({"bench": "zero", "setting": name, "error": errors[0][:300]}))
                continue
            recs = [json.loads(l) for l in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines() if '"ms_per_step"' in l]
            ms = statistics.median(r["ms_per_step"] for r in recs[2:])
            tokens = recs[0]["tokens_per_s"] * recs[0]["ms_per_step"] / 1e3
        if name == "ddp":
            ddp_ms = ms
        print(json.dumps({
            "bench": "zero", "setting": name, "config": args.config, "overrides": args.set, "nproc": args.nproc,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "device_name": device_name(
                torch.device("cuda" if torch.cuda.is_available() else "cpu")),
            "torch": torch.__version__, "ms_per_step": round(ms, 2), "tokens_per_s": round(tokens / ms * 1e3, 1),
            "ratio_to_ddp": round(ms / ddp_ms, 3) if ddp_ms else None,
        }), flush=True)


if __name__ == "__main__":
    main()

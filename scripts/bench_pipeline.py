"""The pipeline bubble on real ranks (gloo, one thread each) beside (p-1)/(v m + p-1); one JSON line.

    python scripts/bench_pipeline.py [--ranks 2] [--micro-batches 1,2,4,8,16] [--steps 5]
                                     [--schedules gpipe,1f1b,interleaved-1f1b,zbv]

For each schedule and micro-batch count m every rank times whole optimizer steps of the package's
pipeline (minigpt/measure/bubble.py), then its own chunks' forward and backward of m micro-batches
alone: idle fraction = 1 - busy / step, per rank, beside the formula (none for ZB-V). The model: 4
layers x 256 wide, block 128, micro-batch 4, vocabulary 512 (a small head, so the stages are nearly
equal). Medians over --steps; the machine's load is recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch
import torch.multiprocessing as mp

from minigpt.core.config import ModelConfig
from minigpt.core.device import busy_cores, device_name
from minigpt.core.progress import note
from minigpt.measure.bubble import run_rank


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--micro-batches", default="1,2,4,8,16")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--schedules", default="gpipe,1f1b,interleaved-1f1b,zbv")
    args = p.parse_args()
    c = ModelConfig(n_layer=4, n_head=4, n_embd=256, block_size=128, vocab_size=512, tie_embeddings=False, bias=False)
    ms = [int(m) for m in args.micro_batches.split(",")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    busy, how = busy_cores()
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    note(f"bench_pipeline: {args.ranks} gloo ranks time schedules {args.schedules} at micro-batches {ms}, "
         f"{args.steps} steps each; the result is one JSON line on stdout")
    mp.start_processes(run_rank, args=(args.ranks, port, c, args.schedules.split(","), ms, 4, args.steps, results),
                       nprocs=args.ranks, start_method="spawn")
    rows = [r for _ in range(args.ranks) for r in results.get()]
    table = {}
    for r in rows:
        key = (r["schedule"], r["m"])
        t = table.setdefault(key, {"schedule": r["schedule"], "m": r["m"], "stages_per_rank": r["stages_per_rank"],
                                   "formula": r["formula"], "idle_per_rank": {}, "step_s_per_rank": {}})
        t["idle_per_rank"][r["rank"]] = round(r["idle_fraction"], 4)
        t["step_s_per_rank"][r["rank"]] = round(r["step_s"], 4)
    for t in table.values():
        t["idle_mean"] = round(sum(t["idle_per_rank"].values()) / len(t["idle_per_rank"]), 4)
        t["measured_over_formula"] = round(t["idle_mean"] / t["formula"], 3) if t["formula"] else None
    print(json.dumps({
        "bench": "pipeline_bubble", "ranks": args.ranks, "steps": args.steps, "micro_batch": 4,
        "model": "4 layers x 256, block 128, vocab 512, fp32", "device_name": device_name(torch.device("cpu")),
        "cpu_cores": os.cpu_count(), "busy_cores_before": busy, "load_source": how, "python": sys.version.split()[0],
        "torch": torch.__version__,
        "convention": "idle fraction = 1 - (the rank's chunks' forward+backward of m micro-batches alone) / (the "
                      "pipelined optimizer step), medians; formula (p-1)/(v*m+p-1) (Narayanan et al. 2021), none for "
                      "ZB-V; measured idle includes point-to-point sends, schedule overhead, unequal stages",
        "rows": sorted(table.values(), key=lambda t: (t["schedule"], t["m"])),
    }))


if __name__ == "__main__":
    main()

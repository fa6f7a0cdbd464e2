"""Decode speed of a preset (random weights) or a run: eager vs compiled, beside the bandwidth bound.

    python scripts/bench_generate.py [--config tiny | --run DIR] [--batch 1 --batch 8] [--device cpu]

One JSON line per (compiled, batch): decode tokens/s (all rows together), ms per decode step,
prefill ms, and the memory-bandwidth bound of a step (weights + the batch's KV cache read once,
over this device's measured copy bandwidth) with the fraction of it reached. The KV cache is
static and the decode step compiles to one graph (CUDA graphs on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from minigpt.core.config import load_config, resolve_preset
from minigpt.core.device import device_name, resolve_device
from minigpt.core.progress import note
from minigpt.measure.bench import bench_decode, bench_hardware
from minigpt.nn.model import GPT
from minigpt.nn.optim import DTYPES
from minigpt.run.load import load_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--run", help="a run directory (its weights) instead of a preset with random weights")
    p.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 8)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    if args.run:
        model = load_run(args.run, device)[0]
    else:
        torch.manual_seed(0)
        model = GPT(load_config(resolve_preset(args.config)).model).to(device).eval()
    model.to(DTYPES[args.dtype])
    note(f"bench_generate: the copy bandwidth, then decode at batch {args.batch or [1, 8]}, eager and compiled "
         f"(compiling takes a while); the result is one JSON line on stdout")
    hw = bench_hardware(str(device), dtypes=["fp32"])
    rows = bench_decode(model, args.batch or [1, 8], args.prompt_tokens, args.new_tokens, [False, True],
                        hw["copy_bandwidth_gbs"])
    print(json.dumps({"bench": "decode", "config": args.run or args.config, "device": str(device),
                      "device_name": device_name(device), "cpu_cores": os.cpu_count(),
                      "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": args.dtype,
                      "copy_bandwidth_gbs": hw["copy_bandwidth_gbs"], "rows": rows,
                      "bound_convention": "weights + KV cache at the mean context read once per step / measured copy "
                                          "bandwidth"}))


if __name__ == "__main__":
    main()

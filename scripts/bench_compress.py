"""A run in full precision and weight-only quantized (int8, int4), side by side in one process: weight bytes,
decode tokens/s at batch 1 and 8, validation loss and bits per byte, logits' error and greedy-token agreement;
one JSON line (minigpt/measure/compress.py says how).

    python scripts/bench_compress.py --run RUN [--rounds 3] [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from minigpt.core.device import busy_cores, device_name
from minigpt.core.errors import UserError
from minigpt.core.progress import note
from minigpt.measure.compress import compare
from minigpt.run.load import load_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=48)
    args = p.parse_args()
    try:
        model, tokenizer, cfg, step = load_run(args.run)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    busy, how = busy_cores()
    note(f"bench_compress: {args.run} in fp32, int8 and int4: weight bytes, decode speed ({args.rounds} rounds of "
         f"{args.new_tokens} tokens), validation bpb; the result is one JSON line on stdout")
    rows = compare(args.run, model, tokenizer, cfg, new_tokens=args.new_tokens, rounds=args.rounds)
    print(json.dumps({"bench": "compress", "run": args.run, "step": step, "params": model.num_params(),
                      "device_name": device_name(torch.device("cpu")), "cpu_cores": os.cpu_count(),
                      "threads": torch.get_num_threads(), "busy_cores_before": busy, "load_source": how,
                      "torch": torch.__version__, "rounds": args.rounds, "new_tokens": args.new_tokens, "rows": rows}))


if __name__ == "__main__":
    main()

"""torch's dense fp32 Linear against the weight packed once by oneDNN (what `minigpt serve` runs on a CPU), one JSON
line (minigpt/measure/bench.linear_kernels says how).

Shapes: a model's four block Linears (n_embd -> 3 n_embd, n_embd -> n_embd, n_embd -> 4 n_embd, 4 n_embd -> n_embd) and
its head (n_embd -> vocab_size), at batches of rows from one (decoding alone) to a prompt's chunk; one torch thread
unless --threads says otherwise. Appends the line to --out.

    python scripts/bench_linear.py [--n-embd 384] [--vocab-size 2048] [--rows 1,4,16,64,256]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from minigpt.core.device import busy_cores, device_name
from minigpt.measure.bench import linear_kernels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-embd", type=int, default=384)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--rows", default="1,4,16,64,256")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/bench_linear_cpu.jsonl")
    args = p.parse_args()
    try:
        rows = [int(r) for r in args.rows.split(",")]
        if min(rows) < 1 or args.n_embd < 1 or args.vocab_size < 1 or args.threads < 1:
            raise ValueError
    except ValueError:
        print("error: give --rows as positive whole numbers R,R,.. and positive --n-embd, --vocab-size, --threads",
              file=sys.stderr)
        sys.exit(2)
    if not torch.backends.mkldnn.is_available():
        print("error: this torch build has no oneDNN (torch.backends.mkldnn): nothing to compare", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(args.threads)
    h = args.n_embd
    busy, how = busy_cores()
    points = linear_kernels([(h, 3 * h), (h, h), (h, 4 * h), (4 * h, h), (h, args.vocab_size)], rows)
    line = {"bench": "linear_kernels", "device_name": device_name(torch.device("cpu")), "cpu_cores": os.cpu_count(),
            "threads": args.threads, "busy_cores_before": busy, "load_source": how, "torch": torch.__version__,
            "points": points,
            "convention": "measured: seconds per call, best of 3 medians of 200 calls, fp32, no autograd; dense = "
                          "F.linear (this build's BLAS), packed = mkldnn._linear_pointwise on a weight reordered once"}
    print(json.dumps(line))
    with Path(args.out).open("a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()

"""minigpt serve against `transformers serve --continuous-batching` on the same weights, one JSON line
(minigpt/measure/serve_peer.py says how).

The run is exported with `minigpt convert --to-hf` (into <run>/hf-export unless --export names one); each server gets
one torch thread on core --server-cpu, the client another core. Loads: --concurrency streams at once, 1 at a time,
and (when the context allows) the same load with every prompt starting with one --shared-prefix-token prefix, which
minigpt also serves without its prefix cache to show what the cache gives. Appends the line to --out and writes
the table beside it (.md).

    python scripts/bench_serve_peer.py --run runs/serve-6x384 [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from minigpt.core.errors import UserError


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--export", default="", help="its convert --to-hf folder (default <run>/hf-export, made if absent)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=30)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--shared-prefix-tokens", type=int, default=256)
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both servers run (fp32 weights)")
    p.add_argument("--port", type=int, default=8470)
    p.add_argument("--out", default="benchmarks/bench_serve_peer_cpu.jsonl")
    args = p.parse_args()
    try:
        from minigpt.apps.serve_peer import peer_benchmark

        line = peer_benchmark(args, progress=lambda s: print(s, file=sys.stderr, flush=True))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(line))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(line) + "\n")
    out.with_suffix(".md").write_text(line["table"] + "\n")
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


if __name__ == "__main__":
    main()

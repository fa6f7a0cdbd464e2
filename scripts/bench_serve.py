"""Continuous against static batching under the same load, one JSON line (minigpt/measure/serve_bench.py says how).

Starts `minigpt serve --batching static` and `--batching continuous` on one run (same build, two processes, one
torch thread each so the load generator keeps a core), sweeps Poisson arrival rates (interleaved: static then
continuous at each rate), and compares the output throughput each reaches while its median user still decodes at
a per-user speed. Writes the line to --out (appended), the continuous sweep as a `minigpt bench serve` result
(for `minigpt extrapolate --serve --from-serve-bench`) and a plot of both curves.

    python scripts/bench_serve.py --run runs/quickstart [--rates 2,4,8,16,32,0] [--requests 48]
        [--output-tokens 8:96] [--output-dist uniform|exponential] [--output-mean N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from minigpt.analytic.serving import best_at_user_speed
from minigpt.core.device import busy_cores, device_name
from minigpt.core.errors import UserError
from minigpt.core.plots import plot_serve_sweep
from minigpt.measure.bench import all_at_once
from minigpt.measure.serve_bench import Load, check_load, compare_batching

READER = 30.0  # tokens/s per user: a reader's speed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/quickstart")
    p.add_argument("--rates", default="2,4,8,16,32,0", help="arrivals per second (0: all at once)")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--prompt-tokens", default="8:32")
    p.add_argument("--output-tokens", default="8:96")
    p.add_argument("--output-dist", default="uniform", help="uniform or exponential (LO + an exponential draw, capped at HI)")
    p.add_argument("--output-mean", type=float, default=None, help="the exponential's mean (default: the middle of LO:HI)")
    p.add_argument("--out", default="benchmarks/bench_serve_cpu.jsonl")
    args = p.parse_args()
    try:
        span = lambda t: tuple(int(x) for x in t.split(":"))  # noqa: E731
        load = Load(requests=args.requests, concurrency=args.concurrency, prompt_tokens=span(args.prompt_tokens),
                    output_tokens=span(args.output_tokens), output_dist=args.output_dist, output_mean=args.output_mean)
        rates = [float(r) for r in args.rates.split(",")]
        check_load(load)
        if not Path(args.run, "latest.json").is_file():
            raise UserError(f"--run {args.run} is not a run directory: train one, e.g. 'minigpt quickstart'")
    except (ValueError, UserError) as e:
        print(f"error: {e}" if isinstance(e, UserError) else f"error: {e}: give --rates R,R,.. and --prompt-tokens/"
              f"--output-tokens LO:HI", file=sys.stderr)
        sys.exit(2)
    busy, how = busy_cores()
    try:
        print(f"bench serve: {args.run}, static then continuous batching at each of {len(rates)} rates, "
              f"{args.requests} requests each (progress on stderr; the result is one JSON line on stdout)",
              file=sys.stderr, flush=True)
        sweeps = compare_batching(args.run, load, rates, args.max_batch,
                                  progress=lambda line: print(line, file=sys.stderr, flush=True))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # at a reader's speed, and at each per-user speed a static point reached: what continuous gives at >= that speed
    speeds = [READER] + sorted(q["per_user_tokens_per_s"]["p50"] for q in sweeps["static"]["points"] if q["per_user_tokens_per_s"])
    compare = {f"{v:g}": {b: (best_at_user_speed(s["points"], v) or {}).get("output_throughput_tokens_per_s")
                         for b, s in sweeps.items()} for v in speeds}
    for row in compare.values():
        row["continuous_over_static"] = (round(row["continuous"] / row["static"], 3)
                                         if row["continuous"] and row["static"] else None)
    at_once = all_at_once(args.run, load, sweeps, args.max_batch)
    out = Path(args.out)
    line = {"bench": "serve_batching", "run": args.run, "device_name": device_name(torch.device("cpu")),
            "cpu_cores": os.cpu_count(), "server_threads": 1, "busy_cores_before": busy, "load_source": how,
            "max_batch": args.max_batch, "load": sweeps["continuous"]["load"], "rates": rates,
            "output_tokens_per_s_at_per_user_speed": compare, **at_once, "sweeps": sweeps,
            "convention": "output tokens/s (measured) at the highest arrival rate whose median request decoded at >= "
                          "the per-user speed and lost no request; " + sweeps["continuous"]["convention"]}
    print(json.dumps(line))
    with out.open("a") as f:
        f.write(json.dumps(line) + "\n")
    Path(out.with_name("serve_bench_quickstart_cpu.json")).write_text(json.dumps(sweeps["continuous"]) + "\n")
    plot_serve_sweep({f"{b} batching": s["points"] for b, s in sweeps.items()}, str(out.with_suffix(".png")),
                     f"minigpt serve on {line['device_name']} ({args.run}, batch {args.max_batch}, 1 thread)\n"
                     f"Poisson arrivals, {args.requests} requests a rate")


if __name__ == "__main__":
    main()

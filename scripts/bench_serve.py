"""Continuous against static batching under the same load, one JSON line (minigpt/measure/serve_bench.py says how).

Starts three `minigpt serve` processes on one run (one torch thread each so the load generator keeps a core):
`--batching static` with --max-batch rows (each row a whole context), `--batching continuous` with the same rows,
and continuous batching in the static server's KV memory as a paged cache of up to --paged-rows sequences
(`continuous_same_memory`: vLLM's comparison, where a row holds only the blocks its tokens fill); sweeps Poisson
arrival rates (interleaved: each server at each rate in turn), and compares the output throughput each reaches
while its median user still decodes at a per-user speed. Writes the line to --out (appended), the continuous sweep as a `minigpt bench serve` result
(for `minigpt extrapolate --serve --from-serve-bench`) and a plot of both curves.

    python scripts/bench_serve.py --run runs/quickstart [--rates 8,16,32,64,0] [--requests 128] [--concurrency 64]
        [--output-tokens 8:96] [--output-dist uniform|exponential] [--output-mean N] [--paged-rows 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from minigpt.analytic.serving import best_at_user_speed
from minigpt.core.device import busy_cores, device_name, host_speed_us
from minigpt.core.errors import UserError
from minigpt.core.plots import plot_serve_sweep
from minigpt.measure.bench import all_at_once
from minigpt.measure.serve_bench import Load, check_load, compare_batching

READER = 30.0  # tokens/s per user: a reader's speed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/quickstart")
    p.add_argument("--rates", default="8,16,32,64,0", help="arrivals per second (0: all at once)")
    # enough in flight to fill the same-memory server's rows: a load that offers fewer cannot show what it holds
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=8, help="rows of the static and continuous servers")
    p.add_argument("--paged-rows", type=int, default=64, help="rows of the same-memory paged server (at most)")
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
        if min(args.max_batch, args.paged_rows) < 1:
            raise UserError(f"--max-batch {args.max_batch} and --paged-rows {args.paged_rows}: give 1 or more rows")
        if not Path(args.run, "latest.json").is_file():
            raise UserError(f"--run {args.run} is not a run directory: train one, e.g. 'minigpt quickstart'")
    except (ValueError, UserError) as e:
        print(f"error: {e}" if isinstance(e, UserError) else f"error: {e}: give --rates R,R,.. and --prompt-tokens/"
              f"--output-tokens LO:HI", file=sys.stderr)
        sys.exit(2)
    busy, how = busy_cores()
    speed_before = host_speed_us()
    try:
        print(f"bench serve: {args.run}, static, continuous and same-memory paged batching at each of {len(rates)} rates, "
              f"{args.requests} requests each (progress on stderr; the result is one JSON line on stdout)",
              file=sys.stderr, flush=True)
        sweeps = compare_batching(args.run, load, rates, args.max_batch, paged_rows=args.paged_rows,
                                  progress=lambda line: print(line, file=sys.stderr, flush=True))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # at a reader's speed, and at each per-user speed a static point reached: what continuous gives at >= that speed
    speeds = [READER] + sorted(q["per_user_tokens_per_s"]["p50"] for q in sweeps["static"]["points"] if q["per_user_tokens_per_s"])
    compare = {f"{v:g}": {b: (best_at_user_speed(s["points"], v) or {}).get("output_throughput_tokens_per_s")
                         for b, s in sweeps.items()} for v in speeds}
    for row in compare.values():
        for b in ("continuous", "continuous_same_memory"):
            row[f"{b}_over_static"] = round(row[b] / row["static"], 3) if row[b] and row["static"] else None
    speed_after = host_speed_us()
    at_once = all_at_once(args.run, load, sweeps, args.max_batch)
    out = Path(args.out)
    line = {"bench": "serve_batching", "run": args.run, "device_name": device_name(torch.device("cpu")),
            "cpu_cores": os.cpu_count(), "server_threads": 1, "busy_cores_before": busy, "load_source": how,
            # one core's matmul (core/device.host_speed_us) before and after the sweeps: a slowed host shows here
            "host_matmul_us": {"before": speed_before, "after": speed_after},
            "max_batch": args.max_batch, "paged_rows": args.paged_rows,
            "kv_cache_tokens": sweeps["static"]["server"]["kv_cache_tokens"], "load": sweeps["continuous"]["load"], "rates": rates,
            "output_tokens_per_s_at_per_user_speed": compare, **at_once, "sweeps": sweeps,
            "convention": "output tokens/s (measured) at the highest arrival rate whose median request decoded at >= "
                          "the per-user speed and lost no request; " + sweeps["continuous"]["convention"]}
    print(json.dumps(line))
    with out.open("a") as f:
        f.write(json.dumps(line) + "\n")
    Path(out.with_name(f"serve_bench_{Path(args.run).name}_cpu.json")).write_text(json.dumps(sweeps["continuous"]) + "\n")
    plot_serve_sweep({f"{b} batching": s["points"] for b, s in sweeps.items()}, str(out.with_suffix(".png")),
                     f"minigpt serve on {line['device_name']} ({args.run}, batch {args.max_batch}, 1 thread)\n"
                     f"Poisson arrivals, {args.requests} requests a rate")


if __name__ == "__main__":
    main()

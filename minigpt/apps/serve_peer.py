"""scripts/bench_serve_peer.py's work: minigpt serve and `transformers serve --continuous-batching` on one run's
weights, under the same text loads, and the table of their medians (minigpt/measure/serve_peer.py says how)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from minigpt.core.errors import UserError

PEER = "transformers serve"


def peer_benchmark(args, progress=print) -> dict:
    """The JSON line: every server's medians per load, minigpt over the peer, and a markdown table."""
    import torch
    import transformers

    from minigpt.analytic.flops import param_counts
    from minigpt.core.config import config_from_json
    from minigpt.core.device import busy_cores, device_name
    from minigpt.data.sources import stdlib_files
    from minigpt.measure.serve_bench import Load
    from minigpt.measure.serve_peer import compare, servers, text_prompts
    from minigpt.run.load import run_tokenizer

    run = Path(args.run)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here; run it on a GPU machine or leave --device cpu")
    if not (run / "latest.json").is_file():
        raise UserError(f"--run {run} is not a run directory: train one (docs/serve.md shows the 6 x 384 run)")
    cfg, tok = config_from_json(run / "config.json"), run_tokenizer(run)
    export = Path(args.export or run / "hf-export")
    if not (export / "config.json").is_file():
        from minigpt.interop.hf import export_hf

        export_hf(run, export)
    texts = [f.read_text(errors="ignore") for f in stdlib_files()[:30]]
    plain = text_prompts(tok, texts, args.requests, args.prompt_tokens, seed=1)
    out_tokens = (args.output_tokens, args.output_tokens)
    loads = {f"{args.concurrency} concurrent": Load(requests=args.requests, concurrency=args.concurrency, rate=0,
                                                    output_tokens=out_tokens, texts=plain),
             "1 at a time": Load(requests=16, concurrency=1, rate=0, output_tokens=out_tokens, texts=plain[:16])}
    shared = f"{args.concurrency} concurrent, one {args.shared_prefix_tokens}-token prefix"
    if args.shared_prefix_tokens + args.prompt_tokens + args.output_tokens <= cfg.model.block_size:
        loads[shared] = Load(requests=args.requests // 2, concurrency=args.concurrency, rate=0, output_tokens=out_tokens,
                             texts=text_prompts(tok, texts, args.requests // 2, args.prompt_tokens, 2,
                                                args.shared_prefix_tokens))
    flags = {"minigpt serve": []}
    if shared in loads:
        flags["minigpt serve, prefix cache off"] = ["--no-prefix-cache"]
    commands = servers(str(run), str(export), args.port, args.concurrency, flags, args.device)
    which = {name: [k for k in loads if name != "minigpt serve, prefix cache off" or k == shared] for name in commands}
    cpus = set(range(os.cpu_count() or 1)) - {args.server_cpu}
    os.sched_setaffinity(0, cpus or {args.server_cpu})  # the client beside the server, not on its core
    busy, how = busy_cores()
    t0 = time.perf_counter()
    result = compare(commands, loads, which, args.rounds, args.server_cpu, progress)
    line = {"bench": "serve_peer", "run": str(run), "params": param_counts(cfg.model).total,
            "model": {k: getattr(cfg.model, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")},
            "device_name": device_name(torch.device(args.device)), "cpu_cores": os.cpu_count(), "server_threads": 1,
            "server_cpu": args.server_cpu, "busy_cores_before": busy, "load_source": how, "torch": torch.__version__,
            "transformers": transformers.__version__, "rounds": args.rounds, "wall_s": round(time.perf_counter() - t0, 1),
            "loads": {k: {"requests": v.requests, "concurrency": v.concurrency, "prompt_tokens": args.prompt_tokens,
                          "output_tokens": args.output_tokens} for k, v in loads.items()},
            "servers": {k: " ".join(c[1:] if k != PEER else c) for k, (c, _) in commands.items()},
            "results": result, "minigpt_over_peer": ratios(result),
            "convention": "measured; medians over rounds; output tokens/s = all output tokens / wall time; TTFT, TPOT "
                          "and ITL as `vllm bench serve` defines them (minigpt/measure/serve_bench.py); greedy, text "
                          "prompts, fp32 weights, one torch thread per server pinned to one core, both servers on " + args.device}
    line["table"] = table(line)
    return line


def ratios(result: dict) -> dict:
    """minigpt serve over the peer for each load both ran: throughput (higher is better) and TPOT (lower is better)."""
    ours, peer = result["minigpt serve"], result[PEER]
    out = {}
    for load in ours.keys() & peer.keys():
        a, b = ours[load], peer[load]
        out[load] = {"output_tokens_per_s": round(a["output_tokens_per_s"] / b["output_tokens_per_s"], 3),
                     "tpot_p50_peer_over_minigpt": round(b["tpot_ms_p50"] / a["tpot_ms_p50"], 3)
                     if a["tpot_ms_p50"] and b["tpot_ms_p50"] else None,
                     "same_answers": a["answers_sha256"] == b["answers_sha256"]}
    return out


def table(line: dict) -> str:
    head = ("| load | server | output tok/s (median; runs) | TTFT p50 ms | TPOT p50 ms | ITL p50 ms | per-user tok/s p50 "
            "| goodput req/s | prompt tok (mean) |")
    rows = [head, "|---|---|---|---|---|---|---|---|---|"]
    for load in line["loads"]:
        for name, by_load in line["results"].items():
            if load in by_load:
                r = by_load[load]
                runs = ", ".join(f"{x:g}" for x in r["output_tokens_per_s_runs"])
                rows.append(f"| {load} | {name} | {r['output_tokens_per_s']:g} ({runs}) | {r['ttft_ms_p50']} | "
                            f"{r['tpot_ms_p50']} | {r['itl_ms_p50']} | {r['per_user_tokens_per_s_p50']} | "
                            f"{r['goodput_requests_per_s']} | {r['prompt_tokens_mean']} |")
    rows += ["", "| load | minigpt / peer, output tok/s | peer TPOT / minigpt TPOT | same answers |", "|---|---|---|---|"]
    for load, r in line["minigpt_over_peer"].items():
        rows.append(f"| {load} | {r['output_tokens_per_s']} | {r['tpot_p50_peer_over_minigpt']} | {r['same_answers']} |")
    return "\n".join(rows)

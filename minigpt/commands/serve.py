"""The serve command: an OpenAI-compatible HTTP API over a run (infer/serve.py holds the server)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from minigpt.commands.flags import apply_threads, device_arg, number, quantize_flag, threads_flag
from minigpt.core.errors import UserError
from minigpt.core.fmt import fit, to_json


def cmd_serve(args) -> None:
    apply_threads(args)
    try:
        from minigpt.infer.serve import serve
    except ImportError as e:
        raise UserError(f"minigpt serve needs FastAPI and uvicorn ({e}): pip install 'minigpt[serve]'") from None
    from minigpt.infer.serve import Limits

    key = args.api_key if args.api_key is not None else os.environ.get("MINIGPT_API_KEY", "")
    check_api_key(key)
    serve(args.run, args.host, args.port, args.max_batch, args.device, args.quantize or "",
          Limits(api_key=key, max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens_limit,
                 max_queue=args.max_queue, max_n=args.max_n, max_prompt_tokens=args.max_prompt_tokens),
          args.batching, args.drain_seconds, args.draft or "", args.speculate,
          {"prefill_chunk": args.prefill_chunk, "kv_tokens": args.kv_cache_tokens, "prefix_cache": not args.no_prefix_cache})


def check_api_key(key: str) -> None:
    """An API key an HTTP header can carry the same way from every client: printable ASCII, no spaces (clients
    encode other characters differently, so such a key could never match)."""
    if key and not all(33 <= ord(ch) < 127 for ch in key):
        raise UserError("--api-key (or MINIGPT_API_KEY) has a character outside printable ASCII or a space: an "
                        "Authorization header cannot carry it reliably; use letters, digits and punctuation")


def cmd_bench_serve(args) -> None:
    from minigpt.core.atomic import atomic_write_text
    from minigpt.core.plots import check_image_path, plot_serve_sweep
    from minigpt.measure.serve_bench import Load, bench_serve

    key = args.api_key if args.api_key is not None else os.environ.get("MINIGPT_API_KEY", "")
    load = Load(args.url, 0.0, args.arrivals, args.requests, args.concurrency, args.prompt_tokens, args.output_tokens,
                args.output_dist, args.output_mean, args.seed, key, ttft_slo_s=args.ttft_slo_ms / 1e3,
                tpot_slo_s=args.tpot_slo_ms / 1e3)
    if args.out:
        check_image_path(str(Path(args.out).with_suffix(".png")), "--out", make_parents=True)
    result = bench_serve(load, args.rate or [2.0], progress=lambda line: print(line, file=sys.stderr, flush=True))
    if args.out:
        atomic_write_text(Path(args.out), to_json(result) + "\n")
        plot_serve_sweep({result["model"]: result["points"]}, str(Path(args.out).with_suffix(".png")),
                         f"minigpt bench serve: {result['model']} at {args.url}")
    if args.json:
        print(to_json(result))
        return
    for p in result["points"]:
        u, t = p["per_user_tokens_per_s"] or {}, p["ttft_ms"] or {}
        rate = f"{p['rate_requests_per_s']:g} requests/s" if p["rate_requests_per_s"] else "all at once"
        print(f"{rate}: {p['completed']}/{p['requests']} completed, "
              f"{p['output_throughput_tokens_per_s']:,.1f} output tokens/s; per user {u.get('p50', 0):.1f} tokens/s "
              f"(median), {u.get('p10', 0):.1f} (slowest tenth); TTFT p50 {t.get('p50', 0):.0f} ms, p99 {t.get('p99', 0):.0f} "
              f"ms; ITL p50 {(p['itl_ms'] or {}).get('p50', 0):.1f} ms; goodput {p['goodput_requests_per_s']:g} "
              f"requests/s within TTFT {p['goodput_slo']['ttft_ms']:g} ms and TPOT {p['goodput_slo']['tpot_ms']:.1f} ms "
              f"(measured)" + (f"; {p['preemptions']:g} sequences preempted" if p.get("preemptions") else ""))
    print(fit(f"convention: {result['convention']}"))
    if args.out:
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")


def add_parsers(sub) -> None:
    """serve."""
    p = sub.add_parser("serve", parents=[threads_flag(), quantize_flag()], help="an OpenAI-compatible HTTP API for a run "
                       "on a continuously batched engine (/v1/completions, /v1/chat/completions, /health, /metrics)")
    p.add_argument("--run", required=True, help="run directory written by 'minigpt train'")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=number(int, 1, 65535), default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-batch", type=number(int, 1, 1024), default=8,
                   help="sequences decoded together (more wait in a queue; default 8)")
    p.add_argument("--kv-cache-tokens", type=number(int, 1, 1 << 26), default=None,
                   help="the paged KV cache's size in tokens (default: --max-batch whole contexts, so none is ever "
                        "preempted; less holds --max-batch sequences only while their tokens fit, preempting the "
                        "newest when they do not)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: "
                                     "$MINIGPT_API_KEY; none when unset)")
    p.add_argument("--max-body-bytes", type=number(int, 1, 1 << 30), default=1 << 20,
                   help="refuse larger request bodies with 413 (default 1 MiB)")
    p.add_argument("--max-tokens-limit", type=number(int, 1, 1 << 20), default=4096,
                   help="refuse a larger max_tokens with 400 (default 4096)")
    p.add_argument("--max-queue", type=number(int, 0, 1 << 20), default=256,
                   help="requests that may wait beyond the running batch; more get 503 with Retry-After (default 256)")
    p.add_argument("--max-n", type=number(int, 1, 1024), default=16,
                   help="choices a request may ask for (n; never more than --max-batch; default 16)")
    p.add_argument("--max-prompt-tokens", type=number(int, 0, 1 << 24), default=0,
                   help="refuse longer prompts with 400 (default 0: the model's context less one)")
    p.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                   help="continuous (default): a request joins the running batch at the next decode step; static: "
                        "a batch runs to its end before the next starts (to compare)")
    p.add_argument("--drain-seconds", type=number(float, 0, 3600), default=30.0,
                   help="on SIGTERM/SIGINT, how long requests in flight may go on finishing (default 30)")
    p.add_argument("--draft", metavar="RUN", help="a smaller run with the same tokenizer: every decode step becomes a "
                                                  "speculative round for the whole batch")
    p.add_argument("--speculate", type=number(int, 1, 64), default=4, help="with --draft: draft tokens a round (default 4)")
    p.add_argument("--prefill-chunk", type=number(int, 1, 1 << 20), default=256,
                   help="prompt tokens prefilled a step, in the same forward pass as the running decodes (default 256: "
                        "a long prompt delays the others by one chunk a step)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="turn the prefix cache off (on by default: a prompt that starts with 16-token blocks another "
                        "prompt prefilled shares them instead of computing them; they stay cached until their memory "
                        "is wanted)")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu (default), cuda, auto")
    p.set_defaults(func=cmd_serve)

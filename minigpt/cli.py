"""The `minigpt` command: every flag of every subcommand, and a dispatch to the library.

User mistakes (UserError) print one line, `error: ...`, and exit 2; bugs keep their traceback.
torch is imported by the commands that run a model, never at import time: `minigpt extrapolate`,
`minigpt memory --params` and every `--help` stay torch-free (a test checks it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from minigpt.core.errors import UserError, os_error
from minigpt.core.plan import KEYS as PLAN_KEYS, parse_keys

STOP_EXIT = {"SIGTERM": 128 + 15, "SIGINT": 128 + 2}
MAX_NEW_TOKENS = 1 << 20  # tokens one generate call may ask for (past block_size a RoPE model recomputes a window each)
MAX_ROWS = 4096  # sequences decoded together by one generate call (prompts x --num-samples)  # a run stopped by a signal exits like the signal would


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (`error: ...`, exit 2), like every other input."""

    def error(self, message: str):
        sys.stderr.write(f"error: {self.prog}: {message}; see '{self.prog} --help'\n")
        sys.exit(2)


def span_arg(text: str) -> tuple[int, int]:
    """LO:HI (or one number N for N:N), positive integers with LO <= HI."""
    lo, _, hi = text.partition(":")
    try:
        span = (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LO:HI (two integers)") from None
    if not 1 <= span[0] <= span[1]:
        raise argparse.ArgumentTypeError(f"{text}: give 1 <= LO <= HI")
    return span


def number(kind=float, lo=None, hi=None, lo_open=False):
    """An argparse type: a finite number within [lo, hi] (lo excluded with lo_open)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        low_bad = lo is not None and (value <= lo if lo_open else value < lo)
        if value != value or value in (float("inf"), float("-inf")) or low_bad or (hi is not None and value > hi):
            span = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise argparse.ArgumentTypeError(f"{text} must be a finite number in {span}")
        return value
    return parse


def plan_arg(text: str) -> str:
    """--plan: checked by the parser (keys and values), torch-free. `published` (extrapolate): the target's."""
    from minigpt.core.plan import parse_keys

    if text == "published":
        return text
    try:
        parse_keys(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--plan ")) from None
    return text


DEVICE = re.compile(r"auto|cpu|meta|mps|cuda(:\d{1,3})?")


def device_arg(text: str) -> str:
    """--device: a device name torch knows, checked by the parser (torch-free)."""
    if not DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N (meta where counting)")
    return text


def tokens_arg(text: str):
    return text if text == "chinchilla" else number(float, 0, lo_open=True)(text)

# ----------------------------------------------------------------------------------------------
# commands


def to_json(obj) -> str:
    from minigpt.core.fmt import to_json as dumps

    return dumps(obj)


def _threads(args) -> str:
    """Apply --threads (or the default rule) before a command runs torch; what was chosen, for its output."""
    from minigpt.core.device import use_threads

    return use_threads(args.threads)


def _log(args):
    """Where a long command's lines go: stdout, or with --json stderr (stdout then holds the one summary object)."""
    if getattr(args, "json", False):
        return lambda *a, **k: print(*a, **{**k, "file": sys.stderr})
    return print


def cmd_prepare(args) -> None:
    from minigpt.core.config import load_config, resolve_preset
    from minigpt.data import cache as data

    cfg = load_config(resolve_preset(args.config), args.set)
    prepared = data.prepare_data(cfg.data, cfg.model, log=(lambda *a, **k: None) if args.json else print)
    if args.json:
        print(to_json({"event": "prepared", "path": str(prepared.path), **prepared.manifest}))
        return
    for line in prepared.summary_lines():
        print(line)
    print(f"cache    {prepared.path}")


def cmd_train(args) -> int:
    from minigpt.core.resolve import train_config
    from minigpt.train.loop import train

    overrides = list(args.set) + ([f"train.threads={args.threads}"] if args.threads else [])
    if args.plan:  # the plan's [train] keys, after --set (the plan spelling wins over a --set of the same key)
        from minigpt.parallel.registry import plan_overrides

        overrides += plan_overrides(args.plan, int(os.environ.get("WORLD_SIZE", "1")))
    cfg = train_config(args.config, overrides, args.resume)
    summary = train(cfg, resume=bool(args.resume), stop_at=args.stop_at, overwrite=args.overwrite, log=_log(args))
    return STOP_EXIT.get(summary.get("stopped"), 0)


def _quantize(model, args) -> None:
    """--quantize int8|int4: the run's Linears swapped for weight-only quantized ones (nn/quantize.py)."""
    if getattr(args, "quantize", None):
        from minigpt.nn.quantize import quantize_model

        quantize_model(model, args.quantize)


def quantize_flag() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--quantize", choices=("int8", "int4"),
                   help="weight-only quantization of the Linears and LM head (int8 per channel, int4 in groups of 32; CPU)")
    return p


def cmd_generate(args) -> None:
    """Text on stdout (a header between several samples), or with --json one JSON object alone;
    statistics on stderr; --stream prints a single sample's tokens as they come."""
    _threads(args)
    import torch

    from minigpt.core.device import resolve_device
    from minigpt.infer.generate import generate_text
    from minigpt.run.load import load_run

    device = resolve_device(args.device)
    model, tokenizer, cfg, step = load_run(args.run, device, args.step)
    _quantize(model, args)
    sc = cfg.sample
    prompts = _prompts(args, sc.prompt)
    if args.draft:
        return _generate_speculative(args, model, tokenizer, cfg, step, device, prompts)
    rows = [p for p in prompts for _ in range(args.num_samples)]
    if len(rows) > MAX_ROWS:
        raise UserError(f"{len(prompts)} prompt(s) x --num-samples {args.num_samples} is a batch of {len(rows):,} rows; "
                        f"decode at most {MAX_ROWS:,} at once")
    eot = tokenizer.token_to_id(sc.stop_token)
    stream = args.stream and len(rows) == 1 and not args.json and rows[0] != ""
    on_token = _streamer(tokenizer, rows[0], eot) if stream else None
    if args.compile:  # compile (or load from inductor's cache) before the timed run: not counted as decoding
        generate_text(model, tokenizer, rows[:1], eot_id=None, max_new_tokens=2, compile=True, **_sampling(args, sc))
    texts, gen = generate_text(model, tokenizer, rows, eot_id=eot, max_new_tokens=args.max_new_tokens or sc.max_new_tokens,
                               use_cache=not args.no_cache, compile=args.compile, on_token=on_token, **_sampling(args, sc))
    stats = gen.stats()
    record = {"event": "generated", "run": str(args.run), "step": step, "device": str(device),
              "quantize": args.quantize or cfg.model.quantization or "none",
              "threads": torch.get_num_threads(), "compile": args.compile, **stats}
    if args.json:
        samples = [{"prompt": p, "text": t} for p, t in zip(rows, texts)]
        if args.logprobs is not None:
            from minigpt.infer.evaluate import token_logprobs

            for s, ids, new in zip(samples, gen.prompts, gen.new_tokens):  # the prompts as generate encoded them
                lps, tops = token_logprobs(model, ids + new, args.logprobs)
                s["logprobs"] = {"tokens": [tokenizer.decode([t]) for t in new], "token_logprobs": lps[len(ids):],
                                 "top_logprobs": [{tokenizer.decode([k]): v for k, v in (d or {}).items()}
                                                  for d in tops[len(ids):]],
                                 "convention": "natural log of the model's probability (before temperature/top-k)"}
        print(to_json({**record, "samples": samples}))
        return
    if stream:
        print()
    for i, text in enumerate([] if stream else texts):
        if len(texts) > 1:
            print(f"=== sample {i + 1}/{len(texts)} (run {args.run}, step {step}) ===")
        print(text)
    print(f"prefill {stats['prefill_ms']:.1f} ms for {stats['prompt_tokens']} prompt tokens | "
          f"{stats['ms_per_token_step']:.2f} ms per decode step (batch {stats['batch']}) | "
          f"{stats['tokens_per_s']} generated tokens/s | KV cache {'off' if args.no_cache else 'on'}"
          f"{', compiled' if args.compile else ''} | {device} | run {args.run} step {step}"
          + (" | capped at block_size (learned positions stop there)" if stats["capped_at_block_size"] else "")
          + (" | past block_size with a sliding window" if stats["sliding_window_past_block_size"] else ""),
          file=sys.stderr)


def _prompts(args, default: str) -> list[str]:
    """--prompt texts, then --prompt-file contents ('-': stdin), in order; the run's prompt if none."""
    prompts = list(args.prompt)
    for path in args.prompt_file:
        if path == "-":
            prompts.append(sys.stdin.read())
            continue
        try:
            prompts.append(Path(path).read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompt file {path}: {e}; give a UTF-8 text file (or - for stdin)") from None
    return prompts or [default]


def _streamer(tokenizer, prompt: str, eot: int | None):
    """An on_token callback printing one sample's text as it grows, up to end-of-text."""
    from minigpt.infer.generate import IncrementalText

    text, ended = IncrementalText(tokenizer), [False]
    print(prompt, end="", flush=True)

    def on_token(column: list[int]) -> None:
        ended[0] = ended[0] or column[0] == eot
        if not ended[0]:
            print(text.push(column[0])[0], end="", flush=True)

    return on_token


def _sampling(args, sc) -> dict:
    return dict(temperature=sc.temperature if args.temperature is None else args.temperature,
                top_k=sc.top_k if args.top_k is None else args.top_k, top_p=sc.top_p if args.top_p is None else args.top_p,
                seed=sc.seed if args.seed is None else args.seed)


def _generate_speculative(args, target, tokenizer, cfg, step, device, prompts: list[str]) -> None:
    """--draft RUN --speculate K: each prompt decoded speculatively and, side by side, plainly by the
    target alone (same settings), for the speed-up; the text is the speculative output."""
    from minigpt.apps.speculative import compare_speculative

    for i, r in enumerate(compare_speculative(target, tokenizer, cfg, device, args.draft, prompts, args.speculate,
                                              args.max_new_tokens or cfg.sample.max_new_tokens, _sampling(args, cfg.sample))):
        print(f"=== sample {i + 1} (target {args.run} step {step}, draft {args.draft} step {r['draft_step']}, "
              f"K={args.speculate}) ===")
        print(r["text"])
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "n/a"
        print(f"acceptance {r['acceptance_rate']:.1%} of {r['drafted']} drafted tokens | {r['tokens_per_target_forward']:.2f} "
              f"tokens per target forward | {r['tokens_per_s']} tokens/s vs {r['plain_tokens_per_s']} plain "
              f"(target alone, same settings, measured just before): speed-up {speedup} | {device}", file=sys.stderr)
        record = {k: v for k, v in r.items() if k not in ("prompt", "text", "draft_step")}
        print(to_json({"event": "speculative", "target": str(args.run), "draft": str(args.draft), "k": args.speculate,
                       **record}))


def cmd_eval(args) -> None:
    """Loss, perplexity and bits per byte of a run on a text (or its own split), with the window said."""
    _threads(args)
    from minigpt.core.device import resolve_device
    from minigpt.infer.evaluate import SPLITS, evaluate_text, run_split_tokens, text_tokens
    from minigpt.run.load import load_run

    if args.tasks and args.quantize:
        raise UserError("--quantize scores --data with a quantized model; lm-eval tasks (--tasks) load the run themselves "
                        "in full precision: drop one of them")
    if args.tasks:
        return _eval_tasks(args)
    if not args.data:
        raise UserError("minigpt eval needs --data SOURCE (text to score) or --tasks T1,T2 (lm-eval tasks)")
    device = resolve_device(args.device)
    model, tokenizer, cfg, step = load_run(args.run, device)
    _quantize(model, args)
    if args.data in SPLITS:
        tokens, what = run_split_tokens(args.run, cfg, args.data, args.max_tokens), f"the run's {args.data} split"
    else:
        tokens, docs = text_tokens(args.data, tokenizer, args.max_tokens)
        what = f"{args.data} ({docs:,} documents)"
    r = evaluate_text(model, tokenizer, tokens, args.context, args.stride, args.batch_size, show=not args.json)
    record = {"event": "eval", "run": str(args.run), "step": step, "data": args.data, "device": str(device),
              "quantize": args.quantize or cfg.model.quantization or "none", **r}
    if args.json:
        print(to_json(record))
        return
    print(f"eval {args.run} (step {step}) on {what}: {r['tokens_scored']:,} tokens = {r['bytes_scored']:,} bytes scored "
          f"with a {r['context_tokens']}-token window advancing {r['stride_tokens']} (at least {r['min_history_tokens']} "
          f"tokens of history)")
    print(f"loss {r['loss_nats_per_token']:.4f} nats/token | perplexity {r['perplexity']:.2f} | "
          f"{r['bits_per_byte']:.4f} bits/byte (comparable across tokenizers)")


def _eval_tasks(args) -> None:
    """--tasks: lm-evaluation-harness tasks on the run (the eval extra)."""
    try:
        from minigpt.infer.harness import evaluate_tasks
    except ImportError as e:
        raise UserError(f"minigpt eval --tasks needs lm-evaluation-harness ({e}): pip install 'minigpt[eval]'") from None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = evaluate_tasks(args.run, tasks, args.include_path, args.device, args.batch_size, args.limit, args.output)
    if args.json:
        print(to_json({"event": "eval_tasks", "run": str(args.run), "results": results["results"]}))
        return
    for task, metrics in results["results"].items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        print(f"{task}: {shown}")
    if args.output:
        print(f"results written under {args.output} (lm-eval's layout)")


def cmd_quickstart(args) -> int:
    """The main job on the embedded default: prepare stdlib text, train the tiny model, sample."""
    from minigpt.apps.quickstart import quickstart

    threads = [f"train.threads={args.threads}"] if args.threads else []
    summary = quickstart(args.config, [*args.set, *threads], args.out_dir, log=_log(args))
    return STOP_EXIT.get(summary.get("stopped"), 0)


def _config(args):
    from minigpt.core.resolve import model_config

    return model_config(args.config, args.set)


def cmd_convert(args) -> None:
    _threads(args)
    from minigpt.interop.hf import export_hf, import_hf

    if args.quantize_run or args.quantize:
        if not (args.quantize_run and args.quantize):
            raise UserError("minigpt convert --quantize-run RUN --quantize int8|int4 --out DIR: give both")
        from minigpt.apps.quantized_run import save_quantized_run

        info = save_quantized_run(args.quantize_run, args.quantize, args.out)
        print(f"wrote run directory {args.out}: {args.quantize_run} (step {info['step']}) with {args.quantize} weights, "
              f"{info['total_bytes']:,} bytes of weights; try: minigpt generate --run {args.out} --prompt \"...\"")
    elif args.from_hf:
        info = import_hf(args.from_hf, args.out)
        print(f"wrote run directory {args.out}: {info['model_type']} ({info['params']:,} parameters) from {args.from_hf}; "
              f"try: minigpt generate --run {args.out} --prompt \"...\"")
    else:
        info = export_hf(args.to_hf, args.out)
        print(f"wrote {args.out}: {info['architectures'][0]} from {args.to_hf} (step {info['step']}); it loads with "
              f"transformers.AutoModelForCausalLM.from_pretrained({str(args.out)!r})")


def cmd_plot(args) -> None:
    from minigpt.core.plots import check_image_path, plot_runs

    check_image_path(args.out)
    runs = plot_runs(args.runs, args.out)
    print(f"wrote {args.out}: loss against tokens seen and wall time for {', '.join(r['name'] for r in runs)}")


def cmd_flops(args) -> None:
    _threads(args)
    from minigpt.analytic.report import flops_table
    from minigpt.measure.counted import flops_report

    cfg = _config(args)
    r = flops_report(cfg.model, args.batch_size, args.seq_len or cfg.model.block_size, device=args.device)
    print(to_json(r) if args.json else flops_table(r))


def cmd_flops_sweep(args) -> None:
    _threads(args)
    from minigpt.measure.sweep import run_sweep

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file: the sweep writes a folder (sweep.json, .md, .png); give a folder")
    run_sweep(args.out, device=args.device, steps=args.steps, include_gpt3=not args.no_gpt3)
    print(f"wrote {args.out}/sweep.json, sweep.md, sweep.png")


def cmd_memory(args) -> None:
    from minigpt.analytic import memory as M
    from minigpt.analytic.report import deepspeed_estimate_lines, memory_table, per_rank_memory_table, zero_stage_lines

    if args.run:  # what a run measured on every rank
        path = Path(args.run) / "memory_per_rank.json"
        if not path.is_file():
            raise UserError(f"{path} does not exist: only runs with train.backend = 'deepspeed' record per-rank memory")
        from minigpt.core.config import read_json

        table = read_json(path, "per-rank memory")
        print(to_json(table) if args.json else per_rank_memory_table(table))
        return
    if args.params is not None:  # quick what-if from a bare parameter count
        precision = args.precision or "bf16"
        table = M.zero_table(args.params, precision, args.dp)
        ds = M.deepspeed_estimates(args.params, args.dp)
        if args.json:
            print(to_json({"params_total": args.params, "dp": args.dp, "precision": precision, "zero": table,
                           "deepspeed_estimator_bytes": ds}))
            return
        print(f"model states per GPU for {args.params:.4g} parameters, {precision}, dp={args.dp} (ZeRO paper layout):")
        print("\n".join(zero_stage_lines(table)))
        print("\n".join(deepspeed_estimate_lines(table, ds)))
        return
    import torch

    from minigpt.core.device import resolve_precision

    _threads(args)
    from minigpt.measure.counted import memory_report

    cfg = _config(args)
    precision = args.precision or resolve_precision(cfg.train.precision, torch.device(args.device))
    r = memory_report(cfg.model, args.batch_size or cfg.train.micro_batch_size, args.seq_len or cfg.model.block_size,
                      precision, device=args.device, fake=args.fake, dp=args.dp, recompute=args.recompute)
    print(to_json(r) if args.json else memory_table(r))


def cmd_bench_decode(args) -> None:
    _threads(args)
    import torch

    from minigpt.apps.decode_bench import decode_bench
    from minigpt.core.device import resolve_device
    from minigpt.nn.model import GPT
    from minigpt.run.load import load_run

    device = resolve_device(args.device)
    if args.run:
        model = load_run(args.run, device)[0]
    else:
        from minigpt.analytic.memory import model_bytes
        from minigpt.core.device import check_fits

        c = _config(args).model
        check_fits(model_bytes(c), device, f"a model of {c.n_layer} layers x {c.n_embd}", "benchmark a smaller config")
        torch.manual_seed(0)
        model = GPT(c).to(device).eval()
    _quantize(model, args)
    result = decode_bench(model, args.run or args.config, device, args.dtype, args.batch or [1, 2, 4, 8, 16, 32],
                          args.context, args.new_tokens, args.compile, args.out)
    for r in result["rows"]:
        print(f"context {r['context']:>5} batch {r['batch']:>4}: {r['decode_tokens_per_s_total']:>10,.1f} tokens/s total, "
              f"{r['decode_tokens_per_s_per_sequence']:>8,.1f} per sequence, {r['ms_per_token']:.2f} ms/token; "
              f"{r['fraction_of_bandwidth_bound']:.1%} of the bandwidth bound; prefill {r['prefill_tokens_per_s']:,.0f} tokens/s")
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")


def cmd_serve(args) -> None:
    _threads(args)
    try:
        from minigpt.infer.serve import serve
    except ImportError as e:
        raise UserError(f"minigpt serve needs FastAPI and uvicorn ({e}): pip install 'minigpt[serve]'") from None
    from minigpt.infer.serve import Limits

    key = args.api_key if args.api_key is not None else os.environ.get("MINIGPT_API_KEY", "")
    serve(args.run, args.host, args.port, args.max_batch, args.device, args.quantize or "",
          Limits(api_key=key, max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens_limit,
                 max_queue=args.max_queue, max_n=args.max_n, max_prompt_tokens=args.max_prompt_tokens),
          args.batching, args.drain_seconds, args.draft or "", args.speculate)


def cmd_simulate(args) -> None:
    from minigpt.analytic.report import simulate_table
    from minigpt.core.hardware import gpu_by_name
    from minigpt.core.plan import ParallelPlan
    from minigpt.measure.simulate import SimSpec, simulate

    cfg = _config(args)
    keys = parse_keys(args.plan)
    if "dp" not in keys and args.world is None:
        raise UserError("simulate needs the data-parallel degree: give dp in --plan (e.g. --plan dp=64,tp=8,zero=3) or "
                        "--world N (dp = N / (tp x pp))")
    keys.setdefault("zero", 3)
    spec = SimSpec(ParallelPlan.from_keys(keys, args.world), args.precision, args.reduce_precision or "",
                   args.micro_batch, args.seq_len, args.recompute, args.micro_batches)
    r = simulate(cfg.model, spec, gpu_by_name(args.gpu), args.mfu)
    print(to_json(r) if args.json else simulate_table(r))


def cmd_bench_serve(args) -> None:
    from minigpt.core.atomic import atomic_write_text
    from minigpt.core.plots import check_image_path, plot_serve_sweep
    from minigpt.measure.serve_bench import Load, bench_serve

    key = args.api_key if args.api_key is not None else os.environ.get("MINIGPT_API_KEY", "")
    load = Load(args.url, 0.0, args.arrivals, args.requests, args.concurrency, args.prompt_tokens, args.output_tokens,
                args.seed, key)
    if args.out:
        check_image_path(str(Path(args.out).with_suffix(".png")), "--out", make_parents=True)
    result = bench_serve(load, args.rate or [2.0])
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
              f"ms (measured)")
    print(f"convention: {result['convention']}")
    if args.out:
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")


def cmd_bench_collectives(args) -> None:
    """`bench hardware --collectives`: every rank of a torchrun job times the collectives; rank 0 reports."""
    import torch

    from minigpt.core.atomic import atomic_write_text
    from minigpt.core.device import device_name
    from minigpt.core.hardware import match_device
    from minigpt.measure.collectives import collective_sweep
    from minigpt.parallel.distributed import init_distributed, shutdown

    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise UserError("--collectives times collectives between ranks: run it under torchrun with 2 or more, e.g. "
                        "torchrun --nproc-per-node 8 -m minigpt bench hardware --collectives --out coll.json")
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise UserError(f"--out {args.out}: its folder does not exist; create it or choose another path")
    env = init_distributed(args.device)
    name = device_name(env.device)
    spec = match_device(name) if env.device.type == "cuda" else None
    hw = {"bench": "hardware", "device": str(env.device), "device_name": name, "torch": torch.__version__,
          "datasheet": {"name": spec.name, "nvlink_gbs": spec.nvlink_gbs} if spec else None,
          "collectives": collective_sweep(env, repeats=args.repeats or 10)}
    shutdown(env)
    if not env.is_main:
        return
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(hw) + "\n")
    if args.json:
        print(json.dumps(hw))
        return
    for r in hw["collectives"]["results"]:
        print(f"{r['op']:<15} {r['bytes'] / 2**20:>10.3f} MiB  {r['time_s'] * 1e3:>9.3f} ms  algbw {r['algbw_gbs']:>8.2f} GB/s  "
              f"busbw {r['busbw_gbs']:>8.2f} GB/s (measured)")
    print(f"({hw['collectives']['world_size']} ranks, {hw['collectives']['backend']}; {hw['collectives']['convention']})")


def cmd_bench_hardware(args) -> None:
    if args.collectives:
        return cmd_bench_collectives(args)
    _threads(args)
    from minigpt.core.atomic import atomic_write_text
    from minigpt.measure.bench import bench_hardware

    hw = bench_hardware(args.device, args.size, args.repeats, sweep=args.sweep)
    line = json.dumps(hw)
    if args.out:
        atomic_write_text(Path(args.out), line + "\n")
    if args.json:
        print(line)
        return
    print(f"{hw['device_name']} ({hw['device']}, {hw['threads']} threads), measured: matmul "
          + ", ".join(f"{k} {v} TFLOP/s (n={hw['matmul_size'][k]})" for k, v in hw["matmul_tflops"].items())
          + f"; copy {hw['copy_bandwidth_gbs']} GB/s (read + write)" + (f"; written to {args.out}" if args.out else ""))
    print(f"({hw['convention']})")
    if "gemm_sweep" in hw:
        rates = sorted(t for *_, t in hw["gemm_sweep"]["shapes"])
        print(f"GEMM sweep ({hw['gemm_sweep']['dtype']}, {len(rates)} shapes, measured): {rates[0]:.4g} to {rates[-1]:.4g} "
              f"TFLOP/s, median {rates[len(rates) // 2]:.4g} ({hw['gemm_sweep']['convention']})")


def _training_context(args, cfg) -> tuple[int | None, str]:
    """extrapolate's training sequence length and where it comes from."""
    from pathlib import Path

    if getattr(args, "seq_len", None):
        return args.seq_len, "given (--seq-len)"
    target = Path(getattr(args, "target", "") or "")
    if target.suffix == ".json" or target.is_dir():
        return None, (f"the HF config's max_position_embeddings ({cfg.model.block_size:,}), its longest context, not "
                      f"necessarily the one it trained at: give --seq-len")
    return None, "the preset's block_size"


def _extrapolate_plan(text: str, cfg) -> dict:
    """extrapolate --plan: its keys, or with `published` the target's published layout's."""
    if text != "published":
        return parse_keys(text)
    if not cfg.target.published_plan:
        raise UserError("--plan published: this target has no published layout (target.published_plan); give the keys, "
                        "e.g. --plan tp=8,pp=8")
    return parse_keys(cfg.target.published_plan, "target.published_plan")


def _hardware_file(args) -> tuple[dict, str] | None:
    """--hardware: a `bench hardware` result and its name, for the step-time model."""
    from minigpt.core.config import read_json

    return (read_json(Path(args.hardware), "--hardware"), args.hardware) if args.hardware else None


def _kernels(args, cfg) -> str:
    """--kernels, checked before any work: it shapes the step-time model's prediction alone, and eager counts
    cover dense blocks without dropout or QK-norm."""
    if args.kernels == "eager":
        from minigpt.analytic.eager import check_covered

        given = args.mfu is not None or args.from_run or args.from_bench or args.measure_layers
        if given or args.efficiency == "assumed":
            raise UserError("--kernels eager shapes the predicted efficiency: drop --mfu, --from-run, --from-bench, "
                            "--measure-layers or --efficiency assumed, or drop --kernels")
        check_covered(cfg.model, "--kernels fused")
    return args.kernels


def scenario_from_args(args, cfg):
    from minigpt.analytic.extrapolate import (
        WORDS_PER_TOKEN,
        Scenario,
        decode_efficiency,
        mfu_from_bench,
        mfu_from_run,
        read_serve_bench,
        speculate_factor,
    )
    from minigpt.core.hardware import gpu_by_name
    from minigpt.core.resolve import target_config

    gpu = gpu_by_name(args.gpu)
    kernels = _kernels(args, cfg)
    mfu, source, notes = args.mfu, "given (--mfu)" if args.mfu is not None else "", []
    if args.from_run:
        mfu, source = mfu_from_run(args.from_run, gpu)
    elif args.from_bench:
        mfu, source = mfu_from_bench(args.from_bench, gpu)
    elif args.measure_layers:
        from minigpt.measure.counted import measured_mfu

        mfu, source, args._measured_layers = measured_mfu(cfg.model, args.measure_layers, args.measure_micro_batch,
                                                          args.measure_precision, args.measure_device)
        if args._measured_layers["device"] == "cpu":
            notes.append("layers timed on a CPU: its efficiency stands in for the target GPU's")
    tokens = args.tokens
    serve = None
    if args.serve:
        tpr = args.tokens_per_request or (args.words_per_request / WORDS_PER_TOKEN if args.words_per_request else None)
        serve = {"users": args.users, "requests_per_hour": args.requests_per_hour, "tokens_per_request": tpr,
                 "utilisation": args.utilisation, "tokens_per_s_per_user": args.tokens_per_s_per_user,
                 "user_speed_source": "given (--tokens-per-s-per-user)" if args.tokens_per_s_per_user else None,
                 "efficiency": decode_efficiency(args.from_decode_bench) if args.from_decode_bench else None,
                 "serve_bench": read_serve_bench(args.from_serve_bench) if args.from_serve_bench else None,
                 "speculate": speculate_factor(args.speculate) if args.speculate else None}
    if cfg.target.label:
        notes.append(cfg.target.label)
    seq_len, seq_source = _training_context(args, cfg)
    return Scenario(gpu, dtype=args.dtype, num_gpus=args.num_gpus, days=args.days, mfu=mfu, mfu_source=source,
                    efficiency=args.efficiency, kernels=kernels, quantize=args.quantize or "",
                    student=target_config(args.distilled).model if args.distilled else None, student_name=args.distilled or "",
                    seq_len=seq_len, seq_source=seq_source,
                    price_per_gpu_hour=args.price, tokens=tokens, flops_convention=args.flops_convention,
                    plan=_extrapolate_plan(args.plan, cfg), micro_batch=args.micro_batch,
                    context=args.context, batch=args.batch, serve=serve, notes=notes,
                    hardware=_hardware_file(args))


def cmd_extrapolate(args) -> None:
    from minigpt.analytic.extrapolate import extrapolate
    from minigpt.analytic.report import extrapolation_lines, extrapolation_markdown
    from minigpt.core.resolve import target_config

    cfg = target_config(args.target)
    if args.step_plot:
        from minigpt.core.plots import check_image_path

        check_image_path(args.step_plot, "--step-plot")
        if args.efficiency != "predicted":
            raise UserError("--step-plot draws the step-time model's layouts: drop --efficiency assumed")
    s = scenario_from_args(args, cfg)
    if args.comm == "counted":
        from minigpt.measure.simulate import layout_simulator

        s.simulator = layout_simulator(s.gpu, s.micro_batch, s.notes)
    r = extrapolate(cfg.model, cfg.target, s)
    if getattr(args, "_measured_layers", None):
        r["measured_layers"] = args._measured_layers
    if args.step_plot:
        from minigpt.core.plots import plot_layout_steps

        lay = r["memory"]["layout"]
        plot_layout_steps(lay["alternatives"], args.step_plot, f"{args.target} on {lay['gpus_given']:,} x {r['gpu']}")
    if args.json:
        print(to_json(r))
    elif args.markdown:
        print(extrapolation_markdown(r, f"minigpt extrapolation: {args.target} on {r['gpu']}"))
    else:
        print("\n".join(extrapolation_lines(r)))


def cmd_backtest(args) -> None:
    from minigpt.analytic.published import TABLE, backtest
    from minigpt.analytic.report import backtest_lines, backtest_markdown

    if args.plot:
        from minigpt.core.plots import check_image_path

        check_image_path(args.plot, "--plot")
    b = backtest(Path(args.table) if args.table else TABLE, _hardware_file(args))
    if args.plot:
        from minigpt.core.plots import plot_step_parts

        plot_step_parts(b["runs"], args.plot, "minigpt backtest: predicted step by part")
    if args.json:
        print(to_json(b))
    elif args.markdown:
        print(backtest_markdown(b))
    else:
        print("\n".join(backtest_lines(b)))


def cmd_extrapolate_plot(args) -> None:
    from minigpt.analytic.extrapolate import Scenario, extrapolate
    from minigpt.core.config import GPT3_PRESETS
    from minigpt.core.hardware import gpu_by_name
    from minigpt.core.plots import check_image_path, plot_costs
    from minigpt.core.resolve import target_config

    check_image_path(args.out, make_parents=True)
    gpu = gpu_by_name(args.gpu)
    points = []
    for name in [*GPT3_PRESETS, "gpt4"]:
        cfg = target_config(name)
        given = {"mfu": args.mfu, "mfu_source": "given (--mfu)"} if args.mfu else {}  # else predicted per model
        r = extrapolate(cfg.model, cfg.target, Scenario(gpu, num_gpus=1024, **given))
        points.append({"name": name, "params": r["params_active"], "gpu_hours": r["gpu_hours"], "kind": "extrapolated",
                       "tokens": r["train_tokens"], "mfu": r["mfu"], "mfu_source": r["mfu_source"]})
    for run in args.run:
        path = Path(run) / "summary.json"
        if not path.is_file():
            raise UserError(f"{path} does not exist: give a finished run directory with --run")
        from minigpt.core.config import read_json

        summary = read_json(path, "run summary")
        points.append({"name": Path(run).name, "params": summary["params"], "tokens": summary["tokens_seen"],
                       "gpu_hours": summary["wall_s"] * summary["world_size"] / 3600, "kind": "measured"})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot_costs(points, args.out, gpu.name, args.mfu, 1024)
    if args.json:
        print(to_json({"plot": args.out, "points": points}))
        return
    how = (f"at a given {args.mfu:.0%} MFU" if args.mfu else "at each model's MFU predicted by the step-time model on "
           "its fastest layout (" + ", ".join(f"{p['name']} {p['mfu']:.1%}" for p in points if "mfu" in p) + ")")
    print(f"wrote {args.out}: training GPU-hours of {len(points)} models on 1,024 x {gpu.name} {how}")


# ----------------------------------------------------------------------------------------------
# flags


def threads_flag() -> argparse.ArgumentParser:
    """--threads, on every command that runs torch on the CPU: one rule (core/device.default_threads)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--threads", type=number(int, 0, 4096), default=0,
                        help="CPU threads for torch (default 0: OMP_NUM_THREADS if set, else the cores the load "
                             "average says are idle; train and quickstart also take train.threads)")
    return parent


def _config_flags(p: argparse.ArgumentParser, any_model: bool = False) -> None:
    more = "; or a run directory, or a Hugging Face config.json (or its folder)" if any_model else ""
    p.add_argument("--config", help=f"TOML preset: a path, or a preset name shipped with minigpt (default: tiny){more}")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable (e.g. --set train.max_steps=100)")


def add_train_flags(p: argparse.ArgumentParser) -> None:
    _config_flags(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--stop-at", type=number(int, 1), metavar="STEP", help="stop and checkpoint after STEP (schedule unchanged)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in train.out_dir")
    p.add_argument("--plan", type=plan_arg, metavar="SPEC",
                   help="the parallel layout, e.g. dp=2,zero=3 or tp=2 (keys dp tp pp zero backend offload); sets "
                        "train.backend, tensor_parallel, pipeline_parallel, zero_stage and offload_*")
    p.add_argument("--json", action="store_true", help="the run's lines on stderr; stdout holds only the final summary "
                                                       "object")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # passed by `deepspeed`


def _add_run_commands(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus (cached) and report its size and unigram entropy")
    _config_flags(p)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout (the manifest), nothing else")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", parents=[threads_flag()], help="train a model (single process, or under torchrun)")
    add_train_flags(p)
    p.set_defaults(func=cmd_train)

    _add_generate_command(sub)
    _add_eval_command(sub)
    _add_serve_command(sub)

    p = sub.add_parser("convert", parents=[threads_flag()], help="import a Hugging Face GPT-2/Llama-family model as a run, or export a run")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="DIR", help="an HF folder: config.json, *.safetensors, tokenizer.json")
    way.add_argument("--to-hf", metavar="RUN_DIR", help="a minigpt run directory (its latest checkpoint)")
    way.add_argument("--quantize-run", metavar="RUN_DIR", help="a run's latest weights, weight-only quantized, as a new run "
                                                               "(with --quantize int8|int4)")
    p.add_argument("--quantize", choices=("int8", "int4"), help="with --quantize-run: the format")
    p.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("plot", help="training and validation loss of runs against tokens seen and wall time (PNG)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories, overlaid")
    p.add_argument("--out", default="loss.png", help="the PNG to write (default: loss.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("quickstart", parents=[threads_flag()], help="the main job: prepare stdlib text, train the tiny GPT, sample")
    p.add_argument("--config", default="tiny-modern", help="the preset or TOML to train (default: tiny-modern, the "
                                                           "speedrun's best recipe on the tiny shape)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable (e.g. --set train.max_steps=100)")
    p.add_argument("--out-dir", default="runs/quickstart", help="the run directory (default: runs/quickstart)")
    p.add_argument("--json", action="store_true", help="every line on stderr; stdout holds only the training summary "
                                                   "object")
    p.set_defaults(func=cmd_quickstart)


def _add_serve_command(sub) -> None:
    p = sub.add_parser("serve", parents=[threads_flag(), quantize_flag()], help="an OpenAI-compatible HTTP API for a run "
                       "on a continuously batched engine (/v1/completions, /v1/chat/completions, /health, /metrics)")
    p.add_argument("--run", required=True, help="run directory written by 'minigpt train'")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=number(int, 1, 65535), default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-batch", type=number(int, 1, 1024), default=8, help="requests decoded together (more wait in a queue)")
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
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu (default), cuda, auto")
    p.set_defaults(func=cmd_serve)


def _add_generate_command(sub) -> None:
    p = sub.add_parser("generate", parents=[threads_flag(), quantize_flag()], help="sample text from a trained run")
    p.add_argument("--run", required=True, help="run directory written by 'minigpt train'")
    p.add_argument("--prompt", action="append", default=[], help="prompt text; repeat for a batch")
    p.add_argument("--prompt-file", action="append", default=[], metavar="PATH",
                   help="a file whose whole text is one prompt ('-': stdin); repeatable, after the --prompt ones")
    p.add_argument("--num-samples", type=number(int, 1, 1024), default=1, help="samples per prompt (one batch)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=sys.stdout.isatty(),
                   help="print a single sample's tokens as they come (default: on a terminal)")
    p.add_argument("--step", type=number(int, 0), help="a kept checkpoint's step (default: the latest)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout (samples and statistics), nothing else")
    p.add_argument("--max-new-tokens", type=number(int, 0, MAX_NEW_TOKENS), default=0,
                   help=f"default: the run's sample.max_new_tokens; at most {MAX_NEW_TOKENS:,}")
    p.add_argument("--temperature", type=number(float, 0, 100), help="0 is greedy")
    p.add_argument("--top-k", type=number(int, 0), help="0 disables")
    p.add_argument("--top-p", type=number(float, 0, 1, lo_open=True), help="1.0 disables")
    p.add_argument("--seed", type=number(int, 0), help="sampling seed (default: the run's sample.seed)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graphs on a GPU)")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu (default), cuda, auto")
    p.add_argument("--draft", metavar="RUN_DIR", help="speculative decoding: a smaller run with the same tokenizer drafts")
    p.add_argument("--speculate", type=number(int, 1, 64), default=4, metavar="K", help="draft tokens per round (default 4)")
    p.add_argument("--logprobs", type=number(int, 0, 20), metavar="N",
                   help="with --json: each generated token's log-probability under the model and the top N")
    p.set_defaults(func=cmd_generate)


def _add_eval_command(sub) -> None:
    p = sub.add_parser("eval", parents=[threads_flag(), quantize_flag()], help="loss, perplexity and bits per byte of a run on any text, or on its own split")
    p.add_argument("--run", required=True, help="run directory written by 'minigpt train' (or convert --from-hf)")
    p.add_argument("--data", metavar="SOURCE",
                   help="val or train (the run's own splits), or any data.source: a file, folder, glob, "
                        ".jsonl/.parquet/.csv, a datasets folder, stdlib, hf:NAME")
    p.add_argument("--context", type=number(int, 1), help="window length in tokens (default: block_size)")
    p.add_argument("--stride", type=number(int, 1), help="tokens a window advances (default: context / 2)")
    p.add_argument("--max-tokens", type=number(int, 2, 1 << 28), default=1 << 22,
                   help="score at most this many tokens of the text (default 4,194,304)")
    p.add_argument("--batch-size", type=number(int, 1, 4096), default=32, help="windows per forward pass")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu (default), cuda, auto")
    p.add_argument("--tasks", metavar="T1,T2", help="lm-evaluation-harness tasks instead of --data (needs the eval "
                                                  "extra), e.g. hellaswag,arc_easy,lambada_openai")
    p.add_argument("--include-path", metavar="DIR", help="a folder of your own lm-eval task YAML files")
    p.add_argument("--limit", type=number(int, 1), help="at most this many examples per task")
    p.add_argument("--output", metavar="DIR", help="write lm-eval's results (and samples) there, as lm-eval does")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout, nothing else")
    p.set_defaults(func=cmd_eval)


def _add_measure_commands(sub) -> None:
    p = sub.add_parser("flops", parents=[threads_flag()], help="count training FLOPs of a config and set them beside the formulas")
    fsub = p.add_subparsers(dest="flops_command")
    _config_flags(p, any_model=True)
    p.add_argument("--batch-size", type=number(int, 1), default=1, help="sequences counted (default 1)")
    p.add_argument("--seq-len", type=number(int, 0), default=0, help="default: model.block_size")
    p.add_argument("--device", type=device_arg, default="meta", help="meta (default: nothing allocated), cpu or cuda")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.set_defaults(func=cmd_flops)
    q = fsub.add_parser("sweep", parents=[threads_flag()], help="counted/6N and counted/PaLM over model sizes, timed steps, plot")
    q.add_argument("--out", default="runs/flops-sweep", help="folder for sweep.json, .md, .png (default runs/flops-sweep)")
    q.add_argument("--device", type=device_arg, default="cpu", help="where the small models are timed (default cpu)")
    q.add_argument("--steps", type=number(int, 1), default=7, help="timed training steps per small model")
    q.add_argument("--no-gpt3", action="store_true", help="leave out the GPT-3 family (counted on meta)")
    q.set_defaults(func=cmd_flops_sweep)
    _add_memory_command(sub)
    _add_simulate_command(sub)
    _add_bench_command(sub)


def _add_memory_command(sub) -> None:
    p = sub.add_parser("memory", parents=[threads_flag()], help="training memory by category: predicted vs measured, ZeRO table")
    _config_flags(p, any_model=True)
    p.add_argument("--batch-size", type=number(int, 0), default=0, help="default: train.micro_batch_size")
    p.add_argument("--seq-len", type=int, default=0, help="default: model.block_size")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: train.precision (bf16 with --params)")
    p.add_argument("--dp", type=number(int, 1, 1 << 20), default=1, help="data-parallel degree for the ZeRO table")
    p.add_argument("--device", type=device_arg, default="cpu", help="where memory is measured (default cpu)")
    p.add_argument("--fake", action="store_true", help="fake tensors: any size, nothing allocated")
    p.add_argument("--recompute", action="store_true", help="activation checkpointing")
    p.add_argument("--params", type=number(float, 0, 1e15, lo_open=True),
                   help="skip the model: ZeRO table for this many parameters (at most 1e15)")
    p.add_argument("--run", help="a DeepSpeed run directory: its per-rank memory beside the ZeRO formulas")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout, nothing else")
    p.set_defaults(func=cmd_memory)


def _add_simulate_command(sub) -> None:
    p = sub.add_parser("simulate", help="one training step on N simulated ranks (FSDP2/tensor parallel on a fake "
                                        "process group): memory and communication per rank beside the formulas")
    _config_flags(p, any_model=True)
    p.add_argument("--plan", type=plan_arg, default="", metavar="SPEC",
                   help=f"the parallel layout, e.g. dp=128,tp=8,pp=1,zero=3 (keys {', '.join(PLAN_KEYS)}; zero defaults "
                        f"to 3; the same spelling as train and extrapolate)")
    p.add_argument("--world", type=number(int, 1, 1 << 20), help="ranks (GPUs) in all: dp = world / (tp x pp) when "
                                                                  "--plan gives no dp")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16", help="compute and gather dtype")
    p.add_argument("--reduce-precision", choices=["fp32", "bf16", "fp16"],
                   help="gradient reduction dtype (default: --precision, the ZeRO paper's 16-bit gradients)")
    p.add_argument("--micro-batch", type=number(int, 1), default=1, help="sequences per rank")
    p.add_argument("--micro-batches", type=number(int, 1, 1 << 20), default=0,
                   help="pipeline micro-batches per step, m (bubble, traffic per step; default: 4 x pp, said as assumed)")
    p.add_argument("--seq-len", type=number(int, 0), default=0, help="default: model.block_size")
    p.add_argument("--recompute", action="store_true", help="activation checkpointing per block")
    p.add_argument("--gpu", default="H100", help="GPU whose links and peak time the step (default H100)")
    p.add_argument("--mfu", type=number(float, 0, 1, lo_open=True), help="compute MFU (default: predicted by the "
                   "step-time model for the stage)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout, nothing else")
    p.set_defaults(func=cmd_simulate)


def _add_bench_command(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks of this machine")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    q = bsub.add_parser("hardware", parents=[threads_flag()], help="measure matmul TFLOP/s per dtype and memory bandwidth")
    q.add_argument("--device", type=device_arg, default="auto", help="the device to measure (default: CUDA if present)")
    q.add_argument("--size", type=number(int, 0, 32768), default=0, help="matmul size (default 2048 on CPU, 8192 on GPU)")
    q.add_argument("--repeats", type=number(int, 0, 1000), default=0, help="timed repeats, best kept (default 8 on CPU)")
    q.add_argument("--out", help="also write the JSON here (usable as train.peak_from, and with --sweep as "
                                 "extrapolate/backtest --hardware)")
    q.add_argument("--sweep", action="store_true", help="also time a grid of GEMM shapes: the efficiency curve the "
                                                        "step-time model reads from --hardware")
    q.add_argument("--collectives", action="store_true", help="instead, under torchrun: all-reduce / all-gather / "
                                                              "reduce-scatter bus bandwidth by size (nccl-tests' units)")
    q.add_argument("--json", action="store_true", help="one JSON object on stdout, nothing else")
    q.set_defaults(func=cmd_bench_hardware)
    q = bsub.add_parser("decode", parents=[threads_flag(), quantize_flag()], help="decode tokens/s (total and per sequence) against batch and context, beside the "
                                       "rooflines; JSON and PNG")
    q.add_argument("--run", help="a run directory (its weights)")
    _config_flags(q, any_model=True)
    q.add_argument("--batch", type=number(int, 1, 4096), action="append", help="batch sizes (default 1, 2, 4, 8, 16, 32)")
    q.add_argument("--context", type=number(int, 1), action="append", help="prompt lengths (default 16 and block_size/2)")
    q.add_argument("--new-tokens", type=number(int, 2, 100000), default=32, help="tokens decoded per point (default 32)")
    q.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights and cache dtype (default fp32)")
    q.add_argument("--compile", action="store_true", help="compiled decode step")
    q.add_argument("--device", type=device_arg, default="auto", help="the device to measure (default: CUDA if present)")
    q.add_argument("--out", default="runs/decode_curve.json", help="the JSON; the PNG is written beside it")
    q.set_defaults(func=cmd_bench_decode)
    q = bsub.add_parser("serve", help="load a running server on this machine (Poisson arrivals): TTFT, time per output "
                                      "token, latency percentiles, throughput and per-user tokens/s; JSON and PNG")
    q.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's /v1 URL (this machine only)")
    q.add_argument("--rate", type=number(float, 0, 1e4), action="append",
                   help="arrivals per second; repeat for a sweep (default 2; 0: all at once)")
    q.add_argument("--arrivals", choices=("poisson", "fixed"), default="poisson", help="gaps between arrivals")
    q.add_argument("--requests", type=number(int, 1, 10_000), default=32, help="requests per rate (default 32)")
    q.add_argument("--concurrency", type=number(int, 1, 1024), default=16, help="most requests in flight (default 16)")
    q.add_argument("--prompt-tokens", type=span_arg, default=(16, 64), help="prompt length range LO:HI (default 16:64)")
    q.add_argument("--output-tokens", type=span_arg, default=(32, 64), help="max_tokens range LO:HI (default 32:64)")
    q.add_argument("--seed", type=number(int, 0), default=0, help="seed of the lengths, prompts and gaps")
    q.add_argument("--api-key", help="the server's key (default: $MINIGPT_API_KEY)")
    q.add_argument("--out", help="also write the JSON here, the plot beside it (.png)")
    q.add_argument("--json", action="store_true", help="one JSON object on stdout, nothing else")
    q.set_defaults(func=cmd_bench_serve)


def _add_serving_flags(p) -> None:
    """extrapolate's serving scenario: the load, the per-user speed, and what was measured or assumed."""
    p.add_argument("--serve", action="store_true", help="add a serving scenario")
    p.add_argument("--users", type=number(float, 0, lo_open=True), default=1e6, help="concurrent users at peak")
    p.add_argument("--requests-per-hour", type=number(float, 0, lo_open=True), default=6, help="requests per user per hour (default 6)")
    p.add_argument("--tokens-per-request", type=number(float, 0, lo_open=True), help="generated tokens per request (instead of words)")
    p.add_argument("--words-per-request", type=number(float, 0, lo_open=True), default=60, help="converted at 1000 tokens = 750 words")
    p.add_argument("--utilisation", type=number(float, 0, 1, lo_open=True), default=0.3, help="assumed serving utilisation of the peak (default 0.3)")
    p.add_argument("--tokens-per-s-per-user", type=number(float, 0, lo_open=True),
                   help="decode speed each user must get (default 30 tokens/s: an assumed reading speed)")
    p.add_argument("--from-serve-bench", metavar="FILE",
                   help="with --serve: also size the fleet from a 'minigpt bench serve' result (measured servers at the "
                        "per-user speed), beside the roofline estimate; --target must be the model it served")
    p.add_argument("--from-decode-bench", metavar="FILE",
                   help="a 'minigpt bench decode' curve: its measured fraction of the bandwidth bound per batch replaces --utilisation")
    p.add_argument("--speculate", metavar="X|FILE", help="speculative decoding's speed-up: a factor or a bench_speculative.py result")
    p.add_argument("--quantize", choices=("int8", "int4"),
                   help="with --serve: also size the fleet for weight-only quantized weights (1 or 0.625 bytes a weight)")
    p.add_argument("--distilled", metavar="TARGET",
                   help="with --serve: also size the fleet for a distilled student (a preset, TOML or config.json) instead")


def _add_extrapolate_command(sub) -> None:
    p = sub.add_parser("extrapolate", help="training and serving cost of a target (GPT-3, GPT-4, a TOML) on a GPU")
    xsub = p.add_subparsers(dest="extrapolate_command")
    p.add_argument("--target", default="gpt3-175b", help="a preset with a [target] table (gpt3-*, gpt4), a TOML path, or a Hugging "
                                                         "Face config.json (with --tokens)")
    p.add_argument("--gpu", default="A100", help="V100, A100 (80GB), A100-40GB, H100, H200, B200")
    p.add_argument("--dtype", default="bf16", help="the peak's dtype: bf16, fp16, fp8, tf32, fp32")
    p.add_argument("--num-gpus", type=number(int, 1, 1 << 20), help="GPUs to train on (default 1024, an assumption; or solved from --days)")
    p.add_argument("--days", type=number(float, 0, lo_open=True), help="wall-clock budget: solve for the GPU count")
    p.add_argument("--mfu", type=number(float, 0, 1, lo_open=True), help="model FLOPs utilisation in (0, 1]")
    p.add_argument("--efficiency", choices=("predicted", "assumed"), default="predicted",
                   help="without --mfu/--from-run/--from-bench: the step-time model's MFU (predicted, default) or the "
                        "GPU class's published reference MFU (assumed)")
    p.add_argument("--kernels", choices=("fused", "eager"), default="fused",
                   help="how the step-time model counts norms, activations and rotary embeddings: fused kernels "
                        "(torch.compile, Megatron; default) or eager PyTorch, one kernel per op (dense blocks, "
                        "no dropout)")
    p.add_argument("--hardware", metavar="FILE", help="the step-time model reads GEMM rates and HBM bandwidth measured on "
                                                      "--gpu (`minigpt bench hardware --sweep --out FILE` there)")
    p.add_argument("--step-plot", metavar="PNG", help="draw the predicted step of the five fastest layouts that fit, "
                                                      "stacked by part (seconds)")
    p.add_argument("--from-run", help="use the MFU a minigpt run measured (its report.json)")
    p.add_argument("--from-bench", help="use the MFU in a benchmark JSON line")
    p.add_argument("--measure-layers", type=number(int, 0, 1000), default=0, metavar="K", help="time K full-width layers here")
    p.add_argument("--measure-micro-batch", type=number(int, 1), default=1, help="with --measure-layers: sequences per timed step")
    p.add_argument("--measure-precision", default="bf16", choices=["fp32", "bf16", "fp16"], help="with --measure-layers: the dtype timed")
    p.add_argument("--measure-device", type=device_arg, default="auto", help="with --measure-layers: where to time")
    p.add_argument("--price", type=number(float, 0), help="USD per GPU-hour (default: an assumption per GPU type)")
    p.add_argument("--tokens", type=tokens_arg, help="training tokens, or 'chinchilla' (20 per parameter)")
    p.add_argument("--flops-convention", default="exact", help="exact, six_n_all, kaplan_6n, palm, chinchilla, megatron_72, ...")
    p.add_argument("--plan", type=plan_arg, default="", metavar="SPEC",
                   help="fix (part of) the parallel layout, e.g. tp=8,pp=15 or dp=32,tp=8,pp=4,zero=1 (the spelling "
                        "train and simulate take); what it leaves out is searched; zero defaults to 1; 'published': "
                        "the target's published layout (gpt4, mt-nlg-530b), which is otherwise shown beside the search's")
    p.add_argument("--comm", choices=["formula", "counted"], default="formula",
                   help="counted: simulate the suggested layout on fake ranks (minigpt simulate) for its communication "
                        "and per-GPU memory; layouts whose simulated memory does not fit are rejected")
    p.add_argument("--micro-batch", type=number(int, 1), default=1, help="sequences per GPU per micro-step (memory, bubble)")
    p.add_argument("--seq-len", type=number(int, 1, 1 << 22), help="training context in tokens (default: the preset's "
                   "block_size; for an HF config.json its max_position_embeddings, said as such)")
    p.add_argument("--context", type=number(int, 1), help="inference context (default: block_size / 2)")
    p.add_argument("--batch", type=number(int, 1), default=1, help="inference batch for the decode bound")
    _add_serving_flags(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object on stdout, nothing else")
    fmt.add_argument("--markdown", action="store_true", help="the report as Markdown")
    p.set_defaults(func=cmd_extrapolate)
    q = xsub.add_parser("plot", help="training cost against model size, log-log")
    q.add_argument("--gpu", default="A100", help="the GPU to cost on (default A100)")
    q.add_argument("--mfu", type=number(float, 0, 1, lo_open=True), help="one MFU for every model (default: each "
                   "model's predicted by the step-time model)")
    q.add_argument("--run", action="append", default=[], help="a measured run directory to add")
    q.add_argument("--out", default="runs/extrapolate.png", help="the image to write (default runs/extrapolate.png)")
    q.add_argument("--json", action="store_true", help="one JSON object on stdout, nothing else")
    q.set_defaults(func=cmd_extrapolate_plot)


def build_parser() -> argparse.ArgumentParser:
    from minigpt import __version__

    parser = Parser(prog="minigpt", description="Train, run and measure small GPTs.")
    parser.add_argument("--version", action="version", version=f"minigpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_commands(sub)
    _add_measure_commands(sub)
    _add_extrapolate_command(sub)
    p = sub.add_parser("backtest", help="the step-time model against published training runs (predicted vs published)")
    p.add_argument("--table", help="a published-runs TOML (default: the one shipped, minigpt/analytic/published_runs.toml)")
    p.add_argument("--plot", metavar="PNG", help="also draw each run's predicted step by part (stacked bars)")
    p.add_argument("--hardware", metavar="FILE", help="GEMM rates and HBM bandwidth measured on a GPU (`minigpt bench "
                                                      "hardware --sweep --out FILE`) for the runs on that GPU")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object on stdout, nothing else")
    out.add_argument("--markdown", action="store_true", help="a Markdown table")
    p.set_defaults(func=cmd_backtest)
    return parser


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # every line reaches a pipe or a file as it is printed
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    args = build_parser().parse_args(argv)
    if getattr(args, "flops_command", None) == "sweep":
        args.func = cmd_flops_sweep
    if getattr(args, "extrapolate_command", None) == "plot":
        args.func = cmd_extrapolate_plot
    try:
        return args.func(args) or 0
    except UserError as e:
        return _user_error(e)
    except OSError as e:  # disk full, read-only, permissions...: the user's to fix, in one line
        if os_error(e) is None:
            raise
        return _user_error(os_error(e))
    except KeyboardInterrupt:  # outside a training loop (which stops gracefully itself)
        print("interrupted; the last complete checkpoint is intact", file=sys.stderr)
        return 130


def _user_error(e: UserError) -> int:
    # under torchrun every rank sees the same error and rank 0 says it; a RankError is each rank's own
    if os.environ.get("RANK", "0") == "0" or type(e).__name__ == "RankError":
        print(f"error: {e}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())

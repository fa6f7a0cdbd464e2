"""Commands that read a run to produce text or scores: generate (plain, batched, speculative) and eval."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minigpt.commands.flags import (
    MAX_NEW_TOKENS,
    MAX_ROWS,
    apply_threads,
    device_arg,
    number,
    quantize_flag,
    quantize_loaded,
    threads_flag,
)
from minigpt.core.errors import UserError
from minigpt.core.fmt import fit, to_json


def cmd_generate(args) -> None:
    """Text on stdout (a header between several samples), or with --json one JSON object alone;
    statistics on stderr; --stream prints a single sample's tokens as they come."""
    apply_threads(args)
    import torch

    from minigpt.core.device import resolve_device
    from minigpt.infer.generate import generate_text
    from minigpt.run.load import load_run

    device = resolve_device(args.device)
    model, tokenizer, cfg, step = load_run(args.run, device, args.step)
    quantize_loaded(model, args)
    sc = cfg.sample
    prompts = _prompts(args, sc.prompt)
    if args.draft:
        return _generate_speculative(args, model, tokenizer, cfg, step, device, prompts)
    if device.type == "cpu" and not args.compile:  # inference only: the Linears packed for oneDNN once, as serve does
        from minigpt.nn.torch_private import prepack_linears

        prepack_linears(model)
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
            from minigpt.infer.evaluate import completion_logprobs

            for s, ids, new in zip(samples, gen.prompts, gen.new_tokens):  # the prompts as generate encoded them
                s["logprobs"] = completion_logprobs(model, tokenizer, ids, new, args.logprobs)
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
          f"{', compiled' if args.compile else ''} | weights {record['quantize'] if record['quantize'] != 'none' else 'as trained'}"
          f" | {device} | run {args.run} step {step}"
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
    from minigpt.infer.detokenize import IncrementalText

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
    apply_threads(args)
    from minigpt.core.device import resolve_device
    from minigpt.infer.evaluate import SPLITS, evaluate_text, run_split_tokens, text_tokens
    from minigpt.run.load import load_run

    if args.tasks and args.quantize:
        raise UserError("--quantize scores --data with a quantized model; lm-eval tasks (--tasks) load the run themselves "
                        "in full precision: drop one of them")
    if args.tasks:
        return _eval_tasks(args)
    if args.task:
        return _eval_task(args)
    if not args.data:
        raise UserError("minigpt eval needs --data SOURCE (text to score), --tasks T1,T2 (lm-eval tasks) or --task DIR "
                        "(a chat task's held-out accuracy)")
    device = resolve_device(args.device)
    model, tokenizer, cfg, step = load_run(args.run, device)
    quantize_loaded(model, args)
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
    print(fit(f"eval {args.run} (step {step}) on {what}: {r['tokens_scored']:,} tokens = {r['bytes_scored']:,} bytes scored "
          f"with a {r['context_tokens']}-token window advancing {r['stride_tokens']} (at least {r['min_history_tokens']} "
          f"tokens of history)"))
    print(f"loss {r['loss_nats_per_token']:.4f} nats/token | perplexity {r['perplexity']:.2f} | "
          f"{r['bits_per_byte']:.4f} bits/byte (comparable across tokenizers)")


def _eval_task(args) -> None:
    """--task DIR: greedy answers to a chat task's held-out prompts (heldout.jsonl), exact-match accuracy."""
    from pathlib import Path

    from minigpt.core.device import resolve_device
    from minigpt.data.chat import chat_ids, read_examples
    from minigpt.infer.answers import accuracy
    from minigpt.run.load import load_run

    model, tokenizer, _, step = load_run(args.run, resolve_device(args.device))
    try:
        chat_ids(tokenizer)
    except UserError:
        raise UserError(f"{args.run} was not post-trained (its tokenizer has no chat tokens): --task scores a run "
                        f"trained with train.objective = sft, dpo or grpo") from None
    examples = read_examples(Path(args.task) / "heldout.jsonl", "prompts")[:args.limit]
    acc = accuracy(model, tokenizer, examples, args.max_answer_tokens)
    record = {"event": "eval_task", "run": str(args.run), "step": step, "task": args.task, "examples": len(examples),
              "heldout_accuracy": acc, "convention": "greedy answers, exact match of the answer text"}
    print(to_json(record) if args.json else f"eval {args.run} (step {step}) on {args.task}: held-out accuracy "
          f"{acc:.4f} over {len(examples):,} problems (greedy answers, exact match)")


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
    p.add_argument("--task", metavar="DIR", help="a chat task folder (minigpt task): held-out accuracy of a "
                                                 "post-trained run's greedy answers (heldout.jsonl)")
    p.add_argument("--max-answer-tokens", type=number(int, 1, 4096), default=16, help="with --task: answer length cap")
    p.add_argument("--include-path", metavar="DIR", help="a folder of your own lm-eval task YAML files")
    p.add_argument("--limit", type=number(int, 1), help="at most this many examples per task")
    p.add_argument("--output", metavar="DIR", help="write lm-eval's results (and samples) there, as lm-eval does")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout, nothing else")
    p.set_defaults(func=cmd_eval)


def add_parsers(sub) -> None:
    """generate, eval."""
    _add_generate_command(sub)
    _add_eval_command(sub)
